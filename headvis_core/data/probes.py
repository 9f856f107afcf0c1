"""Synthetic probe inputs."""

from typing import Any

import torch


def repeated_random_tokens(n_seqs: int, half_len: int, d_vocab: int, bos_token_id: int | None,
                           seed: int = 0, low: int = 0) -> torch.Tensor:
    """``[n_seqs, (1 +) 2 * half_len]``: BOS (if given) then random tokens r repeated twice.

    The induction probe of Olsson et al. 2022: on the second copy an
    induction head attends from each token to the token after its first
    occurrence. Tokens are drawn from ``[low, d_vocab)`` (skip special ids
    with ``low``).
    """
    generator = torch.Generator().manual_seed(seed)
    half = torch.randint(low, d_vocab, (n_seqs, half_len), generator=generator)
    parts = [half, half]
    if bos_token_id is not None:
        parts.insert(0, torch.full((n_seqs, 1), bos_token_id, dtype=half.dtype))
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
