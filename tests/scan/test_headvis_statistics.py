"""The HeadVis metrics as scan statistics, against a slow reference over the scan's own windows and the atlas.

The reference captures ``hook_attn_scores`` and ``hook_pattern`` of every layer (windows batched as in the
scan), finds the keys a query may see from the causal mask and the layer's sliding window (not from the
scores), and computes every statistic by explicit loops over windows, heads, queries and keys.
"""

import math
import random

import numpy as np
import pytest
import torch

from headvis_core.atlas.metrics import HIGH_ATTENTION, attention_metrics
from headvis_core.attribution.edge import sliding_window
from headvis_core.data.corpus import iter_windows, open_corpus
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.hooks import capture, pattern_hook
from headvis_core.models.loader import load_model
from headvis_core.scan import ScanParams, list_scans, run_scan
from headvis_core.scan.result import SCAN_METRIC_DESCRIPTIONS, ScanResult
from headvis_core.scan.run import reduce_layer_scores
from headvis_core.scan.shards import with_bos
from headvis_core.scan.store import read_stage, write_stage
from headvis_core.tokens import bos_token_id
from tests.conftest import interrupted_scan

WINDOW, N_WINDOWS, BATCH = 12, 16, 4
SIDES = ("query", "key")


@pytest.fixture(scope="module")
def tiny_gemma3():
    return load_model("tiny-gemma3", device="cpu")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """Random words over a large alphabet: many distinct byte tokens, so small summaries must prune."""
    rng = random.Random(2)
    root = tmp_path_factory.mktemp("headvis_corpus")
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 6))) for _ in range(200)]
    (root / "a.txt").write_text(" ".join(words))
    return root


def scan_params(**changes):
    base = dict(window_len=WINDOW, max_windows=N_WINDOWS, examples_per_decile=1, top_examples=2, top_k_keys=2,
                reservoir_size=8, histogram_bins=256, shard_windows=8)
    return ScanParams(**{**base, **changes})


def scan_windows(loaded, text_dir):
    """The scan's windows ``[windows, pos]``, BOS first where the model uses one."""
    windows = [w.tokens for w in iter_windows(open_corpus(str(text_dir)), loaded.model.tokenizer, WINDOW, N_WINDOWS)]
    return with_bos(np.array(windows), bos_token_id(loaded.model))


def entropy_of(mass: dict[int, float]) -> float:
    total = sum(mass.values())
    if total == 0:
        return math.nan
    return -sum(m / total * math.log2(m / total) for m in mass.values() if m > 0)


