"""Dataset scans against a slow reference that keeps every full pattern and loops over positions."""

import os
import random
import signal

import numpy as np
import pytest
import torch

import headvis_core.scan.run as scan_run
from headvis_core.data.corpus import iter_windows, open_corpus
from headvis_core.errors import CorruptFileError, InputError
from headvis_core.heads import HeadRef
from headvis_core.hooks import capture, forward, pattern_hook
from headvis_core.scan import ScanParams, list_scans, load_scan, run_scan
from headvis_core.scan.state import ScanState, score_bins
from headvis_core.scan.store import MANIFEST

WINDOW, N_WINDOWS, BATCH = 12, 30, 8


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """Random lowercase words: every window differs, so window scores are distinct."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("scan_corpus")
    for name in ("a.txt", "b.txt"):
        words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))) for _ in range(120)]
        (root / name).write_text(" ".join(words) + "\n")
    return root


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama"])
def scanned(request, text_dir, tmp_path_factory):
    loaded = request.getfixturevalue(request.param)
    params = ScanParams(window_len=WINDOW, max_windows=N_WINDOWS, examples_per_decile=2, top_examples=5, top_k_keys=3,
                        reservoir_size=64, histogram_bins=1024)
    result = run_scan(loaded, open_corpus(str(text_dir)), params, out_dir=tmp_path_factory.mktemp("scans"),
                      batch_size=BATCH)
    return loaded, result, reference(loaded, text_dir, params)


def reference(loaded, text_dir, params):
    """Every statistic by explicit loops over full patterns of every layer, windows batched as in the scan."""
    model = loaded.model
    n_layers, n_heads = loaded.info.n_layers, loaded.info.n_heads
    bos = model.tokenizer.bos_token_id
    windows = [w.tokens for w in iter_windows(open_corpus(str(text_dir)), model.tokenizer, params.window_len,
                                              params.max_windows)]
    seqs = torch.tensor(np.array([[bos] + list(w) for w in windows]))
    patterns = []
    for start in range(0, len(seqs), BATCH):
        _, cache = capture(model, seqs[start:start + BATCH], [pattern_hook(l) for l in range(n_layers)])
        patterns.append(torch.stack([cache[pattern_hook(l)] for l in range(n_layers)], dim=1))
    p = torch.cat(patterns).reshape(len(seqs), n_layers * n_heads, seqs.shape[1], seqs.shape[1]).numpy()
    n_w, n_h, s, _ = p.shape
    scores = np.zeros((n_w, n_h), np.float32)
    paid, received = {}, {}
    counts = {}
    distance = np.zeros((n_h, s - 1))
    for w in range(n_w):
        for q in range(1, s):
            counts[int(seqs[w, q])] = counts.get(int(seqs[w, q]), 0) + 1
        for h in range(n_h):
            best = -1.0
            for q in range(1, s):
                token = int(seqs[w, q])
                paid.setdefault((h, token), 0.0)
                received.setdefault((h, token), 0.0)
                paid[(h, token)] += float(p[w, h, q, 1:q + 1].sum())
                received[(h, token)] += float(p[w, h, q:, q].sum())
                for k in range(1, q + 1):
                    best = max(best, float(p[w, h, q, k]))
                    distance[h, q - k] += p[w, h, q, k]
            scores[w, h] = best
    return {"p": p, "seqs": seqs.numpy(), "scores": scores, "paid": paid, "received": received, "counts": counts,
            "distance": distance}


def exact_deciles(scores, n_bins):
    """Decile of each score by sorting: windows in the same 1/n_bins-wide bin share the decile of their middle rank."""
    bins = np.floor(np.asarray(scores, np.float64) * n_bins).clip(0, n_bins - 1)
    order = sorted(range(len(scores)), key=lambda i: bins[i])
    out = {}
    below = 0
    for b in sorted(set(bins.tolist())):
        group = [i for i in order if bins[i] == b]
        decile = min(9, int(10 * (below + len(group) / 2) / len(scores))) + 1
        for i in group:
            out[i] = decile
        below += len(group)
    return np.array([out[i] for i in range(len(scores))])


def heads_of(loaded):
    return [HeadRef(l, h) for l in range(loaded.info.n_layers) for h in range(loaded.info.n_heads)]


def test_window_scores_histogram_and_top_examples_match_the_reference(scanned):
    loaded, result, ref = scanned
    assert result.n_windows == N_WINDOWS
    for i, head in enumerate(heads_of(loaded)):
        scores = ref["scores"][:, i]
        _, counts = result.score_histogram(head)
        assert np.array_equal(counts, np.bincount(score_bins(scores, 1024), minlength=1024))
        top = result.top_examples(head)
        best = np.argsort(-scores, kind="stable")[:5]
        assert [e.score for e in top] == pytest.approx(scores[best].tolist(), abs=0)
        assert [e.window_index for e in top] == best.tolist()
        ex = top[0]
        w = ex.window_index
        assert ex.token_ids.tolist() == ref["seqs"][w].tolist()
        row = ref["p"][w, i]
        assert row[ex.max_query, ex.max_key] == pytest.approx(ex.score, rel=1e-3)
        for q in range(3, row.shape[0]):  # queries with at least 3 keys after position 0
            expected = np.argsort(-row[q, 1:q + 1], kind="stable")[:3] + 1
            assert ex.attention.keys[q].tolist() == expected.tolist()
            assert ex.attention.values[q] == pytest.approx(row[q, expected], abs=1e-3)
            assert ex.attention.first[q] == pytest.approx(row[q, 0], abs=1e-3)


def test_deciles_and_their_examples_match_the_reference(scanned):
    loaded, result, ref = scanned
    for i, head in enumerate(heads_of(loaded)):
        exact = exact_deciles(ref["scores"][:, i], 1024)
        buckets = result.deciles(head)
        assert [b.decile for b in buckets] == list(range(10, 0, -1))
        for bucket in buckets:
            members = np.nonzero(exact == bucket.decile)[0]
            assert bucket.n_windows == len(members)
            # the reservoir (64) holds all 30 windows, so each decile shows min(K, members) of its own windows
            assert len(bucket.examples) == min(2, len(members))
            for ex in bucket.examples:
                assert ex.window_index in members
                assert ex.score == ref["scores"][ex.window_index, i]
                assert bucket.low <= ex.score < bucket.high + 1e-9
            assert [e.score for e in bucket.examples] == sorted([e.score for e in bucket.examples], reverse=True)


def test_token_averages_and_distance_histogram_match_the_reference(scanned):
    loaded, result, ref = scanned
    for i, head in enumerate(heads_of(loaded)):
        for role, sums in (("query", ref["paid"]), ("key", ref["received"])):
            table = result.top_tokens(head, role, n=10_000, min_count=1)
            assert len(table) == len(ref["counts"])
            for token, count, mean in zip(table.token_id, table["count"], table.mean_attention):
                assert count == ref["counts"][token]
                assert mean == pytest.approx(sums[(i, token)] / count, rel=1e-5, abs=1e-7)
            assert list(table.mean_attention) == sorted(table.mean_attention, reverse=True)
        expected = ref["distance"][i] / ref["distance"][i].sum()
        assert result.distance_histogram(head) == pytest.approx(expected, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_the_scan_pass_stops_at_the_last_layers_pattern(name, request, text_dir, tmp_path):
    """No last MLP, final norm or unembedding: the scan needs no logits (a plain forward runs all three)."""
    loaded = request.getfixturevalue(name)
    model = loaded.model
    ran = []
    parts = {"last MLP": model.blocks[-1].mlp, "final norm": model.ln_final, "unembedding": model.unembed}
    handles = [module.register_forward_hook(lambda *args, label=label: ran.append(label))
               for label, module in parts.items()]
    try:
        run_scan(loaded, open_corpus(str(text_dir)), ScanParams(window_len=8, max_windows=8), out_dir=tmp_path,
                 batch_size=4)
        assert ran == []
        forward(model, torch.tensor([[1, 2, 3]]))
        assert sorted(ran) == sorted(parts)
    finally:
        for handle in handles:
            handle.remove()


def test_memory_does_not_grow_with_the_corpus(tiny_llama, text_dir, tmp_path):
    params = dict(window_len=8, examples_per_decile=2, reservoir_size=16, histogram_bins=256)
    corpus = open_corpus(str(text_dir))
    small = run_scan(tiny_llama, corpus, ScanParams(max_windows=4, **params), out_dir=tmp_path, batch_size=4)
    large = run_scan(tiny_llama, corpus, ScanParams(max_windows=40, **params), out_dir=tmp_path, batch_size=4)
    assert large.n_windows == 10 * small.n_windows
    assert small.meta["state_bytes"] == large.meta["state_bytes"]
    for name, array in small.arrays.items():
        if name.startswith("token_") or name == "vocab_ids":
            assert large.arrays[name].shape[-1] <= tiny_llama.info.d_vocab  # bounded by the vocabulary
        else:
            assert large.arrays[name].shape == array.shape, name


def test_stored_result_is_reused_and_a_corrupt_one_recomputed(tiny_gpt2, text_dir, tmp_path):
    corpus = open_corpus(str(text_dir))
    params = ScanParams(window_len=8, max_windows=12)
    first = run_scan(tiny_gpt2, corpus, params, out_dir=tmp_path, batch_size=4)
    again = run_scan(tiny_gpt2, corpus, params, out_dir=tmp_path, batch_size=4,
                     progress=lambda f, m: pytest.fail("a stored result should not be recomputed"))
    assert again.meta["created"] == first.meta["created"] and again.path == first.path
    data_file = next(first.path.glob("complete-*.npz"))
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="checksum"):
        load_scan(first.path)
    messages = []
    redone = run_scan(tiny_gpt2, corpus, params, out_dir=tmp_path, batch_size=4,
                      progress=lambda f, m: messages.append(m))
    assert any("corrupt" in m and "Recomputing" in m for m in messages)
    for name in first.arrays:
        assert np.array_equal(redone.arrays[name], first.arrays[name], equal_nan=True), name
    (redone.path / MANIFEST).write_text('{"format": 1, "status": "comp')  # a torn manifest
    with pytest.raises(CorruptFileError):
        load_scan(redone.path)
    assert [s.status for s in list_scans(tmp_path)] == ["unreadable"]
    assert run_scan(tiny_gpt2, corpus, params, out_dir=tmp_path, batch_size=4).n_windows == 12
    assert load_scan(redone.path).n_windows == 12


class Interrupted(Exception):
    pass


INTERRUPT_PARAMS = ScanParams(window_len=8, max_windows=24, examples_per_decile=1, reservoir_size=8)


def assert_resumes_to_the_whole_scan(loaded, corpus, out_dir, windows_saved, tmp_path):
    """The interrupted scan stored ``windows_saved`` windows, and resuming gives the uninterrupted result."""
    stored = list_scans(out_dir)
    assert [(s.status, s.windows) for s in stored] == [("partial", windows_saved)]
    with pytest.raises(CorruptFileError, match="unfinished"):
        load_scan(stored[0].folder)
    resumed = run_scan(loaded, corpus, INTERRUPT_PARAMS, out_dir=out_dir, batch_size=4)
    whole = run_scan(loaded, corpus, INTERRUPT_PARAMS, out_dir=tmp_path / "whole", batch_size=4)
    assert resumed.meta["resumed_from"] == windows_saved and whole.meta["resumed_from"] == 0
    assert {"score_sum", "high_totals", "high_slack", "high_weight"} <= set(whole.arrays)  # the HeadVis statistics
    for name in whole.arrays:
        assert np.array_equal(resumed.arrays[name], whole.arrays[name], equal_nan=True), name


@pytest.mark.parametrize("error", [Interrupted, KeyboardInterrupt])
def test_interrupted_scan_resumes_with_the_same_result(tiny_llama, text_dir, tmp_path, error):
    corpus = open_corpus(str(text_dir))
    calls = []

    def stop_after_three(fraction, message):
        calls.append(message)
        if len(calls) == 3:
            raise error()

    with pytest.raises(error):
        run_scan(tiny_llama, corpus, INTERRUPT_PARAMS, out_dir=tmp_path / "a", batch_size=4,
                 progress=stop_after_three,
                 checkpoint_seconds=3600)  # nothing periodic: the interruption itself saves the finished batches
    assert_resumes_to_the_whole_scan(tiny_llama, corpus, tmp_path / "a", 12, tmp_path)


def test_ctrl_c_in_the_forward_pass_keeps_the_batches_before_it(tiny_llama, text_dir, tmp_path, monkeypatch):
    """Ctrl-C lands in a forward pass most of the time: the batches merged before it are saved."""
    reduce = scan_run.reduce_layer_pattern
    last_layer, passes = tiny_llama.info.n_layers - 1, []

    def ctrl_c_in_third_pass(state, layer, pattern, res_rows):
        if layer == last_layer:
            passes.append(layer)
            if len(passes) == 3:
                raise KeyboardInterrupt
        return reduce(state, layer, pattern, res_rows)

    monkeypatch.setattr(scan_run, "reduce_layer_pattern", ctrl_c_in_third_pass)
    corpus = open_corpus(str(text_dir))
    with pytest.raises(KeyboardInterrupt):
        run_scan(tiny_llama, corpus, INTERRUPT_PARAMS, out_dir=tmp_path / "a", batch_size=4,
                 checkpoint_seconds=3600)
    monkeypatch.setattr(scan_run, "reduce_layer_pattern", reduce)
    assert_resumes_to_the_whole_scan(tiny_llama, corpus, tmp_path / "a", 8, tmp_path)


def test_ctrl_c_during_a_merge_waits_for_the_merge_then_saves_it(tiny_llama, text_dir, tmp_path, monkeypatch):
    """A real SIGINT sent while a batch is being folded in: the batch is finished and saved, then the scan stops."""
    commit = ScanState.commit_reservoir
    commits = []

    def sigint_in_third_merge(self, *args):
        commits.append(1)
        if len(commits) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return commit(self, *args)

    monkeypatch.setattr(ScanState, "commit_reservoir", sigint_in_third_merge)
    corpus = open_corpus(str(text_dir))
    with pytest.raises(KeyboardInterrupt):
        run_scan(tiny_llama, corpus, INTERRUPT_PARAMS, out_dir=tmp_path / "a", batch_size=4,
                 checkpoint_seconds=3600)
    assert len(commits) == 3
    monkeypatch.setattr(ScanState, "commit_reservoir", commit)
    assert_resumes_to_the_whole_scan(tiny_llama, corpus, tmp_path / "a", 12, tmp_path)


def test_bad_parameters_and_a_corpus_too_short(tiny_gpt2, tmp_path):
    (tmp_path / "short.txt").write_text("abc")
    corpus = open_corpus(str(tmp_path / "short.txt"))
    with pytest.raises(InputError, match="window length"):
        run_scan(tiny_gpt2, corpus, ScanParams(window_len=1000), out_dir=tmp_path)
    with pytest.raises(InputError, match="fewer than 8 tokens"):
        run_scan(tiny_gpt2, corpus, ScanParams(window_len=8), out_dir=tmp_path)


def test_cli_scan_prints_a_head_and_reports_a_missing_corpus(text_dir, tmp_path, capsys):
    from headvis_core.cli.main import main

    status = main(["scan", "--model", "tiny-gpt2", "--corpus", str(text_dir), "--out", str(tmp_path),
                   "--window", "8", "--max-windows", "10", "--show", "1.2"])
    out = capsys.readouterr().out
    assert status == 0 and "10 windows (80 tokens)" in out and "head 1.2" in out and "decile 10" in out
    assert main(["scan", "--model", "tiny-gpt2", "--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "no file or folder" in capsys.readouterr().err


def test_smollm2_scan_finds_a_previous_token_head(smollm2, corpus_dir, tmp_path):
    corpus = open_corpus(str(corpus_dir / "gutenberg"))
    result = run_scan(smollm2, corpus, ScanParams(window_len=32, max_windows=8, examples_per_decile=1),
                      out_dir=tmp_path, batch_size=8)
    assert result.n_windows == 8 and result.head_summary().shape[0] == 30 * 9
    # Head 16.0 puts most of its attention (outside position 0) on the previous token.
    assert result.distance_histogram(HeadRef(16, 0))[1] > 0.6
    top = result.top_examples(HeadRef(16, 0))[0]
    assert top.max_query - top.max_key == 1


def test_a_scan_too_large_for_its_fixed_point_sums_is_refused_before_it_starts(monkeypatch):
    import headvis_core.scan.params as scan_params
    ScanParams(window_len=2047, max_windows=4_000_000).check(n_ctx=8192)
    with pytest.raises(InputError, match="fixed-point"):
        ScanParams(window_len=2047, max_windows=4_300_000).check(n_ctx=8192)
    monkeypatch.setattr(scan_params, "MAX_FIXED_TOKENS", 100)  # a tiny bound: 11 windows of 8 tokens pass
    ScanParams(window_len=8, max_windows=11).check(n_ctx=64)
    with pytest.raises(InputError, match="fixed-point"):
        ScanParams(window_len=8, max_windows=12).check(n_ctx=64)
    ScanParams(window_len=8, max_windows=None).check(n_ctx=64)  # the whole corpus: checked as it merges


def test_merging_a_shard_whose_sums_would_wrap_around_raises_instead():
    params = ScanParams(window_len=8, max_windows=None)
    state = ScanState(2, 2, 9, 50, params)
    shard = ScanState(2, 2, 9, 50, params)
    state.score_sum[:] = (1 << 63) - 5
    shard.score_sum[:] = 10
    with pytest.raises(InputError, match="overflow"):
        state.merge_state(shard)
