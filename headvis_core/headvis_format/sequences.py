"""One attention example in HeadVis's sequence shape: tokens and a flat COO list of the kept attention weights.

A sequence keeps, for each query, its ``keys_per_query`` most attended keys
(position 0 included) whose weight, rounded to 4 decimals, reaches
``threshold``: this keeps a head file near 1-15 MB. Entries are listed by flat
index ``q * seq_len + k``. ``max_activation`` is the largest kept weight over
rows > 0 and columns > 0, the diagonal included, which is what the frontend's
sparse reductions compute from the same entries.
"""

from typing import Any, Optional

import numpy as np

from headvis_core.headvis_format.contract import VALUE_DECIMALS
from headvis_core.sparse_attention import SparseAttention

DEFAULT_KEYS_PER_QUERY = 5
DEFAULT_THRESHOLD = 0.01


def coo_entries(attention: SparseAttention, keys_per_query: int = DEFAULT_KEYS_PER_QUERY,
                threshold: float = DEFAULT_THRESHOLD) -> tuple[list[int], list[float]]:
    """``(flat indices, values)`` of the weights kept from ``attention`` (see the module docstring).

    Candidates of query ``q`` are its stored keys (positions 1..q with a
    weight above 0) and position 0 (``attention.first``); ties keep the earlier key.
    """
    keys = np.asarray(attention.keys, dtype=np.int64)
    values = np.asarray(attention.values, dtype=np.float64)
    n_queries = keys.shape[0]
    first = (np.asarray(attention.first, dtype=np.float64) if attention.first is not None
             else np.zeros(n_queries))
    cand_keys = np.concatenate([np.zeros((n_queries, 1), np.int64), keys], axis=1)
    cand_values = np.concatenate([first[:, None], values], axis=1)
    queries = np.arange(n_queries)[:, None]
    usable = (cand_keys <= queries) & (cand_values > 0)
    usable[:, 1:] &= cand_keys[:, 1:] >= 1
    rounded = np.where(usable, np.round(cand_values, VALUE_DECIMALS), -1.0)
    picked = _row_order(rounded, cand_keys)[:, :keys_per_query]
    picked_values = np.take_along_axis(rounded, picked, axis=1)
    picked_keys = np.take_along_axis(cand_keys, picked, axis=1)
    keep = picked_values >= max(threshold, 10.0 ** -VALUE_DECIMALS)
    flat = (np.broadcast_to(queries, picked_keys.shape) * n_queries + picked_keys)[keep]
    vals = picked_values[keep]
    order_flat = np.argsort(flat, kind="stable")
    flat, vals = flat[order_flat], vals[order_flat]
    unique = np.concatenate([[True], flat[1:] != flat[:-1]]) if len(flat) else np.zeros(0, bool)
    return flat[unique].tolist(), vals[unique].tolist()


def _row_order(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Per row, candidate slots by value (largest first), then key (earliest first)."""
    order = np.argsort(keys, axis=1, kind="stable")
    by_value = np.argsort(-np.take_along_axis(values, order, axis=1), axis=1, kind="stable")
    return np.take_along_axis(order, by_value, axis=1)


def max_activation(indices: list[int], values: list[float], seq_len: int) -> float:
    """The largest value over rows > 0 and columns > 0 (diagonal included), 0.0 where there is none."""
    if not indices:
        return 0.0
    flat = np.asarray(indices, dtype=np.int64)
    inner = (flat // seq_len > 0) & (flat % seq_len > 0)
    return float(np.asarray(values)[inner].max()) if inner.any() else 0.0


def sequence_record(sequence_id: int | str, interval: int, str_tokens: list[str], attention: SparseAttention,
                    keys_per_query: int = DEFAULT_KEYS_PER_QUERY, threshold: float = DEFAULT_THRESHOLD,
                    extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One HeadVis sequence (``extra`` keys, which the frontend ignores, are added after the required ones)."""
    seq_len = len(str_tokens)
    if attention.n_queries != seq_len:
        raise ValueError(f"attention has {attention.n_queries} queries for {seq_len} tokens")
    indices, values = coo_entries(attention, keys_per_query, threshold)
    sequence_id = sequence_id if isinstance(sequence_id, str) else int(sequence_id)
    record = {"sequence_id": sequence_id, "interval": int(interval), "tokens": [str(t) for t in str_tokens],
              "attention_indices": indices, "attention_values": values, "seq_len": seq_len,
              "max_activation": max_activation(indices, values, seq_len)}
    record.update(extra or {})
    return record


def sparse_from_record(record: dict[str, Any]) -> SparseAttention:
    """The inverse view: a sequence's COO entries as :class:`SparseAttention` (key 0 goes to ``first``)."""
    seq_len = int(record["seq_len"])
    flat = np.asarray(record["attention_indices"], dtype=np.int64)
    vals = np.asarray(record["attention_values"], dtype=np.float32)
    queries, keys = flat // seq_len, flat % seq_len
    first = np.zeros(seq_len, np.float32)
    first[queries[keys == 0]] = vals[keys == 0]
    rest = keys > 0
    per_query = np.bincount(queries[rest], minlength=seq_len)
    width = max(1, int(per_query.max(initial=0)))
    out_keys = np.zeros((seq_len, width), np.int64)
    out_vals = np.zeros((seq_len, width), np.float32)
    for q in np.unique(queries[rest]):
        mine = rest & (queries == q)
        order = np.lexsort((keys[mine], -vals[mine]))
        out_keys[q, :mine.sum()] = keys[mine][order]
        out_vals[q, :mine.sum()] = vals[mine][order]
    return SparseAttention(out_keys, out_vals, first)