def slow_reference(loaded, seqs):
    """Every HeadVis statistic per head ``{metric: [layer * n_heads + head]}`` by explicit loops."""
    model = loaded.model
    n_layers, n_heads = loaded.info.n_layers, loaded.info.n_heads
    names = [f"blocks.{layer}.attn.hook_attn_scores" for layer in range(n_layers)]
    names += [pattern_hook(layer) for layer in range(n_layers)]
    scores, patterns = [], []
    for start in range(0, len(seqs), BATCH):
        _, cache = capture(model, seqs[start:start + BATCH], names)
        scores.append(torch.stack([cache[names[layer]].float() for layer in range(n_layers)], dim=1))
        patterns.append(torch.stack([cache[pattern_hook(layer)].float() for layer in range(n_layers)], dim=1))
    S, A = torch.cat(scores).double().numpy(), torch.cat(patterns).double().numpy()
    tokens = seqs.numpy()
    n_windows, n = tokens.shape
    out = {name: np.zeros(n_layers * n_heads) for name in SCAN_METRIC_DESCRIPTIONS}
    for layer in range(n_layers):
        window = sliding_window(model, layer)
        for head in range(n_heads):
            row_index = layer * n_heads + head
            std_sum = margin_sum = z_sum = 0.0
            mass = first = 0.0
            pairs = []  # (distance, attention) with key >= 1
            high = {"query": {}, "key": {}}
            for w in range(n_windows):
                for q in range(1, n):
                    keys = [k for k in range(q + 1) if window is None or q - k < window]
                    row = [S[w, layer, head, q, k] for k in keys]
                    mean = sum(row) / len(row)
                    std = math.sqrt(sum((s - mean) ** 2 for s in row) / len(row))
                    ordered = sorted(row, reverse=True)
                    std_sum += std
                    margin_sum += ordered[0] - ordered[1] if len(row) > 1 else 0.0
                    z_sum += (ordered[0] - mean) / std if std > 0 else 0.0
                    for k in range(1, q + 1):
                        a = A[w, layer, head, q, k]
                        pairs.append((q - k, a))
                        mass += a
                        first += a * (q - k)
                        if np.float32(a) >= np.float32(HIGH_ATTENTION):
                            high["query"][tokens[w, q]] = high["query"].get(tokens[w, q], 0.0) + a
                            high["key"][tokens[w, k]] = high["key"].get(tokens[w, k], 0.0) + a
            queries = n_windows * (n - 1)
            out["logit_std"][row_index] = std_sum / queries
            out["top_logit_margin"][row_index] = margin_sum / queries
            out["logit_z_score"][row_index] = z_sum / queries
            mean_distance = first / mass
            out["qk_distance"][row_index] = mean_distance
            out["qk_distance_variance"][row_index] = sum(a * (d - mean_distance) ** 2 for d, a in pairs) / mass
            for side in SIDES:
                out[f"{side}_token_entropy"][row_index] = entropy_of(high[side])
    return out


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama", "tiny_gemma3"])
def scanned(request, text_dir, tmp_path_factory):
    loaded = request.getfixturevalue(request.param)
    result = run_scan(loaded, open_corpus(str(text_dir)), scan_params(), out_dir=tmp_path_factory.mktemp("scans"),
                      batch_size=BATCH)
    seqs = scan_windows(loaded, text_dir)
    return loaded, result, seqs, slow_reference(loaded, seqs)


def test_every_statistic_equals_the_slow_reference(scanned):
    loaded, result, seqs, reference = scanned
    assert result.n_windows == N_WINDOWS
    summary = result.head_summary()
    for name in SCAN_METRIC_DESCRIPTIONS:
        assert np.isfinite(reference[name]).all(), name  # every head has high-attention pairs here
        assert summary[name].to_numpy() == pytest.approx(reference[name], rel=1e-6, abs=1e-6), name
    for side in SIDES:  # few distinct tokens: the summaries hold them all
        assert summary[f"{side}_token_entropy_exact"].all()
        assert (summary[f"{side}_token_entropy_error"] == 0).all()
    assert summary["qk_distance"].to_numpy() == pytest.approx(summary["mean_distance"].to_numpy(), rel=1e-12)


def test_every_statistic_equals_the_atlas_over_the_same_windows(scanned):
    loaded, result, seqs, _ = scanned
    atlas = attention_metrics(loaded.model, [seqs], None, batch_size=BATCH, direct_copying=False)
    summary = result.head_summary()
    for name in SCAN_METRIC_DESCRIPTIONS:
        assert summary[name].to_numpy() == pytest.approx(atlas.values[name].reshape(-1), rel=1e-6, abs=1e-6), name


