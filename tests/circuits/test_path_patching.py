import pytest
import torch

from headvis_core.circuits.path_patching import Edge, mean_logit_difference, path_patch
from headvis_core.data.prompt_pairs import induction_prompt_pairs, pairs_from_tokens
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef


def _sharpened(name: str, factor: float = 4.0):
    """A fresh random model with its weight matrices scaled up: sharper attention and logit differences
    that move by 0.01-0.5 when an edge is patched (the plain random init moves them by 1e-5)."""
    from headvis_core.models.loader import load_model

    model = load_model(name, device="cpu").model
    with torch.no_grad():
        for parameter in model.original_model.parameters():
            if parameter.ndim >= 2:
                parameter.mul_(factor)
    return model


@pytest.fixture(scope="module")
def sharp_gpt2():
    return _sharpened("tiny-gpt2")


@pytest.fixture(scope="module")
def sharp_llama():
    return _sharpened("tiny-llama")


def _random_pairs(n=3, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 256, (n, length), generator=g)
    clean[:, 0] = 256
    corrupted = clean.clone()
    corrupted[:, 1:length - 2] = torch.randint(0, 256, (n, length - 3), generator=g)
    answer = torch.randint(0, 256, (n,), generator=g)
    alternative = torch.randint(0, 256, (n,), generator=g)
    return pairs_from_tokens(list(clean), list(corrupted), answer.tolist(), alternative.tolist())


def _metric(pairs):
    return lambda logits: mean_logit_difference(logits, pairs.padded())[0]


def _caches(model, pairs):
    _, clean = model.run_with_cache(pairs.padded().clean)
    _, corrupted = model.run_with_cache(pairs.padded().corrupted)
    return clean, corrupted


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_multi_head_edges_equal_transformer_lens_direct_path_patching(sharp_gpt2, kind):
    from transformer_lens.patching import get_act_patch_direct_path

    model, pairs = sharp_gpt2, _random_pairs()
    edges = [Edge(HeadRef(0, s), HeadRef(1, r), kind) for s in range(4) for r in range(4)]
    ours = path_patch(model, pairs, edges, direction="denoising", max_rows=12)  # several chunks
    clean, corrupted = _caches(model, pairs)
    for sender in range(4):
        theirs = get_act_patch_direct_path(model, pairs.padded().corrupted, clean, corrupted, _metric(pairs), 0, sender,
                                           component=kind, verbose=False)[1]
        mine = ours.table[ours.table.sender == f"0.{sender}"].sort_values("receiver")
        assert mine.patched.to_numpy() == pytest.approx(theirs.numpy(), abs=1e-5)
        assert mine.effect.to_numpy() == pytest.approx((theirs - ours.corrupted_metric).numpy(), abs=1e-5)
    assert ours.table.effect.abs().max() > 0.01  # the comparison is not between unpatched runs


def test_noising_is_denoising_with_the_prompt_sets_swapped(sharp_gpt2):
    from transformer_lens.patching import get_act_patch_direct_path

    model, pairs = sharp_gpt2, _random_pairs(seed=1)
    edges = [Edge(HeadRef(0, 2), HeadRef(1, r), "v") for r in range(4)]
    ours = path_patch(model, pairs, edges, direction="noising")
    clean, corrupted = _caches(model, pairs)
    theirs = get_act_patch_direct_path(model, pairs.padded().clean, corrupted, clean, _metric(pairs), 0, 2,
                                       component="v",
                                       verbose=False)[1]
    assert ours.table.patched.to_numpy() == pytest.approx(theirs.numpy(), abs=1e-5)
    assert ours.table.effect.abs().max() > 0.01
    assert ours.base_metric == ours.clean_metric
    gap = ours.clean_metric - ours.corrupted_metric
    assert ours.table.normalized.to_numpy() == pytest.approx((ours.table.effect / gap).to_numpy())


