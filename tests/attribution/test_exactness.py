"""The QK terms sum to the model's own pre-softmax score; the OV terms to the edge's write."""

import pytest
import torch

from headvis_core.attribution import EdgeSpec, attribute_edges
from headvis_core.attribution.components import capture_edge_activations, residual_components
from headvis_core.attribution.ov import edge_writes
from headvis_core.heads import HeadRef
from headvis_core.models.loader import load_model

PROMPT = "The cat sat on the mat. The cat sat on"


@pytest.fixture(scope="module")
def tiny_gemma3():
    return load_model("tiny-gemma3", device="cpu")


def _all_edges(model, n_tokens, window=None):
    edges = []
    for layer in range(int(model.cfg.n_layers)):
        for head in range(int(model.cfg.n_heads)):
            for query in (n_tokens - 1, n_tokens // 2):
                for key in (0, 1, query // 2, query - 1, query):
                    if window is not None and query - key >= window(layer):
                        continue
                    edges.append(EdgeSpec(HeadRef(layer, head), query, key))
    return edges


def _window(model):
    from headvis_core.attribution.edge import sliding_window

    return lambda layer: sliding_window(model, layer) or 10**9


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_gemma3"])
def test_qk_terms_sum_to_the_models_score(fixture, request):
    model = request.getfixturevalue(fixture).model
    tokens = model.to_tokens(PROMPT)
    edges = _all_edges(model, tokens.shape[1], _window(model))
    results = attribute_edges(model, tokens, edges)
    scores = torch.tensor([r.score for r in results], dtype=torch.float64)
    sums = torch.tensor([r.qk.terms.sum().item() for r in results], dtype=torch.float64)
    torch.testing.assert_close(sums, scores, rtol=1e-4, atol=1e-6)
    assert scores.abs().max() > 1e-3  # the scores are not all trivially zero
    for r in results:  # the marginals are the rows and columns of the same table
        assert r.query_side()["value"].sum() == pytest.approx(r.score, rel=1e-4, abs=1e-6)
        assert r.key_side()["value"].sum() == pytest.approx(r.score, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_gemma3"])
def test_components_sum_to_the_residual_stream(fixture, request):
    model = request.getfixturevalue(fixture).model
    tokens = model.to_tokens(PROMPT)
    last = int(model.cfg.n_layers) - 1
    acts = capture_edge_activations(model, tokens, [last])
    parts = residual_components(model, acts, last, 5)
    expected = acts[f"blocks.{last}.hook_resid_pre"][5].double()
    torch.testing.assert_close(parts.vectors.sum(0), expected, rtol=1e-5, atol=1e-5)
    n_heads = int(model.cfg.n_heads)
    assert len([n for n in parts.names if n.startswith("L0H")]) == n_heads
    assert parts.names[-1] == "bias" and "L0MLP" in parts.names
    assert ("pos_embed" in parts.names) == (fixture == "tiny_gpt2")


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_gemma3"])
def test_ov_terms_sum_to_the_edge_write_and_edges_to_the_attention_output(fixture, request):
    """Per edge: the value-side terms sum to A[q,k] v_k W_O from the model's own hook_v. Over every key
    and head of a layer (plus b_O): the layer's attention output at the query (post-norm on Gemma 3)."""
    model = request.getfixturevalue(fixture).model
    tokens = model.to_tokens(PROMPT)
    layer, query = int(model.cfg.n_layers) - 1, tokens.shape[1] - 1
    acts = capture_edge_activations(model, tokens, [layer])
    attn = model.blocks[layer].attn
    n_heads, n_kv = int(model.cfg.n_heads), attn.W_K.shape[0]
    total = torch.zeros(int(model.cfg.d_model), dtype=torch.float64)
    for head in range(n_heads):
        for key in range(query + 1):
            writes = edge_writes(model, acts, residual_components(model, acts, layer, key), layer, head, query)
            if key == query - 1:
                pattern = acts[f"blocks.{layer}.attn.hook_pattern"][head, query, key].double()
                v = acts[f"blocks.{layer}.attn.hook_v"][key, head // (n_heads // n_kv)].double()
                raw = pattern * v @ attn.W_O[head].double()
                post = getattr(model.blocks[layer], "ln1_post", None)
                if post is None:
                    torch.testing.assert_close(writes.sum(0), raw, rtol=1e-4, atol=1e-6)
            total += writes.sum(0)
    from headvis_core.attribution.components import head_writes

    _, biases = head_writes(model, acts, layer + 1, query)
    _, earlier_biases = head_writes(model, acts, layer, query)
    total += biases - earlier_biases  # this layer's output bias alone
    expected = acts[f"blocks.{layer}.hook_attn_out"][query].double()
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-5)


def test_batched_edges_equal_one_at_a_time(tiny_llama):
    model = tiny_llama.model
    tokens = model.to_tokens(PROMPT)
    edges = [EdgeSpec(HeadRef(1, 0), 10, 3), EdgeSpec(HeadRef(0, 3), 12, 12), EdgeSpec(HeadRef(1, 2), 20, 19)]
    together = attribute_edges(model, tokens, edges)
    for edge, batched in zip(edges, together):
        alone = attribute_edges(model, tokens, [edge])[0]
        assert torch.equal(alone.qk.terms, batched.qk.terms)
        assert torch.equal(alone.ov.writes, batched.ov.writes)


def test_rope_offset_profile_holds_the_actual_score(tiny_llama, tiny_gpt2):
    tokens = tiny_llama.model.to_tokens(PROMPT)
    result = attribute_edges(tiny_llama.model, tokens, [EdgeSpec(HeadRef(1, 1), 15, 11)])[0]
    actual = result.offsets[result.offsets.actual].score.item()
    assert actual == pytest.approx(result.score, rel=1e-4, abs=1e-6)
    assert len(result.offsets) == 16
    gpt2 = attribute_edges(tiny_gpt2.model, tokens, [EdgeSpec(HeadRef(1, 1), 15, 11)])[0]
    assert gpt2.offsets is None  # learned positions: position is the pos_embed component


def test_later_readers_match_a_direct_computation(tiny_gemma3):
    """The share of a later head's Q/K/V input is |ln1_B(e) W_X^B| / |hook_X^B| at the query position,
    with a query head reading its group's key/value head (Gemma 3 preset: 4 query heads, 1 KV head)."""
    from headvis_core.attribution.linearise import frozen_norm

    model = tiny_gemma3.model
    tokens = model.to_tokens(PROMPT)
    result = attribute_edges(model, tokens, [EdgeSpec(HeadRef(0, 1), 20, 15)])[0]
    acts = capture_edge_activations(model, tokens, [0])
    write = result.ov.total
    for reader in (HeadRef(1, 3), HeadRef(2, 0)):
        norm = frozen_norm(model.blocks[reader.layer].ln1, acts[f"blocks.{reader.layer}.ln1.hook_scale"][20])
        normed = norm.apply(write)
        for kind, index in (("q", reader.head), ("k", 0), ("v", 0)):
            weight = getattr(model.blocks[reader.layer].attn, f"W_{kind.upper()}")[index].double()
            whole = acts[f"blocks.{reader.layer}.attn.hook_{kind}"][20, index].double()
            expected = float((normed @ weight).norm() / whole.norm())
            row = result.ov.readers.query("layer == @reader.layer and head == @reader.head and kind == @kind")
            assert row.share.item() == pytest.approx(expected, rel=1e-4)
    assert len(result.ov.readers) == 2 * 4 * 3  # layers 1-2, 4 heads, Q/K/V