def test_sliding_window_layers_exclude_the_keys_they_cannot_see(tiny_gemma3, text_dir):
    """On tiny-gemma3 (window 8 on layers 0-1, 13 positions) the scores of masked keys are at the dtype's minimum:
    the slow reference, which masks by position, agrees with the scan only if the scan excludes them too."""
    seqs = scan_windows(tiny_gemma3, text_dir)[:2]
    _, cache = capture(tiny_gemma3.model, seqs, ["blocks.0.attn.hook_attn_scores"])
    scores = cache["blocks.0.attn.hook_attn_scores"]
    assert sliding_window(tiny_gemma3.model, 0) == 8 and scores.shape[-1] == WINDOW + 1
    assert float(scores[0, 0, 12, 4]) == torch.finfo(scores.dtype).min  # q - k = 8: outside the window
    assert float(scores[0, 0, 12, 5]) > torch.finfo(scores.dtype).min / 2


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma3"])
def test_token_entropies_of_a_pruned_summary_are_flagged_and_within_their_bound(request, text_dir, tmp_path,
                                                                                model):
    loaded = request.getfixturevalue(model)
    seqs = scan_windows(loaded, text_dir)
    reference = slow_reference(loaded, seqs)
    result = run_scan(loaded, open_corpus(str(text_dir)), scan_params(token_capacity=3), out_dir=tmp_path,
                      batch_size=BATCH)
    summary = result.head_summary()
    for side in SIDES:
        exact = summary[f"{side}_token_entropy_exact"].to_numpy()
        error = summary[f"{side}_token_entropy_error"].to_numpy()
        estimate, truth = summary[f"{side}_token_entropy"].to_numpy(), reference[f"{side}_token_entropy"]
        assert not exact.all()  # 3 counters cannot hold every head's high-attention tokens
        assert np.array_equal(exact, result.arrays["high_slack"][(slice(None, len(exact)) if side == "query"
                                                                  else slice(len(exact), None))] == 0)
        assert estimate[exact] == pytest.approx(truth[exact], rel=1e-6, abs=1e-6)
        assert (error[exact] == 0).all() and (error[~exact] > 0).all()
        assert (np.abs(estimate[~exact] - truth[~exact]) <= error[~exact] + 1e-9).all()
        assert (error <= np.log2(len(result.arrays["token_ids"])) + 1).all()


def test_a_scan_stored_before_these_statistics_still_opens(tiny_gpt2, text_dir, tmp_path):
    result = run_scan(tiny_gpt2, open_corpus(str(text_dir)), scan_params(), out_dir=tmp_path, batch_size=BATCH)
    old = {name: array for name, array in result.arrays.items()
           if name not in ("score_sum", "high_ids", "high_totals", "high_slack", "high_weight")}
    summary = ScanResult(old, result.meta).head_summary()
    for name in ("logit_std", "top_logit_margin", "logit_z_score", "query_token_entropy", "key_token_entropy"):
        assert summary[name].isna().all(), name
    assert not summary["key_token_entropy_exact"].any()
    # the distances come from the distance histogram every scan has
    assert summary["qk_distance"].to_numpy() == pytest.approx(result.head_summary()["qk_distance"].to_numpy())
    assert ScanResult(old, result.meta).top_examples(HeadRef(0, 0))


def test_a_checkpoint_saved_before_these_statistics_is_recomputed(tiny_llama, text_dir, tmp_path):
    """An old checkpoint lacks the score sums and the high-attention summaries: it is refused, and the scan
    starts again and gives the uninterrupted result."""
    corpus, params = open_corpus(str(text_dir)), scan_params()
    interrupted_scan(tiny_llama, corpus, params, tmp_path / "a", BATCH)
    folder = list_scans(tmp_path / "a")[0].folder
    status, arrays, meta = read_stage(folder)
    assert status == "partial" and "score_sum" in arrays and "high_tokens_weight" in arrays
    old = {name: array for name, array in arrays.items() if name != "score_sum" and not name.startswith("high_")
           and not name.startswith("shard_high_")}
    meta = {name: value for name, value in meta.items() if name != "stage"}
    write_stage(folder, "partial", old, meta, {"windows_done": meta["n_windows"]})
    messages = []
    resumed = run_scan(tiny_llama, corpus, params, out_dir=tmp_path / "a", batch_size=BATCH,
                       progress=lambda f, m: messages.append(m))
    assert any("checkpoint unusable" in m and "older format" in m for m in messages)
    whole = run_scan(tiny_llama, corpus, params, out_dir=tmp_path / "b", batch_size=BATCH)
    assert resumed.meta["resumed_from"] == 0
    for name in whole.arrays:
        assert np.array_equal(resumed.arrays[name], whole.arrays[name], equal_nan=True), name