def _manual_edge(model, pairs, edge, direction="denoising"):
    """Direct two-run computation of one edge on a Llama (RMSNorm, rotary, GQA) model, without the Q/K/V
    forks: run 1 recomputes the receiver layer's q, k or v from ln1(resid + delta) by hand and keeps head B's
    output; run 2 puts that output into the base run at head B only."""
    padded = pairs.padded()
    base, source = (padded.corrupted, padded.clean) if direction == "denoising" else (padded.clean, padded.corrupted)
    sender, receiver = edge.sender, edge.receiver
    z_name = f"blocks.{sender.layer}.attn.hook_z"
    _, base_cache = model.run_with_cache(base)
    _, source_cache = model.run_with_cache(source)
    W_O = model.blocks[sender.layer].attn.W_O[sender.head]
    delta = (source_cache[z_name][:, :, sender.head] - base_cache[z_name][:, :, sender.head]) @ W_O
    resid = base_cache[f"blocks.{receiver.layer}.hook_resid_pre"]
    attn = model.blocks[receiver.layer].attn
    normed = model.blocks[receiver.layer].ln1.original_component(resid + delta)
    weight = {"q": attn.W_Q, "k": attn.W_K, "v": attn.W_V}[edge.kind]  # [heads or kv heads, d_model, d_head]
    index = receiver.head if edge.kind == "q" else receiver.head // (model.cfg.n_heads // weight.shape[0])
    projected = normed @ weight[index]

    def replace(tensor, hook):
        tensor = tensor.clone()
        tensor[:, :, index] = projected
        return tensor

    kept = {}
    model.run_with_hooks(base, fwd_hooks=[
        (f"blocks.{receiver.layer}.attn.hook_{edge.kind}", replace),
        (f"blocks.{receiver.layer}.attn.hook_z", lambda z, hook: kept.update(z=z[:, :, receiver.head].clone()))])

    def put(z, hook):
        z = z.clone()
        z[:, :, receiver.head] = kept["z"]
        return z

    logits = model.run_with_hooks(base, fwd_hooks=[(f"blocks.{receiver.layer}.attn.hook_z", put)])
    return float(mean_logit_difference(logits, padded)[0])


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_grouped_query_edges_equal_a_direct_two_run_computation(sharp_llama, kind):
    model, pairs = sharp_llama, _random_pairs(seed=2)
    edges = [Edge(HeadRef(0, 3), HeadRef(1, r), kind) for r in range(4)]  # heads 0,1 and 2,3 share KV heads
    ours = path_patch(model, pairs, edges, direction="denoising")
    for edge, patched in zip(edges, ours.table.patched):
        assert patched == pytest.approx(_manual_edge(model, pairs, edge), abs=1e-5)
    assert ours.table.effect.abs().max() > 0.005
    if kind != "q":  # query heads sharing a KV head still get their own edge strength
        assert ours.table.patched.iloc[0] != pytest.approx(ours.table.patched.iloc[1], abs=1e-4)


def test_right_padding_does_not_change_the_numbers(sharp_gpt2):
    model = sharp_gpt2
    a, b = _random_pairs(1, 8, seed=3), _random_pairs(1, 11, seed=4)
    both = pairs_from_tokens(a.tokens + b.tokens, a.corrupted_tokens + b.corrupted_tokens,
                             a.target_ids + b.target_ids, a.alternative_ids + b.alternative_ids)
    edges = [Edge(HeadRef(0, 1), HeadRef(1, 2), "k"), Edge(HeadRef(0, 0), HeadRef(1, 0), "q")]
    together = path_patch(model, both, edges)
    alone = [path_patch(model, pairs, edges) for pairs in (a, b)]
    expected = (alone[0].table.patched + alone[1].table.patched) / 2
    assert together.table.patched.to_numpy() == pytest.approx(expected.to_numpy(), abs=1e-5)
    assert together.clean_metric == pytest.approx((alone[0].clean_metric + alone[1].clean_metric) / 2, abs=1e-5)


def test_the_shared_model_is_left_as_it_was(tiny_llama):
    model, pairs = tiny_llama.model, _random_pairs(seed=5)
    before = model(pairs.padded().clean)
    path_patch(model, pairs, [Edge(HeadRef(0, 0), HeadRef(1, 1), "k")])
    assert not model.cfg.use_split_qkv_input
    assert not any(hook_point.fwd_hooks for hook_point in model.hook_dict.values())
    torch.testing.assert_close(model(pairs.padded().clean), before)


def test_bad_edges_and_prompts_are_refused(tiny_gpt2):
    model, pairs = tiny_gpt2.model, _random_pairs()
    cases = [([Edge(HeadRef(1, 0), HeadRef(1, 2), "q")], "later layer"),
             ([Edge(HeadRef(0, 0), HeadRef(1, 7), "q")], "out of range"),
             ([Edge(HeadRef(0, 0), HeadRef(1, 1), "x")], "q, k or v"),
             ([], "No edges")]
    for edges, message in cases:
        with pytest.raises(InputError, match=message):
            path_patch(model, pairs, edges)
    with pytest.raises(InputError, match="direction"):
        path_patch(model, pairs, [Edge(HeadRef(0, 0), HeadRef(1, 1), "q")], direction="sideways")
    with pytest.raises(InputError, match="aligned token for token"):
        pairs_from_tokens([torch.arange(5)], [torch.arange(6)], [1], [2])
    with pytest.raises(InputError, match="at least one"):
        induction_prompt_pairs(model, 0)


def test_smollm2_induction_edge_from_the_previous_token_head_matters(smollm2):
    """Path patching confirms the strongest K-composition edge into induction head 18.6 (from 16.0), and
    not a weak one (3.2 -> 18.6)."""
    model = smollm2.model
    pairs = induction_prompt_pairs(model, 2, 8, seed=0)
    edges = [Edge(HeadRef(16, 0), HeadRef(18, 6), "k"), Edge(HeadRef(3, 2), HeadRef(18, 6), "k")]
    result = path_patch(model, pairs, edges)
    assert result.clean_metric - result.corrupted_metric > 3
    strong, weak = result.table.normalized
    assert strong < -0.1 and abs(weak) < 0.03
