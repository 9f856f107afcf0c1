"""A head's (query, key) pairs with the largest attention output, and the Q, K, V and O vectors at each.

The output of head ``h`` at query ``q`` is ``sum_k A[q, k] v_k W_O``; the
pair (q, k) contributes ``o_qk = A[q, k] v_k W_O`` (the HeadVis view of
which pairs matter, ranked by ``||o_qk||``). Since ``A >= 0``,
``||o_qk|| = A[q, k] * ||v_k W_O||``, so every pair's norm costs one product
per key. Pairs with ``q = 0`` or ``k = 0`` (the BOS/first position, where
heads park unused attention) are left out, as in the scan.

Q and K are read at ``hook_q``/``hook_k`` (before rotary embeddings, where the
model has them), V at ``hook_v``; with grouped-query attention head ``h``
reads key-value head ``h // (n_heads // n_kv_heads)``.
"""


from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from transformer_lens.utilities import get_act_name

from headvis_core.heads import HeadRef

KINDS = ("Q", "K", "V", "O")


def attention_hooks(layer: int) -> list[str]:
    return [get_act_name(name, layer) for name in ("pattern", "q", "k", "v")]


def kv_head(model: Any, head: int) -> int:
    n_heads = int(model.cfg.n_heads)
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
    return head // (n_heads // n_kv)


def pair_norms(pattern: Float[torch.Tensor, "*batch query key"], v: Float[torch.Tensor, "*batch key d_head"],
               w_o: Float[torch.Tensor, "*batch d_head d_model"]) -> Float[torch.Tensor, "*batch query key"]:
    """``||A[q, k] v_k W_O||`` of every pair, 0 where ``q = 0``, ``k = 0`` or ``k > q``.

    Leading dimensions broadcast: one head (``[batch, query, key]``, ``W_O [d_head, d_model]``) or all
    heads of a layer (``[batch, head, query, key]``, ``v [batch, head, key, d_head]``, ``W_O [head, ...]``).
    """
    value_norm = (v.float() @ w_o.float()).norm(dim=-1)  # [*batch, key]
    norms = pattern.float() * value_norm[..., None, :]
    n = pattern.shape[-1]
    allowed = torch.ones(n, n, dtype=torch.bool, device=norms.device).tril()
    allowed[0, :] = False
    allowed[:, 0] = False
    return torch.where(allowed, norms, torch.zeros((), device=norms.device))


@dataclass
class PairVectors:
    """Pairs of one head: ``(window row, query, key)``, their norms and attention weights, the vectors of each kind."""

    rows: np.ndarray  # [pair] row of the batch of windows
    queries: np.ndarray
    keys: np.ndarray
    norms: np.ndarray  # [pair] ||A[q, k] v_k W_O||
    weights: np.ndarray  # [pair] A[q, k]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> [pair, dim]


def vectors_at(pattern: Float[torch.Tensor, "batch query key"], q: Float[torch.Tensor, "batch pos d_head"],
               k: Float[torch.Tensor, "batch pos d_head"], v: Float[torch.Tensor, "batch pos d_head"],
               w_o: Float[torch.Tensor, "d_head d_model"], rows: Int[torch.Tensor, " pair"],
               queries: Int[torch.Tensor, " pair"], keys: Int[torch.Tensor, " pair"]) -> dict[str, np.ndarray]:
    """Q at the query, K and V at the key, and O = ``A[q, k] v_k W_O`` of each pair."""
    weighted = weighted_values(pattern, v, rows, queries, keys)
    return {"Q": q[rows, queries].float().numpy(), "K": k[rows, keys].float().numpy(),
            "V": v[rows, keys].float().numpy(), "O": (weighted @ w_o.float()).numpy()}


def weighted_values(pattern: Float[torch.Tensor, "batch query key"], v: Float[torch.Tensor, "batch pos d_head"],
                    rows: Int[torch.Tensor, " pair"], queries: Int[torch.Tensor, " pair"],
                    keys: Int[torch.Tensor, " pair"]) -> Float[torch.Tensor, "pair d_head"]:
    """``A[q, k] v_k`` of each pair: O before ``W_O`` (``d_head`` values where O has ``d_model``)."""
    return pattern[rows, queries, keys].float()[:, None] * v[rows, keys].float()


def top_pairs_per_head(norms: Float[torch.Tensor, "batch head query key"], n: int,
                       ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per head, ``(rows, queries, keys, norms)`` of its ``n`` largest pairs (norm > 0), largest first.

    One stable sort for all heads of a layer; ties keep the earlier pair (row, then query, then key).
    """
    batch, heads, s, _ = norms.shape
    flat = norms.permute(1, 0, 2, 3).reshape(heads, -1)
    values, order = torch.sort(flat, dim=1, descending=True, stable=True)
    values, order = values[:, :n], order[:, :n]
    out = []
    for h in range(heads):
        keep = values[h] > 0
        chosen, kept_values = order[h][keep], values[h][keep]
        out.append(((chosen // (s * s)).numpy(), ((chosen // s) % s).numpy(), (chosen % s).numpy(),
                    kept_values.numpy()))
    return out


def top_pairs(norms: Float[torch.Tensor, "batch query key"], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                            np.ndarray]:
    """``(rows, queries, keys, norms)`` of one head's ``n`` largest pairs (see :func:`top_pairs_per_head`)."""
    return top_pairs_per_head(norms[:, None], n)[0]


def head_weights(model: Any, head: HeadRef) -> torch.Tensor:
    """``W_O[head]`` as ``[d_head, d_model]``."""
    return model.blocks[head.layer].attn.W_O[head.head].detach().cpu()


def merge_top(kept: PairVectors | None, new: PairVectors, n: int) -> PairVectors:
    """The ``n`` largest pairs of both sets (earlier pairs first among equal norms)."""
    if kept is None:
        both = new
    else:
        both = PairVectors(*(np.concatenate([getattr(kept, f), getattr(new, f)])
                             for f in ("rows", "queries", "keys", "norms", "weights")),
                           vectors={kind: np.concatenate([kept.vectors[kind], new.vectors[kind]]) for kind in KINDS})
    order = np.argsort(-both.norms, kind="stable")[:n]
    return PairVectors(both.rows[order], both.queries[order], both.keys[order], both.norms[order],
                       both.weights[order], {kind: both.vectors[kind][order] for kind in KINDS})
