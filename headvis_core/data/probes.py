"""Synthetic probe inputs: the induction probe of repeated random tokens."""


from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int

from headvis_core.tokens import bos_token_id


def repeated_random_tokens(n_seqs: int, half_len: int, d_vocab: int, bos_id: int | None,
                           seed: int = 0, low: int = 0) -> Int[torch.Tensor, "seq pos"]:
    """``[n_seqs, (1 +) 2 * half_len]``: BOS (if given) then random tokens r repeated twice.

    The induction probe of Olsson et al. 2022: on the second copy an
    induction head attends from each token to the token after its first
    occurrence. Tokens are drawn from ``[low, d_vocab)`` (skip special ids
    with ``low``).
    """
    generator = torch.Generator().manual_seed(seed)
    half = torch.randint(low, d_vocab, (n_seqs, half_len), generator=generator)
    parts = [half, half]
    if bos_id is not None:
        parts.insert(0, torch.full((n_seqs, 1), bos_id, dtype=half.dtype))
    return torch.cat(parts, dim=1)


def random_token_range(model: Any) -> tuple[int, int]:
    """``[low, high)`` of ordinary token ids to draw random probes from (special tokens at either end skipped)."""
    tokenizer = getattr(model, "tokenizer", None)
    high = int(model.cfg.d_vocab)
    specials: set[int] = set()
    if tokenizer is not None:
        high = min(high, len(tokenizer))
        specials = {int(i) for i in (tokenizer.all_special_ids or [])}
    low = 0
    while low in specials and low < high - 1:
        low += 1
    while high - 1 in specials and high - 1 > low:
        high -= 1
    return low, high


@dataclass(frozen=True)
class InductionProbe:
    """``tokens [batch, prefix + 2 * half_len]``: optional BOS, then random tokens repeated twice."""

    tokens: Int[torch.Tensor, "seq pos"]
    half_len: int
    prefix_len: int  # 1 with a BOS token, else 0

    @property
    def second_copy_start(self) -> int:
        """Position of the second copy's first token."""
        return self.prefix_len + self.half_len


def induction_probe(model: Any, n_seqs: int, half_len: int, seed: int = 0) -> InductionProbe:
    """The Olsson et al. 2022 induction probe for ``model``: BOS (if the model uses one) + ``r`` + ``r``.

    Tokens are drawn from the model's ordinary ids (:func:`random_token_range`).
    """
    low, high = random_token_range(model)
    bos = bos_token_id(model)
    tokens = repeated_random_tokens(n_seqs, half_len, high, bos, seed=seed, low=low)
    return InductionProbe(tokens=tokens, half_len=half_len, prefix_len=0 if bos is None else 1)
