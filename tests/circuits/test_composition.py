import math

import pytest
import torch

from headvis_core.circuits.composition import (
    HeadWeights,
    check_composable,
    composition_score_reference,
    composition_scores_from_weights,
    compute_composition,
    head_weights,
    io_scores,
    parse_kinds,
    random_baseline,
    transformer_lens_scores,
)
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef, all_heads


def _all_pairs(weights):
    heads = all_heads(weights.n_layers, weights.n_heads)
    return [(a, b) for a in heads for b in heads if b.layer > a.layer]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("fold_ln", [False, True])
def test_fast_scores_equal_the_slow_per_pair_definition(fixture, fold_ln, request):
    weights = head_weights(request.getfixturevalue(fixture).model, fold_ln=fold_ln)
    for kind in "qkv":
        fast = composition_scores_from_weights(weights, kind)
        for sender, receiver in _all_pairs(weights):
            slow = composition_score_reference(weights, kind, sender, receiver)
            fast_score = fast[sender.layer, sender.head, receiver.layer, receiver.head].item()
            assert fast_score == pytest.approx(slow, rel=1e-5)
        same_or_earlier = torch.tensor([[rl <= sl for rl in range(weights.n_layers)] for sl in range(weights.n_layers)])
        assert (fast.permute(0, 2, 1, 3)[same_or_earlier] == 0).all()


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_raw_scores_equal_transformer_lens_all_composition_scores(fixture, request):
    model = request.getfixturevalue(fixture).model
    weights = head_weights(model, fold_ln=False)
    for kind in "qkv":
        torch.testing.assert_close(composition_scores_from_weights(weights, kind), transformer_lens_scores(model, kind),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_ln_folding_equals_transformer_lens_process_weights(name):
    """Fresh copies (process_weights changes a model for good), with non-trivial ln1 gains."""
    from headvis_core.models.loader import load_model

    raw, processed = load_model(name, device="cpu").model, load_model(name, device="cpu").model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in range(raw.cfg.n_layers):
            gain = 0.5 + torch.rand(raw.cfg.d_model, generator=generator)
            for model in (raw, processed):
                model.blocks[layer].ln1.original_component.weight.copy_(gain)
    processed.process_weights()
    folded = head_weights(raw, fold_ln=True)
    assert folded.ln_folded and "folded" in folded.folding_note
    assert not head_weights(raw, fold_ln=False).ln_folded
    assert head_weights(processed, fold_ln=True).folding_note.startswith("Layer norm is folded: this model's weights")
    for kind in "qkv":
        ours = composition_scores_from_weights(folded, kind)
        torch.testing.assert_close(ours, transformer_lens_scores(processed, kind), rtol=1e-4, atol=1e-6)
        # the gains matter, so the comparison above is not vacuous
        assert (ours - composition_scores_from_weights(head_weights(raw, fold_ln=False), kind)).abs().max() > 1e-3


def test_gqa_key_value_heads_are_shared_by_their_query_heads(tiny_llama):
    weights = head_weights(tiny_llama.model)
    assert (weights.n_kv_heads, weights.n_heads) == (2, 4)
    assert torch.equal(weights.W_K[:, 0], weights.W_K[:, 1]) and torch.equal(weights.W_V[:, 2], weights.W_V[:, 3])
    assert not torch.equal(weights.W_K[:, 1], weights.W_K[:, 2])
    # shared W_K, different W_Q: K-composition into heads of one group still differs
    k_scores = composition_scores_from_weights(weights, "k")
    assert not torch.allclose(k_scores[0, 0, 1, 0], k_scores[0, 0, 1, 1])


def test_random_baseline_is_about_one_over_root_d_model_and_reproducible():
    for d_model, d_head in [(64, 16), (256, 32)]:
        base = random_baseline(d_model, d_head, "k", n_heads=32)
        assert base.mean == pytest.approx(1 / math.sqrt(d_model), rel=0.05)
        assert 0 < base.std < 0.2 * base.mean and base.n_pairs == 32 * 32
        assert random_baseline(d_model, d_head, "k", n_heads=32) == base
        assert base.ratio(2 * base.mean) == pytest.approx(2.0)
        assert base.z(base.mean + 3 * base.std) == pytest.approx(3.0)


def _planted_weights(d_model=64, d_head=8, n_heads=3, seed=0):
    """Two layers of random heads, except that head 0.1 writes exactly into the key space of 1.2."""
    g = torch.Generator().manual_seed(seed)
    W = {n: torch.randn(2, n_heads, d_model, d_head, generator=g) for n in ("W_Q", "W_K", "W_V")}
    W_O = torch.randn(2, n_heads, d_head, d_model, generator=g)
    W["W_K"][1, 2] = W_O[0, 1].T  # 1.2 reads its keys from the subspace 0.1 writes to
    return HeadWeights(W_O=W_O, ln_folded=False, folding_note="", n_kv_heads=n_heads, **W)


def test_the_baseline_separates_a_planted_edge_from_chance():
    from headvis_core.circuits.composition import CompositionResult

    weights = _planted_weights()
    scores = {kind: composition_scores_from_weights(weights, kind) for kind in "qkv"}
    baselines = {kind: random_baseline(64, 8, kind) for kind in "qkv"}
    result = CompositionResult(scores=scores, baselines=baselines, ln_folded=False, folding_note="", n_layers=2,
                               n_heads=3, n_kv_heads=3, d_model=64, d_head=8)
    table = result.edges_table()
    top = table.sort_values("z", ascending=False).iloc[0]
    assert (top.sender, top.receiver, top.kind) == ("0.1", "1.2", "k")
    assert top.ratio > 2.5 and top.z > 10
    others = table[(table.sender != "0.1") | (table.receiver != "1.2") | (table.kind != "k")]
    assert others.ratio.between(0.5, 1.8).all() and abs(others.ratio.mean() - 1) < 0.15
    assert result.top_edges_into(HeadRef(1, 2), "k", 1).sender.tolist() == ["0.1"]


def test_compute_composition_on_a_model(tiny_gpt2):
    result = compute_composition(tiny_gpt2.model, "k,q", baseline_heads=16)
    assert result.kinds == ("q", "k") and result.ln_folded and result.n_layers == 2
    table = result.edges_table()
    assert len(table) == 2 * 4 * 4 and set(table.kind) == {"q", "k"}
    assert (table.receiver_layer > table.sender_layer).all()
    row = table.iloc[0]
    assert row.ratio == pytest.approx(row.score / result.baselines[row.kind].mean)


def test_io_scores_match_the_definition(tiny_gpt2):
    model = tiny_gpt2.model
    weights = head_weights(model, fold_ln=False)
    io = io_scores(model, weights, "k", baseline_heads=8)
    W_E, W_U = model.W_E.double(), model.W_U.double()
    reader = weights.W_K[1, 3].double() @ weights.W_Q[1, 3].double().T
    expected = torch.linalg.norm(W_E @ reader) / (torch.linalg.norm(W_E) * torch.linalg.norm(reader))
    assert io.embed["k"][1, 3].item() == pytest.approx(expected.item(), rel=1e-4)
    ov = weights.W_V[0, 2].double() @ weights.W_O[0, 2].double()
    expected = torch.linalg.norm(ov @ W_U) / (torch.linalg.norm(ov) * torch.linalg.norm(W_U))
    assert io.logits[0, 2].item() == pytest.approx(expected.item(), rel=1e-4)
    assert set(io.baselines) == {"embed-k", "logits"}


def test_one_layer_models_and_bad_kinds_are_refused():
    from headvis_core.models.loader import load_random_model
    from headvis_core.models.random_models import RandomModelSpec

    one_layer = load_random_model(RandomModelSpec(arch="gpt2", n_layers=1, n_heads=2, d_model=32))
    with pytest.raises(InputError, match="single layer"):
        compute_composition(one_layer.model)
    with pytest.raises(InputError, match="single layer"):
        check_composable(1)
    with pytest.raises(InputError, match="Unknown composition kind"):
        parse_kinds("q,x")
    with pytest.raises(InputError, match="No composition kinds"):
        parse_kinds(" , ")
    assert parse_kinds(["V", "q"]) == ("q", "v")


def test_smollm2_induction_heads_read_keys_from_a_previous_token_head(smollm2):
    """The closing note's finding: SmolLM2's top induction heads take their strongest K-composition from a
    previous-token head (16.0 on this model)."""
    from headvis_core.data.probes import repeated_random_tokens
    from headvis_core.lab.patterns import head_patterns

    model, info = smollm2.model, smollm2.info
    half = 16
    tokens = repeated_random_tokens(4, half, info.d_vocab, model.tokenizer.bos_token_id, seed=0, low=100)
    heads = all_heads(info.n_layers, info.n_heads)
    patterns = head_patterns(model, tokens, heads)
    queries = torch.arange(1 + half, 1 + 2 * half)
    induction = patterns[:, :, queries, queries - half + 1].mean(dim=(0, 2))
    previous = patterns[:, :, torch.arange(2, 1 + 2 * half), torch.arange(1, 2 * half)].mean(dim=(0, 2))
    result = compute_composition(model, "k")
    top_induction = [heads[i] for i in induction.argsort(descending=True)[:3]]
    assert induction[heads.index(top_induction[0])] > 0.6
    for head in top_induction:
        senders = result.top_edges_into(head, "k", 2)
        strongest_previous = max(previous[heads.index(HeadRef(int(r.sender_layer), int(r.sender_head)))].item()
                                 for r in senders.itertuples())
        assert strongest_previous > 0.6, (head, senders)
        assert senders.ratio.iloc[0] > 3
