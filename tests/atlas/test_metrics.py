import math

import numpy as np
import pytest
import torch
from transformer_lens.head_detector import detect_head

from headvis_core.atlas.metrics import (
    ATTENTION_METRICS,
    SCORE_METRICS,
    attention_metrics,
    earlier_occurrences,
    for_each_layer_pattern,
    induction_sums,
    layer_patterns,
    received_attention,
    text_metric_sums,
)
from headvis_core.data.probes import InductionProbe, induction_probe


def random_patterns(batch, heads, n, seed=0):
    """Causal attention patterns with peaked, uneven rows (so a swapped index would show)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, n, n, generator=generator, dtype=torch.float64) * 3
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return logits.masked_fill(~mask, -math.inf).softmax(-1)


def slow_text_metrics(A, tokens):
    """Per-head sums and counts of every text metric, one query at a time (the definitions, literally)."""
    batch, heads, n, _ = A.shape
    A, tokens = A.tolist(), tokens.tolist()  # plain Python numbers: the loops below are the definitions
    names = ["previous_token", "duplicate_token", "attention_sink", "self_attention", "entropy", "mean_distance",
             "max_attention_no_bos", "local_attention"]
    sums = {name: [0.0] * heads for name in names}
    counts = {name: 0 for name in names}
    for b in range(batch):
        for q in range(1, n):
            row_tokens = tokens[b]
            has_earlier = any(row_tokens[k] == row_tokens[q] for k in range(q))
            for name in names:
                if name != "duplicate_token" or has_earlier:
                    counts[name] += 1
            for h in range(heads):
                row = A[b][h][q][:q + 1]
                sums["previous_token"][h] += row[q - 1]
                sums["self_attention"][h] += row[q]
                sums["attention_sink"][h] += row[0]
                sums["entropy"][h] += -sum(p * math.log(p) for p in row if p > 0) / math.log(q + 1)
                sums["mean_distance"][h] += sum(p * (q - k) for k, p in enumerate(row))
                sums["max_attention_no_bos"][h] += max(row[1:])
                sums["local_attention"][h] += sum(row[k] for k in range(max(1, q - 3), q + 1))
                if has_earlier:
                    sums["duplicate_token"][h] += sum(row[k] for k in range(q) if row_tokens[k] == row_tokens[q])
    return sums, counts


def test_text_metric_sums_equal_the_per_query_definitions():
    A = random_patterns(3, 2, 11)
    tokens = torch.tensor([[9, 1, 2, 1, 3, 2, 1, 4, 5, 6, 2], [9, 7, 7, 7, 8, 8, 1, 2, 3, 4, 5],
                           [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11]])
    fast, counts = text_metric_sums(A, tokens)
    slow, slow_counts = slow_text_metrics(A, tokens)
    assert set(fast) == set(slow)
    for name in slow:
        np.testing.assert_allclose(fast[name].double().numpy(), slow[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert counts[name] == slow_counts[name], name
    # the shared mask gives the same answer
    again, _ = text_metric_sums(A, tokens, earlier_occurrences(tokens))
    torch.testing.assert_close(again["duplicate_token"], fast["duplicate_token"])


@pytest.mark.parametrize("prefix", [0, 1])
def test_induction_sums_are_the_second_copy_stripe(prefix):
    half = 5
    A = random_patterns(2, 3, prefix + 2 * half, seed=1)
    fast, count = induction_sums(A, half, prefix)
    slow = [0.0] * 3
    for b in range(2):
        for k in range(half):  # the k-th token of the second copy ...
            q = prefix + half + k
            for h in range(3):
                slow[h] += float(A[b, h, q, prefix + k + 1])  # ... attends to the token after its first occurrence
    np.testing.assert_allclose(fast.double().numpy(), slow, rtol=1e-6)
    assert count == 2 * half


def test_received_attention_adds_up_per_token_id():
    A = random_patterns(2, 2, 6, seed=2)
    tokens = torch.tensor([[0, 3, 4, 3, 5, 3], [0, 4, 4, 1, 2, 3]])
    fast = received_attention(A, tokens, n_ids=7)
    slow = torch.zeros(2, 7, dtype=torch.float64)
    for b in range(2):
        for q in range(1, 6):
            for k in range(1, q + 1):
                slow[:, tokens[b, k]] += A[b, :, q, k]
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-6)


PATTERN_METRICS = tuple(name for name in ATTENTION_METRICS if name not in SCORE_METRICS)  # scores: own tests


def reference_metrics(model, sequences, probe):
    """Full run_with_cache per sequence, then Python loops per head: the naive way."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sums = {name: np.zeros((n_layers, n_heads)) for name in PATTERN_METRICS}
    counts = {name: 0 for name in PATTERN_METRICS}
    patterns = []  # per sequence: [layer, head, q, k]
    for seq in sequences:
        _, cache = model.run_with_cache(seq)
        patterns.append(torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0] for layer in range(n_layers)]))
        for layer in range(n_layers):
            slow, slow_counts = slow_text_metrics(cache[f"blocks.{layer}.attn.hook_pattern"].double(), seq)
            for name, values in slow.items():
                sums[name][layer] += values
                counts[name] += slow_counts[name] if layer == 0 else 0
    _, cache = model.run_with_cache(probe.tokens)
    L, p = probe.half_len, probe.prefix_len
    for layer in range(n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        for h in range(n_heads):
            sums["induction"][layer, h] = sum(float(pattern[b, h, p + L + k, p + k + 1])
                                              for b in range(pattern.shape[0]) for k in range(L))
    counts["induction"] = probe.tokens.shape[0] * L
    return {name: sums[name] / counts[name] for name in PATTERN_METRICS}, patterns


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_batched_metrics_equal_full_cache_python_loops(fixture, request):
    model = request.getfixturevalue(fixture).model
    sequences = [model.to_tokens(text) for text in ("the cat sat on the mat, the cat sat", "abc abd abc abd",
                                                    "to be or not to be")]
    sequences.append(model.to_tokens("a different one, equal length")[:, :sequences[1].shape[1]])
    probe = induction_probe(model, n_seqs=3, half_len=6, seed=3)
    fast = attention_metrics(model, sequences, probe, batch_size=2)
    slow, patterns = reference_metrics(model, sequences, probe)
    for name in PATTERN_METRICS:
        np.testing.assert_allclose(fast.values[name], slow[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert fast.values["previous_token"].shape == (model.cfg.n_layers, model.cfg.n_heads)
    # top attended tokens: each head's share of attention (positions >= 1) per token id
    received = {}
    for seq, pattern_of_seq in zip(sequences, patterns):
        for layer in range(model.cfg.n_layers):
            pattern = pattern_of_seq[layer]
            for head in range(model.cfg.n_heads):
                column_sums = pattern[head, 1:, :].sum(0).tolist()  # attention each key position received
                for k in range(1, seq.shape[1]):
                    key = (layer, head, int(seq[0, k]))
                    received[key] = received.get(key, 0.0) + column_sums[k]
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            mine = {key[2]: v for key, v in received.items() if key[:2] == (layer, head)}
            total = sum(mine.values())
            shares = sorted((v / total for v in mine.values()), reverse=True)
            ids, ours = fast.top_token_ids[layer, head], fast.top_token_shares[layer, head]
            np.testing.assert_allclose(ours, [mine[int(i)] / total for i in ids], rtol=1e-4)
            np.testing.assert_allclose(ours, shares[:len(ours)], rtol=1e-4)


def detect_head_identities(model, text, induction_text):
    """Our metrics rescaled to detect_head's "mul" normalisation, and detect_head itself, on one prompt each."""
    tokens = model.to_tokens(text)
    n = tokens.shape[1]
    n_dup = int((earlier_occurrences(tokens).sum(-1) > 0).sum())
    ours = attention_metrics(model, [tokens], None).values
    rep = model.to_tokens(induction_text)
    half = (rep.shape[1] - 1) // 2
    assert torch.equal(rep[0, 1:half + 1], rep[0, half + 1:]), "the induction text must tokenize as r r"
    assert len(set(rep[0, 1:half + 1].tolist())) == half, "its tokens must be distinct"
    probe = InductionProbe(tokens=rep, half_len=half, prefix_len=1)
    ours_ind = attention_metrics(model, [], probe).values["induction"]
    pairs = [
        (ours["previous_token"] * (n - 1) / n, detect_head(model, text, "previous_token_head")),
        (ours["duplicate_token"] * n_dup / n, detect_head(model, text, "duplicate_token_head")),
        (ours_ind * half / (2 * half + 1), detect_head(model, induction_text, "induction_head")),
    ]
    return pairs


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_agrees_with_transformer_lens_detect_head(fixture, request):
    model = request.getfixturevalue(fixture).model
    for ours, theirs in detect_head_identities(model, "the cat and the dog and the cat", "qwertyuiopasdfgh" * 2):
        np.testing.assert_allclose(ours, theirs.double().numpy(), atol=1e-5)


def test_agrees_with_detect_head_on_smollm2(smollm2):
    model = smollm2.model
    words = " apple river window seven purple garden thunder castle"
    pairs = detect_head_identities(model, "When Mary and John went to the store, John gave a drink to Mary.",
                                   words * 2)
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, theirs.double().numpy(), atol=1e-5)
    assert max(float(theirs.max()) for _, theirs in pairs) > 0.3  # real structure, not a uniform-attention tie


def test_only_pattern_hooks_run_and_the_pass_stops_after_the_last_pattern(tiny_gpt2):
    model = tiny_gpt2.model
    tokens = model.to_tokens("stop early please")
    seen, later = [], []
    handles = [model.blocks[-1].mlp.register_forward_hook(lambda *args: later.append("mlp")),
               model.unembed.register_forward_hook(lambda *args: later.append("unembed"))]
    try:
        for_each_layer_pattern(model, tokens, lambda layer, pattern: seen.append((layer, tuple(pattern.shape))))
    finally:
        for handle in handles:
            handle.remove()
    n = tokens.shape[1]
    assert seen == [(layer, (1, 4, n, n)) for layer in range(2)]
    assert later == []
    assert not any(h._forward_hooks for h in model.hook_dict.values())  # our hooks are gone
    full = layer_patterns(model, tokens)
    _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(full[1], cache["blocks.1.attn.hook_pattern"][0])


def test_smollm2_known_induction_and_previous_token_heads_stand_out(smollm2):
    from headvis_core.atlas.run import builtin_probe_set

    model = smollm2.model
    probe = builtin_probe_set(model, n_seqs=12, seq_len=64)
    metrics = attention_metrics(model, probe.sequences, induction_probe(model, 4, 24, seed=0), batch_size=4)
    induction, previous = metrics.values["induction"], metrics.values["previous_token"]
    # 18.6 is SmolLM2-135M's strongest induction head and 16.0 its strongest previous-token head
    # (found with the atlas on 32 windows of Gutenberg text: 0.89 and 0.78).
    assert np.unravel_index(induction.argmax(), induction.shape) == (18, 6)
    assert induction[18, 6] > 0.7 and induction[18, 6] > 50 * np.median(induction)
    assert induction[18, 6] - np.sort(induction.ravel())[-6] > 0.2
    assert np.unravel_index(previous.argmax(), previous.shape) == (16, 0)
    assert previous[16, 0] > 0.6 and previous[16, 0] > 5 * np.median(previous)
    assert previous[16, 0] - np.sort(previous.ravel())[-3] > 0.1
