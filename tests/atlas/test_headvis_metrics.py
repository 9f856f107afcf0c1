"""The HeadVis metric set and the direct copying score against slow per-head references."""

import math

import numpy as np
import pytest
import torch

from headvis_core.atlas.metrics import (
    HIGH_ATTENTION,
    PAIR_METRICS,
    SCORE_METRICS,
    attention_metrics,
    distance_moments,
    entropy_bits,
    high_attention_token_mass,
    score_metric_sums,
)
from headvis_core.attribution.linearise import frozen_norm
from headvis_core.models.loader import load_model

MODELS = ["tiny_gpt2", "tiny_llama", "tiny_gemma3"]


@pytest.fixture(scope="module")
def tiny_gemma3():
    return load_model("tiny-gemma3", device="cpu")


def masked_scores(batch, heads, n, window=None, seed=0):
    """Random scores with the causal (and optional sliding-window) mask filled as the bridge fills it."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, n, n, generator=generator) * 2
    pos = torch.arange(n)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    return scores.masked_fill(~allowed, torch.finfo(torch.float32).min)


def slow_score_metrics(scores):
    """Per head: mean over (batch, query >= 1) of std, top-1 minus top-2, (max - mean) / std of the allowed keys."""
    batch, heads, n, _ = scores.shape
    floor = torch.finfo(scores.dtype).min / 2
    out = {name: [0.0] * heads for name in SCORE_METRICS}
    for b in range(batch):
        for h in range(heads):
            for q in range(1, n):
                row = [float(s) for s in scores[b, h, q] if float(s) > floor]
                mean = sum(row) / len(row)
                std = math.sqrt(sum((s - mean) ** 2 for s in row) / len(row))
                ordered = sorted(row, reverse=True)
                out["logit_std"][h] += std
                out["top_logit_margin"][h] += ordered[0] - ordered[1] if len(row) > 1 else 0.0
                out["logit_z_score"][h] += (ordered[0] - mean) / std if std > 0 else 0.0
    return {name: np.array(values) / (batch * (n - 1)) for name, values in out.items()}


@pytest.mark.parametrize("window", [None, 4])
def test_score_metrics_equal_the_per_query_definitions(window):
    scores = masked_scores(2, 3, 12, window=window)
    sums, n_queries = score_metric_sums(scores)
    slow = slow_score_metrics(scores)
    assert n_queries == 2 * 11
    for name in SCORE_METRICS:
        np.testing.assert_allclose(sums[name].numpy() / n_queries, slow[name], rtol=1e-9, atol=1e-9, err_msg=name)


def slow_pair_metrics(patterns, tokens):
    """Per head, from every (query, key >= 1) pair: distance mean/variance, entropies at high-attention pairs."""
    heads = patterns[0].shape[0]
    out = {name: [] for name in PAIR_METRICS}
    for h in range(heads):
        mass = first = second = 0.0
        by_query, by_key = {}, {}
        for pattern, seq in zip(patterns, tokens):
            A, t = pattern[h].tolist(), seq.tolist()
            for q in range(len(t)):
                for k in range(1, q + 1):
                    a = A[q][k]
                    mass, first, second = mass + a, first + a * (q - k), second + a * (q - k) ** 2
                    if a >= HIGH_ATTENTION:
                        by_query[t[q]] = by_query.get(t[q], 0.0) + a
                        by_key[t[k]] = by_key.get(t[k], 0.0) + a
        mean = first / mass
        out["qk_distance"].append(mean)
        out["qk_distance_variance"].append(second / mass - mean ** 2)
        for name, counts in (("query_token_entropy", by_query), ("key_token_entropy", by_key)):
            total = sum(counts.values())
            out[name].append(-sum(c / total * math.log2(c / total) for c in counts.values()) if total else math.nan)
    return {name: np.array(values) for name, values in out.items()}


def test_pair_metrics_equal_the_per_pair_definitions():
    generator = torch.Generator().manual_seed(1)
    n = 10
    logits = torch.randn(2, 3, n, n, generator=generator, dtype=torch.float64) * 3
    A = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf).softmax(-1)
    tokens = torch.tensor([[0, 1, 2, 1, 3, 2, 1, 4, 5, 2], [0, 3, 3, 3, 4, 4, 1, 2, 3, 4]])
    mass, first, second = distance_moments(A)
    query_mass, key_mass = high_attention_token_mass(A, tokens, 6)
    slow = slow_pair_metrics(list(A), list(tokens))
    np.testing.assert_allclose((first / mass).numpy(), slow["qk_distance"], rtol=1e-9)
    np.testing.assert_allclose((second / mass - (first / mass) ** 2).numpy(), slow["qk_distance_variance"],
                               rtol=1e-9)
    np.testing.assert_allclose(entropy_bits(query_mass).numpy(), slow["query_token_entropy"], rtol=1e-5)
    np.testing.assert_allclose(entropy_bits(key_mass).numpy(), slow["key_token_entropy"], rtol=1e-5)
    assert torch.isnan(entropy_bits(torch.zeros(2, 5))).all()


@pytest.mark.parametrize("fixture", MODELS)
def test_attn_scores_hook_holds_masked_pre_softmax_scores(fixture, request):
    """What the score metrics read: softmax of hook_attn_scores is hook_pattern, and masked keys are at the
    dtype's minimum (the causal mask everywhere; Gemma 3's sliding window of 8 on layers 0-1 too)."""
    check_pre_softmax_scores(request.getfixturevalue(fixture).model, sliding=fixture == "tiny_gemma3")


def test_smollm2_attn_scores_hook_holds_masked_pre_softmax_scores(smollm2):
    check_pre_softmax_scores(smollm2.model, sliding=False)


def check_pre_softmax_scores(model, sliding):
    tokens = torch.randint(1, 200, (2, 20), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    pos = torch.arange(20)
    for layer in range(model.cfg.n_layers):
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        torch.testing.assert_close(scores.softmax(-1), pattern, rtol=0, atol=1e-6)
        expected = pos[None, :] <= pos[:, None]
        if sliding and layer < 2:
            expected &= pos[:, None] - pos[None, :] < 8
        masked = scores == torch.finfo(scores.dtype).min
        assert torch.equal(~masked, expected.expand_as(masked))
        assert (scores[~masked] < 0).any() and not torch.allclose(scores.exp().sum(-1), torch.ones(1))


def reference_from_cache(model, sequences):
    """run_with_cache per sequence, then the slow per-head definitions on the cached scores and patterns."""
    n_layers = model.cfg.n_layers
    per_layer = {name: [] for name in SCORE_METRICS + PAIR_METRICS}
    caches = [model.run_with_cache(seq)[1] for seq in sequences]
    for layer in range(n_layers):
        score_sums = {name: 0.0 for name in SCORE_METRICS}
        n_queries = 0
        for seq, cache in zip(sequences, caches):
            slow = slow_score_metrics(cache[f"blocks.{layer}.attn.hook_attn_scores"])
            for name in SCORE_METRICS:
                score_sums[name] = score_sums[name] + slow[name] * (seq.shape[1] - 1)
            n_queries += seq.shape[1] - 1
        for name in SCORE_METRICS:
            per_layer[name].append(score_sums[name] / n_queries)
        pairs = slow_pair_metrics([c[f"blocks.{layer}.attn.hook_pattern"][0].double() for c in caches],
                                  [seq[0] for seq in sequences])
        for name in PAIR_METRICS:
            per_layer[name].append(pairs[name])
    return {name: np.stack(values) for name, values in per_layer.items()}


@pytest.mark.parametrize("fixture", MODELS)
def test_batched_headvis_metrics_equal_the_cache_reference(fixture, request):
    model = request.getfixturevalue(fixture).model
    generator = torch.Generator().manual_seed(2)
    sequences = [torch.randint(1, 40, (1, n), generator=generator) for n in (14, 14, 14, 9)]
    fast = attention_metrics(model, sequences, None, batch_size=2)
    slow = reference_from_cache(model, sequences)
    for name in SCORE_METRICS + PAIR_METRICS:
        np.testing.assert_allclose(fast.values[name], slow[name], rtol=1e-4, atol=1e-6, err_msg=name)


def slow_direct_copying(model, sequences):
    """Per head: every (query, key >= 1) pair's logit rise through the full W_U and the frozen norms, one by one."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    W_O = model.W_O.detach().double()
    W_U = model.W_U.detach().double()
    numerator = np.zeros((n_layers, n_heads))
    mass = np.zeros((n_layers, n_heads))
    for seq in sequences:
        _, cache = model.run_with_cache(seq)
        final = frozen_norm(model.ln_final, cache["ln_final.hook_scale"][0])  # scale [pos, 1]
        t = seq[0].tolist()
        for layer in range(n_layers):
            z = cache[f"blocks.{layer}.attn.hook_z"][0].double()  # [pos, head, d_head]
            A = cache[f"blocks.{layer}.attn.hook_pattern"][0].double()
            for head in range(n_heads):
                out = z[:, head] @ W_O[layer, head]  # [pos, d_model]
                if f"blocks.{layer}.ln1_post.hook_scale" in cache:
                    post = frozen_norm(model.blocks[layer].ln1_post, cache[f"blocks.{layer}.ln1_post.hook_scale"][0])
                    out = post.apply(out)
                logits = final.apply(out) @ W_U  # [pos, vocab]
                for q in range(1, len(t)):
                    context = [float(logits[q, t[j]]) for j in range(1, q + 1)]
                    mean = sum(context) / q
                    for k in range(1, q + 1):
                        numerator[layer, head] += float(A[head, q, k]) * (context[k - 1] - mean)
                        mass[layer, head] += float(A[head, q, k])
    return numerator / mass


