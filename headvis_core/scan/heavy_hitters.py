"""Bounded, mergeable heavy hitters of weighted token streams: the scan's top query and key tokens.

One summary holds ``rows`` independent streams (the scan uses one row per
head and role). Each row keeps at most ``capacity`` ``(token, total)``
counters: a Misra-Gries summary with the merge of Agarwal et al., "Mergeable
Summaries" (PODS 2012; ACM TODS 2013): add the counters of both summaries,
subtract the ``(capacity + 1)``-th largest total from every counter and drop
those that are not positive. A batch of items is merged as a small summary
of its exact per-token totals, so folding batches and merging partial
summaries are the same operation.

Why Misra-Gries rather than SpaceSaving or a Count-Min sketch: its merge is
deterministic and exact in integer arithmetic, it never overestimates, and
the error bound of every row is one number that the summary carries along
(``slack``), so a reader can print it next to each estimate.

**Guarantee** (per row, for every token ``t``; ``est(t) = 0`` for a token
not kept)::

    est(t) <= true(t) <= est(t) + slack            and
    slack <= (weight - kept) / (capacity + 1)

where ``weight`` is the row's total weight (carried exactly, ``weight``) and
``kept`` the sum of its counters. No subtraction happens while a row has seen
at most ``capacity`` distinct tokens of positive weight: then ``slack == 0``,
``kept == weight`` and every total is exact.

:func:`entropy_bits_bounded` reads the entropy of a row's token distribution
from the summary, with a bound on its error (0 when the row is exact).

Weights are held in fixed point (integers, ``FIXED_POINT`` units per 1.0,
each item's weight rounded to that grid), so a total is independent of the
order in which items were added: sums of integers are exact. An ``int64``
total holds up to ``2**63 / FIXED_POINT`` (8.6e9) units of weight, e.g. that
many tokens' attention.
"""


import numpy as np
import torch
from jaxtyping import Float, Int

from headvis_core.atlas.metrics import entropy_bits
from headvis_core.errors import InputError

FIXED_POINT = float(1 << 30)
# Tokens of attention weight an int64 total holds in FIXED_POINT units (each query's attention sums to 1)
MAX_FIXED_TOKENS = (1 << 63) // (1 << 30)


def add_exact(total: Int[torch.Tensor, "..."], increment: Int[torch.Tensor, "..."]) -> Int[torch.Tensor, "..."]:
    """``total + increment`` in int64, refusing (``InputError``) a sum that would wrap around."""
    result = total + increment
    # two's complement overflow: both operands share a sign that the result does not
    if bool((((total ^ result) & (increment ^ result)) < 0).any()):
        raise InputError("The scan's fixed-point sums would overflow int64 (too many windows for one scan); "
                         "scan fewer windows or shorter ones.")
    return result


def to_fixed(values: Float[torch.Tensor, "..."], unit: float = FIXED_POINT) -> Int[torch.Tensor, "..."]:
    """``values`` in integer units of ``1 / unit`` (rounded to nearest); ``FIXED_POINT`` unless given."""
    return torch.round(values.double() * unit).to(torch.int64)


def from_fixed(units: torch.Tensor | np.ndarray, unit: float = FIXED_POINT) -> np.ndarray:
    """Fixed-point units (of ``1 / unit``) back to float64."""
    array = units.numpy() if isinstance(units, torch.Tensor) else np.asarray(units)
    return array.astype(np.float64) / unit


