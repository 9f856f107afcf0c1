"""Default positions for a query/key pair in the Prompt lab."""

from typing import Sequence


def induction_key(tokens: Sequence[int], query: int) -> int:
    """Where an induction head attends from ``query``: the token after the latest earlier
    occurrence of the query's token (Olsson et al. 2022, "In-context learning and induction
    heads"); with no such occurrence, the token before the query (position 0, the BOS, is
    never an occurrence).

    ``tokens`` are the prompt's token ids; the result is a position ``< query`` (0 when ``query`` is 0).
    """
    for position in range(query - 1, 0, -1):
        if tokens[position] == tokens[query] and position + 1 < query:
            return position + 1
    return max(query - 1, 0)
