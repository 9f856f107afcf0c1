"""The bounded token state: Misra-Gries summaries against exact totals on streams where the truth is known."""

import numpy as np
import pytest
import torch

from headvis_core.atlas.metrics import entropy_bits
from headvis_core.scan.heavy_hitters import FIXED_POINT, HeavyHitters, entropy_bits_bounded, from_fixed, to_fixed

ROWS, VOCAB = 3, 2000


def zipf_stream(seed: int, n_batches: int = 40, batch: int = 256):
    """Batches of (token ids, weights [rows, n]): Zipf-distributed tokens, each row weighting them differently."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        ids = np.minimum(rng.zipf(1.3, size=batch), VOCAB) - 1
        weights = rng.random((ROWS, batch)).astype(np.float32) * (1 + (ids % 7 == 0))[None, :]
        out.append((torch.from_numpy(ids), torch.from_numpy(weights)))
    return out


def exact_totals(stream):
    """Per row and token, the sum of the fixed-point weights (what the summary would hold with no capacity limit)."""
    totals = torch.zeros(ROWS, VOCAB, dtype=torch.int64)
    for ids, weights in stream:
        totals.index_add_(1, ids, to_fixed(weights))
    return totals


def summarise(stream, capacity):
    summary = HeavyHitters.empty(ROWS, capacity)
    for ids, weights in stream:
        summary.add(ids, weights)
    summary.flush()
    return summary


def check_bound(summary: HeavyHitters, truth: torch.Tensor) -> None:
    """est <= true <= est + slack for every token, and slack <= (weight - kept) / (capacity + 1)."""
    for row in range(ROWS):
        est = torch.zeros(VOCAB, dtype=torch.int64)
        kept = summary.ids[row] >= 0
        est[summary.ids[row][kept].long()] = summary.totals[row][kept]
        slack = int(summary.slack[row])
        assert bool((est <= truth[row]).all())
        assert bool((truth[row] <= est + slack).all())
        weight, kept_weight = int(truth[row].sum()), int(summary.totals[row].sum())
        assert int(summary.weight[row]) == weight  # the total weight is carried exactly
        assert slack * (summary.capacity + 1) <= weight - kept_weight


def test_exact_while_the_distinct_tokens_fit():
    stream = zipf_stream(0, n_batches=3, batch=64)
    truth = exact_totals(stream)
    distinct = int((truth > 0).any(0).sum())
    summary = summarise(stream, capacity=distinct)
    assert summary.slack.tolist() == [0] * ROWS
    for row in range(ROWS):
        kept = summary.ids[row] >= 0
        ids = summary.ids[row][kept].long()
        assert torch.equal(summary.totals[row][kept], truth[row, ids])
        assert set(ids.tolist()) == set(torch.nonzero(truth[row]).flatten().tolist())
        assert summary.totals[row][kept].tolist() == sorted(summary.totals[row][kept].tolist(), reverse=True)


def test_bounded_error_and_the_heavy_tokens_found_on_a_zipf_stream():
    stream = zipf_stream(1)
    truth = exact_totals(stream)
    assert int((truth > 0).any(0).sum()) > 400  # far more distinct tokens than counters
    summary = summarise(stream, capacity=64)
    assert (summary.slack > 0).all()
    check_bound(summary, truth)
    for row in range(ROWS):
        slack = int(summary.slack[row])
        true_order = torch.argsort(truth[row], descending=True, stable=True)
        heavy = true_order[truth[row][true_order] > slack]
        assert len(heavy) >= 5  # every token heavier than the bound is kept
        assert set(heavy.tolist()) <= set(summary.ids[row].long().tolist())
        # where the true totals of the top 5 are further apart than the bound, the estimates rank them exactly
        top = truth[row][true_order[:6]]
        if bool((top[:-1] - top[1:] > slack).all()):
            assert summary.ids[row][:5].long().tolist() == true_order[:5].tolist()


def test_merged_partial_summaries_keep_the_bound_and_merge_order_does_not_matter_without_pruning():
    stream = zipf_stream(2)
    truth = exact_totals(stream)
    parts = [summarise(stream[i::4], capacity=64) for i in range(4)]
    merged = HeavyHitters.empty(ROWS, 64)
    for part in parts:
        merged.merge(part)
    check_bound(merged, truth)
    small = zipf_stream(3, n_batches=4, batch=32)
    forward, backward = HeavyHitters.empty(ROWS, 512), HeavyHitters.empty(ROWS, 512)
    for part in [summarise(small[i::2], 512) for i in range(2)]:
        forward.merge(part)
    for part in [summarise(small[i::2], 512) for i in (1, 0)]:
        backward.merge(part)
    assert torch.equal(forward.ids, backward.ids) and torch.equal(forward.totals, backward.totals)
    assert torch.equal(forward.totals[forward.ids >= 0], summarise(small, 512).totals[forward.ids >= 0])


def test_buffered_adds_fold_like_one_merge_per_buffer_and_a_saved_buffer_resumes():
    stream = zipf_stream(5, n_batches=12, batch=64)
    truth = exact_totals(stream)
    summary = HeavyHitters.empty(ROWS, 48)  # a buffer of 96 token columns: flushed several times
    for ids, weights in stream[:6]:
        summary.add(ids, weights)
    saved = summary.to_arrays("hh")
    assert len(saved["hh_buffer_ids"]) > 0  # some sums still in the buffer
    resumed = HeavyHitters.from_arrays(saved, "hh", 48)
    for part in (summary, resumed):
        for ids, weights in stream[6:]:
            part.add(ids, weights)
        part.flush()
    assert torch.equal(summary.ids, resumed.ids) and torch.equal(summary.totals, resumed.totals)
    assert torch.equal(summary.slack, resumed.slack) and (summary.slack > 0).all()
    check_bound(summary, truth)


def test_fixed_point_round_trip_and_arrays():
    values = torch.tensor([0.0, 1.0, 0.25, 1e-3])
    assert from_fixed(to_fixed(values)).tolist() == [0.0, 1.0, 0.25, round(1e-3 * FIXED_POINT) / FIXED_POINT]
    summary = summarise(zipf_stream(4, n_batches=2), capacity=16)
    again = HeavyHitters.from_arrays(summary.to_arrays("hh"), "hh", 16)
    assert torch.equal(again.ids, summary.ids) and torch.equal(again.totals, summary.totals)
    assert torch.equal(again.slack, summary.slack)
    assert HeavyHitters.empty(2, 4).is_empty() and not summary.is_empty()


def test_entropy_read_from_a_summary_is_exact_without_pruning_and_within_its_bound_with_it():
    stream = zipf_stream(6)
    truth = exact_totals(stream)
    true_entropy = entropy_bits(truth).numpy()
    n_tokens = int((truth > 0).any(0).sum())

    def read(summary):
        return entropy_bits_bounded(summary.totals.numpy(), summary.weight.numpy(), summary.slack.numpy(), n_tokens)

    whole = summarise(stream, capacity=VOCAB)
    value, bound = read(whole)
    assert (whole.slack == 0).all() and (bound == 0).all()
    assert value == pytest.approx(true_entropy, rel=1e-12)
    bounds = []
    for capacity in (16, 64, 256):
        summary = summarise(stream, capacity)
        value, bound = read(summary)
        assert (summary.slack > 0).all() and (bound > 0).all()
        assert (np.abs(value - true_entropy) <= bound + 1e-12).all()
        bounds.append(bound)
    assert (bounds[2] < bounds[0]).all()  # more counters, a tighter bound


def test_entropy_of_a_row_whose_counters_all_cancelled_is_its_proven_interval_not_nan():
    # capacity 2, three tokens at 0.4 each: Misra-Gries cancels every counter; the missed mass is all of it
    summary = HeavyHitters.empty(1, 2)
    summary.add(torch.tensor([3, 5, 7]), torch.tensor([[0.4, 0.4, 0.4]]))
    summary.flush()
    assert (summary.totals == 0).all() and (summary.slack > 0).all()
    value, bound = entropy_bits_bounded(summary.totals.numpy(), summary.weight.numpy(), summary.slack.numpy(), 3)
    assert value[0] == pytest.approx(np.log2(3), rel=1e-9) and bound[0] == pytest.approx(0.0, abs=1e-9)
    empty = HeavyHitters.empty(1, 2)
    assert np.isnan(entropy_bits_bounded(empty.totals.numpy(), empty.weight.numpy(), empty.slack.numpy(), 3)[0]).all()


def test_fixed_point_sums_refuse_to_wrap_around():
    from headvis_core.errors import InputError
    from headvis_core.scan.heavy_hitters import add_exact
    near = torch.tensor([(1 << 63) - 10, -((1 << 63) - 10), 5])
    assert add_exact(near, torch.tensor([9, -9, -7])).tolist() == [(1 << 63) - 1, -((1 << 63) - 1), -2]
    with pytest.raises(InputError, match="overflow"):
        add_exact(near, torch.tensor([11, 0, 0]))
    with pytest.raises(InputError, match="overflow"):
        add_exact(near, torch.tensor([0, -11, 0]))
    summary = HeavyHitters.empty(1, 2)
    summary.weight = torch.tensor([(1 << 63) - int(FIXED_POINT)])  # a summary one token short of full
    with pytest.raises(InputError, match="overflow"):
        summary.add(torch.tensor([3, 5]), torch.tensor([[1.0, 1.0]]))
    other = HeavyHitters.empty(1, 2)
    other.weight = torch.tensor([2 * int(FIXED_POINT)])
    with pytest.raises(InputError, match="overflow"):
        summary.merge(other)
