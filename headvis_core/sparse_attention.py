"""Sparse attention: the top keys each query attends to, the one form every view and store keeps.

A head's dense ``[query, key]`` pattern grows with the square of the prompt;
the scan's stored examples, the prompt lab and the token view keep only the
``k`` most attended keys of each query, chosen among positions 1.. (position 0
is the attention sink, whose weight is kept apart in ``first``).
"""


from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from jaxtyping import Float, Int

__all__ = ["SparseAttention", "top_attended_keys", "sparse_from_dense"]


@dataclass(frozen=True)
class SparseAttention:
    """The top keys of each query of one head.

    ``keys [query, k]`` positions and ``values [query, k]`` attention weights
    (a value of 0 marks an unused slot); ``first [query]`` is the attention
    each query pays to position 0, where known.
    """

    keys: np.ndarray
    values: np.ndarray
    first: Optional[np.ndarray] = None

    @property
    def n_queries(self) -> int:
        return int(self.keys.shape[0])


def top_attended_keys(
    patterns: Float[torch.Tensor, "*batch query key"], k: int, exclude_first: bool = True, stable: bool = False
) -> tuple[Int[torch.Tensor, "*batch query top"], Float[torch.Tensor, "*batch query top"],
           Float[torch.Tensor, "*batch query"]]:
    """``(keys, values, first)``: the ``k`` most attended keys of every query, largest first.

    With ``exclude_first`` the keys are chosen among positions 1.. ; ``first``
    is always the attention to position 0. ``k`` is capped at the number of
    candidate keys. By default ``torch.topk`` picks among exactly equal weights
    (the zeros of masked keys, mostly) in its own deterministic order: it is
    about 4x faster than a full sort on the scan's ``[n, 65, 64]`` rows, where
    this runs inside every layer's hook. ``stable=True`` sorts instead, so equal
    weights keep the earlier key first (the token view lists keys in that order).
    """
    offset = 1 if exclude_first else 0
    candidates = patterns[..., offset:]
    k = max(0, min(int(k), candidates.shape[-1]))
    if stable:
        values, order = torch.sort(candidates, dim=-1, descending=True, stable=True)
        return order[..., :k] + offset, values[..., :k], patterns[..., 0]
    top = torch.topk(candidates, k, dim=-1, sorted=True)
    return top.indices + offset, top.values, patterns[..., 0]


def sparse_from_dense(pattern: torch.Tensor | np.ndarray, top_k: int = 8,
                      exclude_first: bool = True) -> SparseAttention:
    """Keep the ``top_k`` largest keys of each query of a dense ``[query, key]`` pattern.

    With ``exclude_first`` the keys are chosen among positions 1.. (position
    0's weight is kept in ``first``). Equal weights keep the earlier key first.
    """
    if isinstance(pattern, torch.Tensor):
        dense = pattern.detach().float().cpu()
    else:
        dense = torch.as_tensor(np.asarray(pattern, float))
    keys, values, first = top_attended_keys(dense, top_k, exclude_first, stable=True)
    return SparseAttention(keys=keys.numpy().astype(np.int64), values=values.numpy().astype(np.float32),
                           first=first.numpy().copy())
