"""Shards merged in order give the one-process scan's result, array for array; old results still open."""

import random

import numpy as np
import pandas as pd
import pytest

from headvis_core.data.corpus import open_corpus
from headvis_core.heads import HeadRef
from headvis_core.models.loader import load_model
from headvis_core.scan import ScanParams, run_scan
from headvis_core.scan.result import ScanResult
from headvis_core.scan.run import new_state
from headvis_core.scan.shards import n_shards, scan_shard, shard

MAX_WINDOWS = 44


@pytest.fixture(scope="module")
def word_corpus(tmp_path_factory):
    """Random words from a large alphabet: many distinct byte-tokens, distinct windows."""
    rng = random.Random(1)
    root = tmp_path_factory.mktemp("shard_corpus")
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 7))) for _ in range(500)]
    (root / "a.txt").write_text(" ".join(words))
    return open_corpus(str(root))


def merged_shards(loaded, corpus, params, batch_size, order=None):
    """A result from shard states merged in shard order (``order``: the order they are computed in)."""
    count = n_shards(params)
    parts = {i: scan_shard(loaded, corpus, params, i, batch_size) for i in (order or range(count))}
    state = new_state(loaded, params)
    for i in range(count):
        state.merge_state(parts[i])
    return ScanResult.from_state(state, loaded.model.tokenizer, {"n_layers": loaded.info.n_layers,
                                                                 "n_heads": loaded.info.n_heads})


def assert_same_arrays(a: ScanResult, b: ScanResult) -> None:
    assert sorted(a.arrays) == sorted(b.arrays)
    for name in a.arrays:
        assert a.arrays[name].dtype == b.arrays[name].dtype, name
        assert np.array_equal(a.arrays[name], b.arrays[name], equal_nan=True), name


def test_the_shard_plan_depends_on_the_parameters_only():
    params = ScanParams(max_windows=44, shard_windows=8)
    assert n_shards(params) == 6
    assert [(s.start, s.stop) for s in map(lambda i: shard(i, params), range(6))] == [
        (0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 44)]
    assert n_shards(ScanParams(max_windows=None)) is None


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("capacity", [1024, 6])  # 6 counters: the token summaries prune (slack > 0)
def test_merged_shards_equal_the_one_process_scan(request, word_corpus, tmp_path, model, capacity):
    loaded = request.getfixturevalue(model)
    params = ScanParams(window_len=10, max_windows=MAX_WINDOWS, examples_per_decile=2, top_examples=5,
                        top_k_keys=3, reservoir_size=12, histogram_bins=512, shard_windows=8,
                        token_capacity=capacity)
    whole = run_scan(loaded, word_corpus, params, out_dir=tmp_path, batch_size=4)
    sharded = merged_shards(loaded, word_corpus, params, batch_size=4, order=[3, 0, 5, 1, 4, 2])
    assert_same_arrays(whole, sharded)
    # the HeadVis statistics: fixed-point score sums and the high-attention token summaries
    assert {"score_sum", "high_ids", "high_totals", "high_slack", "high_weight"} <= set(whole.arrays)
    assert (whole.arrays["score_sum"] != 0).all()
    pd.testing.assert_frame_equal(whole.head_summary(), sharded.head_summary())
    high_slack = whole.arrays["high_slack"]
    assert (high_slack > 0).any() if capacity == 6 else (high_slack == 0).all()
    slack = whole.arrays["hh_slack"]
    assert (slack > 0).all() if capacity == 6 else (slack == 0).all()
    table = whole.top_tokens(HeadRef(0, 0), "key", n=5, min_count=1)
    assert (table.error_bound > 0).all() if capacity == 6 else (table.error_bound == 0).all()


def test_a_batch_size_that_does_not_divide_the_shard_is_reduced(word_corpus, tiny_llama, tmp_path):
    params = ScanParams(window_len=10, max_windows=24, reservoir_size=8, shard_windows=8, token_capacity=5)
    odd = run_scan(tiny_llama, word_corpus, params, out_dir=tmp_path / "a", batch_size=6)  # runs with 2
    even = run_scan(tiny_llama, word_corpus, params, out_dir=tmp_path / "b", batch_size=2)
    assert_same_arrays(odd, even)


def test_bfloat16_scan_on_cpu_and_its_shards(word_corpus, tmp_path):
    loaded = load_model("tiny-llama", device="cpu", dtype="bfloat16")
    params = ScanParams(window_len=10, max_windows=16, reservoir_size=8, shard_windows=8)
    whole = run_scan(loaded, word_corpus, params, out_dir=tmp_path, batch_size=4)
    assert whole.meta["model"]["dtype"] == "bfloat16" and whole.n_windows == 16
    assert_same_arrays(whole, merged_shards(loaded, word_corpus, params, batch_size=4))


def test_a_scan_saved_with_per_vocabulary_sums_still_opens(tiny_gpt2, word_corpus, tmp_path):
    """Results stored before the bounded summary have ``token_paid``/``token_received`` [heads, seen]."""
    result = run_scan(tiny_gpt2, word_corpus, ScanParams(window_len=10, max_windows=8), out_dir=tmp_path)
    old = dict(result.arrays)
    for name in ("hh_ids", "hh_totals", "hh_slack"):
        del old[name]
    heads, seen = result.n_layers * result.n_heads, len(old["token_ids"])
    old["token_paid"] = np.arange(heads * seen, dtype=np.float64).reshape(heads, seen)
    old["token_received"] = np.ones((heads, seen))
    table = ScanResult(old, result.meta).top_tokens(HeadRef(0, 1), "query", n=3, min_count=1)
    expected = old["token_paid"][1] / old["token_count"]
    assert table.mean_attention.tolist() == sorted(expected, reverse=True)[:3]
    assert (table.error_bound == 0).all()
