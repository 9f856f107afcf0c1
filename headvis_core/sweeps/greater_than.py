"""The greater-than score of Hanna et al. 2023 ("How does GPT-2 compute greater-than?").

``P(answer > ref) - P(answer <= ref)`` over the numbers with as many digits as
the reference, for tokenizers with whole two-digit tokens (GPT-2) and for those
that split numbers into single digits (SmolLM2).
"""


from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float

from headvis_core.errors import InputError


@dataclass(frozen=True)
class NumberTokens:
    """How the model writes numbers of ``width`` digits as the next token(s)."""

    method: str  # "whole": every zero-padded number is one token; "digits": digit by digit
    width: int
    ids: np.ndarray  # whole: [10**width] ids of "00".."99"; digits: [10] ids of "0".."9"


def number_tokens(model: Any, width: int) -> NumberTokens:
    """Find how ``model`` writes ``width``-digit numbers, or explain why greater-than cannot be scored."""
    def ids_of(texts: list[str]) -> Optional[np.ndarray]:
        ids = []
        for text in texts:
            tokens = model.to_tokens(text, prepend_bos=False, truncate=False)[0].tolist()
            if len(tokens) != 1:
                return None
            ids.append(tokens[0])
        return np.array(ids, dtype=np.int64)

    whole = ids_of([str(x).zfill(width) for x in range(10 ** width)])
    if whole is not None:
        return NumberTokens("whole", width, whole)
    digits = ids_of([str(d) for d in range(10)])
    if digits is not None:
        return NumberTokens("digits", width, digits)
    raise InputError(f"Greater-than needs the model to write {width}-digit numbers either as one token each or "
                     "digit by digit, and this tokenizer does neither.")


def greater_than_extension(numbers: NumberTokens, ref: str) -> list[int]:
    """Tokens appended after the prompt to read the next digits' probabilities (digit method only)."""
    if numbers.method == "whole":
        return []
    return [int(numbers.ids[int(d)]) for d in ref[:-1]]


def greater_than_score(step_probs: Sequence[Float[torch.Tensor, "value vocab"]], refs: Sequence[str],
                       numbers: NumberTokens) -> tuple[np.ndarray, np.ndarray]:
    """``(p_above, p_at_or_below)`` per value; the greater-than score is their difference.

    Whole-number tokens (GPT-2, as in Hanna et al. 2023): with ``p`` the
    next-token distribution at the answer position and ``v`` the reference,
    ``p_above = sum_{x > v} p(x)`` and ``p_at_or_below = sum_{x <= v} p(x)``
    over the tokens ``"00".."99"`` (as many digits as the reference).

    Digit tokenizers (SmolLM2): a number ``x = d1 d2`` is written digit by
    digit, so its probability is ``p1(d1) * p2(d2 | d1)``, where ``p1`` is the
    distribution at the answer position and ``p2`` the one after appending
    ``d1``. The mass of every continuation starting with ``d1`` is ``p1(d1)``.
    Only the tied path needs the second step: for ``v = t u``,
    ``p_above = sum_{d > t} p1(d) + p1(t) * sum_{d > u} p2(d | t)`` and
    ``p_at_or_below = sum_{d < t} p1(d) + p1(t) * sum_{d <= u} p2(d | t)``
    (likewise for three digits). Both scores lie in [-1, 1]; probability given
    to non-number tokens counts for neither side.

    Args:
        step_probs: ``[value, vocab]`` distributions, one per digit (one tensor for "whole").
        refs: the reference number of each value, as ``width`` digits.
    """
    ids = torch.as_tensor(numbers.ids)
    if numbers.method == "whole":
        p = step_probs[0][:, ids].double()  # [value, 10**width]
        v = torch.tensor([int(r) for r in refs]).unsqueeze(1)
        grid = torch.arange(p.shape[1]).unsqueeze(0)
        return (p * (grid > v)).sum(1).numpy(), (p * (grid <= v)).sum(1).numpy()
    digits = torch.arange(10).unsqueeze(0)
    tie = torch.ones(len(refs), dtype=torch.float64)
    above = torch.zeros_like(tie)
    below = torch.zeros_like(tie)
    for k in range(numbers.width):
        p = step_probs[k][:, ids].double()  # [value, 10]
        v = torch.tensor([int(r[k]) for r in refs]).unsqueeze(1)
        above += tie * (p * (digits > v)).sum(1)
        below += tie * (p * (digits < v)).sum(1)
        tie = tie * p.gather(1, v).squeeze(1)
    return above.numpy(), (below + tie).numpy()
