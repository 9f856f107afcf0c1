import pytest

from headvis_core.lab.positions import induction_key


@pytest.mark.parametrize("tokens, query, expected", [
    ([0, 5, 6, 7, 5, 6, 7], 6, 4),   # 7 earlier at 3: the key is the token after it
    ([0, 5, 6, 5, 9, 5], 5, 4),      # the latest earlier occurrence (3), not the first (1)
    ([0, 5, 6, 7], 3, 2),            # no earlier occurrence: the token before
    ([0, 5, 5], 2, 1),               # the occurrence right before the query cannot be followed: before
    ([5, 6, 5], 2, 1),               # position 0 (BOS) is never an occurrence
    ([0], 0, 0),
])
def test_induction_key(tokens, query, expected):
    assert induction_key(tokens, query) == expected
