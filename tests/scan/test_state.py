"""The scan's streaming-state helpers: decile bins and reservoir priorities."""

import numpy as np

from headvis_core.scan.state import bin_deciles, score_bins, window_priorities


def test_bin_deciles_on_distinct_scores_give_equal_tenths():
    scores = np.random.default_rng(0).permutation(np.arange(1000)) / 1000 + 0.0004
    counts = np.bincount(score_bins(scores, 1000), minlength=1000)
    assert counts.max() == 1
    deciles = bin_deciles(counts)[score_bins(scores, 1000)]
    ranks = np.argsort(np.argsort(scores))
    assert np.array_equal(deciles, ranks // 100 + 1)
    assert np.bincount(deciles, minlength=11)[1:].tolist() == [100] * 10


def test_priorities_are_uniform_and_reproducible():
    u = window_priorities(np.arange(20000), seed=3)
    assert np.array_equal(u, window_priorities(np.arange(20000), seed=3))
    assert not np.array_equal(u, window_priorities(np.arange(20000), seed=4))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 1800
