"""Synthetic probe inputs."""

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
