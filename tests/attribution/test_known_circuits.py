"""Known circuits on SmolLM2 (real model): the attribution agrees with path patching and composition.

Repeated random tokens (Olsson et al. 2022). The induction head 18.6 attends from a second-copy
token to the token after its first occurrence; path patching shows 16.0 -> 18.6 through K, and
16.0 is a previous-token head. So the key side of the induction edge should be led by 16.0 (its
write at the key position carries "the previous token was X", labelled with that token), and the
previous-token edge of 16.0 should owe its score to the RoPE rotation (position), not to content.
"""

import pytest

from headvis_core.attribution import EdgeSpec, attribute_edges
from headvis_core.data.probes import random_token_range, repeated_random_tokens
from headvis_core.heads import HeadRef
from headvis_core.tokens import bos_token_id

HALF = 20


@pytest.fixture(scope="module")
def induction_edges(smollm2):
    model = smollm2.model
    bos = bos_token_id(model)
    low, high = random_token_range(model)
    tokens = repeated_random_tokens(1, HALF, high, bos, seed=0, low=low)
    start = 0 if bos is None else 1
    queries = [start + HALF + i for i in (5, 9, 14)]  # second-copy tokens r_i
    edges = [EdgeSpec(HeadRef(18, 6), q, q - HALF + 1) for q in queries]  # -> r_{i+1} in the first copy
    edges += [EdgeSpec(HeadRef(16, 0), q, q - 1) for q in queries]  # previous token
    return tokens, attribute_edges(model, tokens, edges)


def test_scores_are_exact_on_smollm2(induction_edges):
    _, results = induction_edges
    for result in results:
        assert result.qk.terms.sum().item() == pytest.approx(result.score, rel=1e-4)
        assert result.qk.query.reconstruction_error < 1e-3


def test_induction_key_side_is_led_by_the_previous_token_head(induction_edges):
    tokens, results = induction_edges
    for result in results[:3]:
        assert result.pattern > 0.3  # 18.6 does attend along the induction edge
        key_side = result.key_side()
        top = key_side.iloc[0]
        assert top.component == "L16H0" and top.value > 0.5 * result.score
        # 16.0 at the key position attended to the previous token, which is the query's own token
        previous = result.edge.key - 1
        assert top.label.endswith(f"@{previous}")
        assert tokens[0, previous] == tokens[0, result.edge.query]


def test_previous_token_edge_is_carried_by_the_rotation(induction_edges):
    _, results = induction_edges
    for result in results[3:]:
        assert result.pattern > 0.5
        profile = result.offsets.set_index("offset").score
        # the same content rotated to offset 1 scores far above no rotation (0) and far offsets
        assert int(profile.idxmax()) == 1
        assert profile[1] - profile[0] > 2.0
        assert profile[1] - profile[2:].max() > 2.0
        # and no single residual-stream component dominates the key side
        key_side = result.key_side()
        assert key_side.value.abs().iloc[0] < 0.5 * abs(result.score)