def _merge_rows(ids: Int[torch.Tensor, "rows n"], totals: Int[torch.Tensor, "rows n"],
                capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum the totals of equal ids in each row and keep ``capacity`` counters (Misra-Gries merge).

    Returns ``(ids [rows, capacity], totals [rows, capacity], subtracted [rows])``; a row's counters are
    sorted by total (largest first), then by id; empty counters have id -1 and total 0.
    """
    rows = ids.shape[0]
    out_ids = torch.full((rows, capacity), -1, dtype=torch.int32)
    out_totals = torch.zeros(rows, capacity, dtype=torch.int64)
    subtracted = torch.zeros(rows, dtype=torch.int64)
    valid = ids >= 0
    if not bool(valid.any()):
        return out_ids, out_totals, subtracted
    span = int(ids.max()) + 1
    row_of = torch.arange(rows, dtype=torch.int64)[:, None].expand_as(ids)
    keys, inverse = torch.unique(row_of[valid] * span + ids[valid].long(), return_inverse=True)
    sums = torch.zeros(len(keys), dtype=torch.int64).index_add_(0, inverse, totals[valid])
    key_row, key_id = keys // span, keys % span
    # keys come sorted by (row, id): two stable sorts give (row, -total, id)
    order = torch.sort(-sums, stable=True).indices
    order = order[torch.sort(key_row[order], stable=True).indices]
    key_row, key_id, sums = key_row[order], key_id[order], sums[order]
    per_row = torch.bincount(key_row, minlength=rows)
    rank = torch.arange(len(sums)) - (torch.cumsum(per_row, 0) - per_row)[key_row]
    at_threshold = rank == capacity
    subtracted[key_row[at_threshold]] = sums[at_threshold]
    remaining = sums - subtracted[key_row]
    keep = (rank < capacity) & (remaining > 0)
    out_ids[key_row[keep], rank[keep]] = key_id[keep].to(torch.int32)
    out_totals[key_row[keep], rank[keep]] = remaining[keep]
    return out_ids, out_totals, subtracted


class HeavyHitters:
    """``rows`` Misra-Gries summaries of ``capacity`` counters each (see the module docstring).

    :meth:`add` sums items exactly in a buffer of ``2 * capacity`` token columns and folds the buffer
    into the counters (one Misra-Gries merge) when a new token would not fit, or on :meth:`flush`:
    a batch costs an ``index_add``, not a sort of every counter.
    """

    def __init__(self, ids: Int[torch.Tensor, "rows capacity"], totals: Int[torch.Tensor, "rows capacity"],
                 slack: Int[torch.Tensor, " rows"], weight: Int[torch.Tensor, " rows"]):
        self.ids = ids  # int32, -1 where empty
        self.totals = totals  # int64 fixed point, largest first
        self.slack = slack  # int64 fixed point: the error bound of every estimate in the row
        self.weight = weight  # int64 fixed point: the row's total weight, exact
        self._columns: dict[int, int] = {}  # token id -> buffer column
        self._buffer: torch.Tensor | None = None  # [rows, 2 * capacity] int64 fixed point, exact sums

    @classmethod
    def empty(cls, rows: int, capacity: int) -> "HeavyHitters":
        return cls(torch.full((rows, capacity), -1, dtype=torch.int32), torch.zeros(rows, capacity, dtype=torch.int64),
                   torch.zeros(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.int64))

    @property
    def capacity(self) -> int:
        return int(self.ids.shape[1])

    @property
    def buffer_columns(self) -> int:
        return 2 * self.capacity

    def nbytes(self, with_buffer: bool = False) -> int:
        """Bytes of the counters (and of the add buffer, allocated by the first :meth:`add`)."""
        counters = sum(t.numel() * t.element_size() for t in (self.ids, self.totals, self.slack, self.weight))
        return counters + (self.ids.shape[0] * self.buffer_columns * 8 if with_buffer else 0)

    def is_empty(self) -> bool:
        return (not bool((self.ids >= 0).any()) and not bool(self.slack.any()) and not bool(self.weight.any())
                and not self._columns)

    def add(self, ids: Int[torch.Tensor, " n"], weights: Float[torch.Tensor, "rows n"]) -> None:
        """Add a stream segment: item ``i`` is token ``ids[i]`` with weight ``weights[row, i]`` in every row."""
        unique, inverse = torch.unique(ids.long(), return_inverse=True)
        tokens = unique.tolist()
        units = to_fixed(weights)
        self.weight = add_exact(self.weight, units.sum(1))
        if len(tokens) > self.buffer_columns:  # more distinct tokens than the buffer holds: fold them at once
            self.flush()
            batch = torch.zeros(weights.shape[0], len(tokens), dtype=torch.int64).index_add_(1, inverse, units)
            self._fold(unique.to(torch.int32)[None, :].expand(weights.shape[0], -1), batch)
            return
        if len(self._columns) + sum(t not in self._columns for t in tokens) > self.buffer_columns:
            self.flush()
        if self._buffer is None:
            self._buffer = torch.zeros(self.ids.shape[0], self.buffer_columns, dtype=torch.int64)
        columns = torch.tensor([self._columns.setdefault(t, len(self._columns)) for t in tokens], dtype=torch.int64)
        self._buffer.index_add_(1, columns[inverse], units)

    def flush(self) -> None:
        """Fold the buffered exact sums into the counters."""
        if not self._columns:
            return
        n = len(self._columns)
        ids = torch.tensor(list(self._columns), dtype=torch.int32)  # in column order
        self._fold(ids[None, :].expand(self.ids.shape[0], -1), self._buffer[:, :n].clone())
        self._buffer[:, :n] = 0
        self._columns.clear()

    def merge(self, other: "HeavyHitters") -> None:
        """Fold another summary of the same rows into this one (Agarwal et al.'s merge); both are flushed first."""
        self.flush()
        other.flush()
        self._fold(other.ids, other.totals)
        self.slack = self.slack + other.slack
        self.weight = add_exact(self.weight, other.weight)

    def _fold(self, ids: torch.Tensor, totals: torch.Tensor) -> None:
        self.ids, self.totals, subtracted = _merge_rows(torch.cat([self.ids, ids], dim=1),
                                                        torch.cat([self.totals, totals], dim=1), self.capacity)
        self.slack = self.slack + subtracted

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The counters, cut after the last column any row uses (counters are packed left), and the buffer."""
        used = int((self.ids >= 0).sum(1).max()) if self.ids.numel() else 0
        n = len(self._columns)
        buffer = self._buffer[:, :n] if n else torch.zeros(self.ids.shape[0], 0, dtype=torch.int64)
        return {f"{prefix}_ids": self.ids[:, :used].numpy(), f"{prefix}_totals": self.totals[:, :used].numpy(),
                f"{prefix}_slack": self.slack.numpy(), f"{prefix}_weight": self.weight.numpy(),
                f"{prefix}_buffer_ids": np.array(list(self._columns)),
                f"{prefix}_buffer": buffer.numpy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str, capacity: int) -> "HeavyHitters":
        """The inverse of :meth:`to_arrays` for a summary of ``capacity`` counters per row.

        Raises ``ValueError`` for missing or misshapen arrays (a summary saved before ``weight`` included).
        """
        names = ("ids", "totals", "slack", "weight", "buffer", "buffer_ids")
        missing = [f"{prefix}_{name}" for name in names if f"{prefix}_{name}" not in arrays]
        if missing:
            raise ValueError(f"the {prefix} summary lacks {', '.join(missing)}")
        ids, totals, slack, weight, buffer = (torch.from_numpy(np.array(arrays[f"{prefix}_{name}"]))
                                              for name in names[:5])
        buffer_ids = np.array(arrays[f"{prefix}_buffer_ids"]).astype(np.int64).tolist()
        rows = ids.shape[0] if ids.dim() == 2 else -1
        if (ids.dim() != 2 or ids.shape != totals.shape or ids.shape[1] > capacity or slack.shape != (rows,)
                or weight.shape != (rows,) or buffer.shape != (rows, len(buffer_ids))
                or len(buffer_ids) > 2 * capacity):
            raise ValueError(f"the {prefix} summary's arrays have the wrong shape")
        summary = cls.empty(rows, capacity)
        summary.ids[:, :ids.shape[1]] = ids.to(torch.int32)
        summary.totals[:, :ids.shape[1]] = totals.to(torch.int64)
        summary.slack = slack.to(torch.int64)
        summary.weight = weight.to(torch.int64)
        if buffer_ids:
            summary._buffer = torch.zeros(rows, summary.buffer_columns, dtype=torch.int64)
            summary._buffer[:, :len(buffer_ids)] = buffer.to(torch.int64)
            summary._columns = {token: column for column, token in enumerate(buffer_ids)}
        return summary

    def estimates(self, row: int, token_ids: np.ndarray) -> np.ndarray:
        """Estimated totals (float) of ``token_ids`` in ``row``; 0 for tokens not kept (flushes first)."""
        self.flush()
        return estimates_of(self.ids[row].numpy(), self.totals[row].numpy(), token_ids)


def estimates_of(kept_ids: np.ndarray, kept_totals: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """Float totals of ``token_ids`` read from one row's counters ``kept_ids`` / ``kept_totals`` (0 if absent)."""
    lookup = dict(zip(kept_ids[kept_ids >= 0].tolist(), from_fixed(kept_totals[kept_ids >= 0]).tolist()))
    return np.array([lookup.get(int(t), 0.0) for t in token_ids], dtype=np.float64)


def entropy_bits_bounded(totals: Int[np.ndarray, "rows capacity"], weight: Int[np.ndarray, " rows"],
                         slack: Int[np.ndarray, " rows"], n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Entropy in bits of each row's token distribution, read from its summary, and a bound on the error.

    ``totals`` are a row's counters, ``weight`` its exact total weight and ``slack`` its Misra-Gries
    slack (all fixed point; empty counters 0); ``n_tokens`` bounds how many distinct tokens the stream
    holds. While nothing was pruned (``slack == 0``, so ``kept == weight``) the counters are the exact
    totals: the entropy is exact (:func:`headvis_core.atlas.metrics.entropy_bits`) and the bound 0.

    Otherwise let ``q`` be the counters normalised, ``r = 1 - kept / weight`` the mass they miss and
    ``u`` the distribution of that missed mass over tokens. The truth is the mixture ``p = (1 - r) q +
    r u``; each token misses at most ``slack`` (the summary's guarantee), so ``max u <= slack / (r
    weight)``. Concavity of entropy with ``H(u) >= -log2 max u`` (min-entropy), and the mixture bound
    ``H(p) <= sum w_i H(p_i) + H(w)`` with ``H(u) <= log2(n_tokens)``, give::

        L = (1 - r) H(q) + r log2(max(1, r weight / slack))  <=  H(p)
        H(p)  <=  (1 - r) H(q) + r log2(n_tokens) + h2(r) = U

    (``h2`` the binary entropy). Returned: the middle ``(L + U) / 2`` and the half-width ``(U - L) / 2``,
    so the true entropy is within the bound of the value. NaN for a row of no weight (or none kept
    while nothing was pruned); a row whose counters all cancelled has ``r = 1`` and the bound alone.
    """
    totals = np.asarray(totals, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    slack = np.asarray(slack, dtype=np.float64)
    kept_entropy = entropy_bits(torch.from_numpy(totals)).numpy()
    missed = np.clip(weight - totals.sum(-1), 0.0, None)
    r = np.where((weight > 0) & (slack > 0), missed / np.maximum(weight, 1.0), 0.0)
    r_t = torch.from_numpy(r)
    h2 = -(torch.special.xlogy(r_t, r_t) + torch.special.xlogy(1 - r_t, 1 - r_t)).numpy() / np.log(2.0)
    min_entropy = np.log2(np.maximum(1.0, missed / np.maximum(slack, 1.0)))
    # every counter cancelled (r == 1): the kept part has no weight and no entropy (not 0 * NaN)
    kept_part = np.where(r < 1, (1 - r) * np.nan_to_num(kept_entropy), np.where(weight > 0, 0.0, np.nan))
    kept_part = np.where((r < 1) & np.isnan(kept_entropy), np.nan, kept_part)
    lower = kept_part + r * min_entropy
    upper = kept_part + r * np.log2(max(n_tokens, 1)) + h2
    return (lower + upper) / 2, (upper - lower) / 2