def test_smollm2_scan_statistics_equal_the_atlas_and_find_a_previous_token_head(smollm2, corpus_dir, tmp_path):
    corpus = open_corpus(str(corpus_dir / "gutenberg"))
    params = ScanParams(window_len=24, max_windows=4, examples_per_decile=1)
    result = run_scan(smollm2, corpus, params, out_dir=tmp_path, batch_size=4)
    windows = [w.tokens for w in iter_windows(corpus, smollm2.model.tokenizer, 24, 4)]
    seqs = with_bos(np.array(windows), bos_token_id(smollm2.model))
    atlas = attention_metrics(smollm2.model, [seqs], None, batch_size=4, direct_copying=False)
    summary = result.head_summary()
    for name in SCAN_METRIC_DESCRIPTIONS:
        expected = atlas.values[name].reshape(-1)
        assert summary[name].to_numpy() == pytest.approx(expected, rel=1e-4, abs=1e-4, nan_ok=True), name
    prev = summary.set_index("name").loc["16.0"]  # the previous-token head of test_run's SmolLM2 check
    assert 1.0 <= prev["qk_distance"] < 1.5 and prev["qk_distance_variance"] < 1.0


def test_a_model_without_pre_softmax_scores_is_refused_before_anything_is_merged(tiny_gpt2, text_dir, tmp_path,
                                                                                monkeypatch):
    import headvis_core.scan.run as scan_run

    run_until = scan_run.run_until

    def without_scores(model, tokens, hooks, last):
        run_until(model, tokens, {name: hook for name, hook in hooks.items() if "attn_scores" not in name}, last)

    monkeypatch.setattr(scan_run, "run_until", without_scores)
    with pytest.raises(InputError, match="pre-softmax scores"):
        run_scan(tiny_gpt2, open_corpus(str(text_dir)), scan_params(), out_dir=tmp_path, batch_size=BATCH)
    assert list_scans(tmp_path) == []  # the first batch failed: nothing to save


@pytest.mark.parametrize("window", [None, 3])
def test_a_layers_score_sums_follow_the_per_query_definitions_with_tied_top_scores(window):
    """The scan's float32 reduction of one layer; ties at the top (common in fp16/bf16 scores) give margin 0."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 9, 9, generator=generator).half()
    scores[:, :, :, 2] = scores[:, :, :, 1] = scores.amax(-1) + 1  # keys 1 and 2 tie at the top
    pos = torch.arange(9)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float16).min)
    expected = np.zeros((3, 3))
    for b in range(2):
        for h in range(3):
            for q in range(1, 9):
                row = [float(scores[b, h, q, k]) for k in range(9) if allowed[q, k]]
                mean = sum(row) / len(row)
                std = math.sqrt(sum((s - mean) ** 2 for s in row) / len(row))
                ordered = sorted(row, reverse=True)
                expected[h] += [std, ordered[0] - ordered[1] if len(row) > 1 else 0.0,
                                (ordered[0] - mean) / std if std > 0 else 0.0]
    sums = reduce_layer_scores(scores)  # [head, SCORE_METRICS]
    assert sums.numpy() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_rerunning_a_scan_stored_before_these_statistics_recomputes_them(tiny_gpt2, text_dir, tmp_path):
    """A rerun asks for the whole result: the old stored one (5 of 7 statistics NaN) is recomputed, saying why."""
    corpus, params = open_corpus(str(text_dir)), scan_params()
    result = run_scan(tiny_gpt2, corpus, params, out_dir=tmp_path, batch_size=BATCH)
    assert result.stale_note is None
    status, arrays, meta = read_stage(result.path)
    old = {name: array for name, array in arrays.items() if name != "score_sum" and not name.startswith("high_")}
    meta = {name: value for name, value in meta.items() if name != "stage"}
    write_stage(result.path, "complete", old, meta, {})
    assert "rerun" in ScanResult(old, meta).stale_note
    messages = []
    again = run_scan(tiny_gpt2, corpus, params, out_dir=tmp_path, batch_size=BATCH,
                     progress=lambda f, m: messages.append(m))
    assert any("stored before the HeadVis statistics" in m and "Recomputing" in m for m in messages)
    assert again.stale_note is None and not again.head_summary()["logit_std"].isna().any()
    for name in result.arrays:
        assert np.array_equal(again.arrays[name], result.arrays[name], equal_nan=True), name
