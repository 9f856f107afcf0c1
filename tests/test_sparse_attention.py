"""The one top-k attended-keys helper: the k largest keys per query, largest first, position 0 apart."""

import numpy as np
import torch

from headvis_core.sparse_attention import sparse_from_dense, top_attended_keys


def test_top_keys_match_a_sort_of_each_row_with_batch_axes():
    patterns = torch.rand(2, 3, 6, 6)  # distinct weights: the order is unique
    keys, values, first = top_attended_keys(patterns, 3)
    assert keys.shape == values.shape == (2, 3, 6, 3) and torch.equal(first, patterns[..., 0])
    for index in np.ndindex(2, 3, 6):
        row = patterns[index].numpy()
        expected = np.argsort(-row[1:], kind="stable")[:3] + 1
        assert keys[index].tolist() == expected.tolist()
        assert values[index].tolist() == row[expected].tolist()


def test_stable_order_keeps_the_earlier_of_equal_keys():
    row = torch.tensor([0.3, 0.2, 0.2, 0.1, 0.2, 0.0])
    keys, values, _ = top_attended_keys(row, 4, stable=True)
    assert keys.tolist() == [1, 2, 4, 3] and torch.equal(values, row[[1, 2, 4, 3]])
    fast_keys, fast_values, _ = top_attended_keys(row, 4)
    assert sorted(fast_keys[:3].tolist()) == [1, 2, 4] and torch.equal(fast_values, values)
    assert sparse_from_dense(torch.tril(torch.ones(4, 4)) / 4, top_k=3).keys[0].tolist() == [1, 2, 3]  # all zero


def test_k_is_capped_and_position_0_can_compete():
    pattern = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.5, 0.2, 0.3]])
    keys, _, _ = top_attended_keys(pattern, 10)
    assert keys.shape == (3, 2)  # two candidate keys after position 0
    keys, values, _ = top_attended_keys(pattern, 1, exclude_first=False)
    assert keys[:, 0].tolist() == [0, 0, 0] and torch.equal(values[:, 0], pattern[:, 0])
    sparse = sparse_from_dense(pattern.numpy(), top_k=2)
    assert sparse.keys.tolist() == [[1, 2], [1, 2], [2, 1]] and np.array_equal(sparse.first, pattern[:, 0].numpy())
    assert sparse.keys.dtype == np.int64 and sparse.values.dtype == np.float32