@pytest.mark.parametrize("fixture", MODELS)
def test_direct_copying_equals_the_full_vocabulary_reference(fixture, request):
    model = request.getfixturevalue(fixture).model
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(1, 60, (1, 12), generator=generator) for _ in range(3)]
    fast = attention_metrics(model, sequences, None, batch_size=2).values["direct_copying"]
    slow = slow_direct_copying(model, sequences)
    assert np.abs(slow).max() > 0
    np.testing.assert_allclose(fast, slow, rtol=1e-3, atol=1e-4 * np.abs(slow).max())


def test_smollm2_direct_copying_singles_out_the_layer_23_heads(smollm2):
    """On the built-in prompts, 23.4, 23.1 and 23.5 copy what they attend to into the logits (0.39, 0.30, 0.28
    logits with 64 prompts; a shuffled-heads baseline stays under 0.094), while the OV score ranks most late
    heads near 1 (tied embeddings)."""
    from headvis_core.atlas.run import builtin_probe_set

    model = smollm2.model
    probe = builtin_probe_set(model)  # the calibration's probe: every built-in prompt, about 1,700 tokens
    values = attention_metrics(model, probe.sequences, None, batch_size=16).values
    copying = values["direct_copying"]
    top = [tuple(int(i) for i in np.unravel_index(index, copying.shape)) for index in np.argsort(copying.ravel())[-5:]]
    assert top[-1] == (23, 4) and copying[23, 4] > 0.3
    assert sum(layer == 23 for layer, _ in top) >= 3 and np.median(copying) < 0.02
    for name in SCORE_METRICS + PAIR_METRICS:
        assert np.isfinite(values[name]).all(), name


def test_high_attention_mass_counts_a_weight_exactly_at_the_threshold_and_none_below():
    below = float(torch.nextafter(torch.tensor(HIGH_ATTENTION), torch.tensor(0.0)))
    pattern = torch.zeros(1, 1, 3, 3)
    pattern[0, 0, 1] = torch.tensor([1 - HIGH_ATTENTION, HIGH_ATTENTION, 0.0])
    pattern[0, 0, 2] = torch.tensor([1 - below, 0.0, below])
    query_mass, key_mass = high_attention_token_mass(pattern, torch.tensor([[0, 7, 9]]), n_ids=10)
    assert key_mass[0].tolist() == pytest.approx([0.0] * 7 + [HIGH_ATTENTION, 0.0, 0.0])
    assert query_mass[0, 7] == pytest.approx(HIGH_ATTENTION) and query_mass[0, 9] == 0
