"""The streaming state of a dataset scan: fixed-size accumulators folded batch by batch.

Per head (indexed by ``layer * n_heads + head``) the state keeps a histogram
of window scores, the exact running top-``top_examples`` windows, a shared
reservoir sample of windows (chosen by a hash-derived priority of the window
index, so a resumed scan keeps the same sample), bounded summaries of the
attention paid and received per token (:mod:`headvis_core.scan.heavy_hitters`)
and attention summed by query-key distance; for the HeadVis metrics
(:mod:`headvis_core.atlas.metrics`), the sums of the three score statistics
over queries and bounded summaries of the high-attention mass per token at
the query and at the key. Its size depends on the model and the parameters
only, never on the corpus, and (but for one count per vocabulary entry) not on
the vocabulary.

States of disjoint shards merge exactly (:meth:`ScanState.merge_state`):
histograms, counts, the distance sums and the score sums are integers (fixed
point), the top windows are ordered by (score, window index), the reservoir by
(priority, window index), and the token summaries are merged one shard at a
time in shard order, in a one-process scan as in a sharded one.
"""


from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int

from headvis_core.atlas.metrics import SCORE_METRICS
from headvis_core.errors import CorruptFileError
from headvis_core.scan.heavy_hitters import HeavyHitters, add_exact, to_fixed
from headvis_core.scan.params import N_DECILES, ScanParams

# Fixed-point unit of the score sums: 2**-20 (1e-6) per batch's sum is far below the scores' float32
# noise, and an int64 then holds 8.8e12 (e.g. 1e11 queries with a z-score of 88) before it overflows.
SCORE_UNIT = float(1 << 20)


def window_priorities(indices: np.ndarray, seed: int) -> np.ndarray:
    """Uniform pseudo-random numbers in [0, 1) from window indices (splitmix64), the same on every run."""
    with np.errstate(over="ignore"):
        z = (np.asarray(indices, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z ^= np.uint64(seed & 0xFFFFFFFF) * np.uint64(0xD1B54A32D192ED03)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def score_bins(scores: torch.Tensor | np.ndarray, n_bins: int) -> np.ndarray:
    """Histogram bin of each window score in [0, 1] (1.0 goes in the last bin)."""
    values = scores.cpu().numpy() if isinstance(scores, torch.Tensor) else scores
    values = np.asarray(values, dtype=np.float64)
    return np.clip(np.floor(values * n_bins), 0, n_bins - 1).astype(np.int64)


def bin_deciles(counts: np.ndarray) -> np.ndarray:
    """Decile (1-10) of every histogram bin ``counts [..., bins]``, from the bin's middle rank.

    ``floor(10 * (windows below the bin + half the bin) / windows) + 1``: exact
    up to the bin width; windows in one bin share a decile.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    below = np.cumsum(counts, axis=-1) - counts
    middle = (below + counts / 2) / np.maximum(total, 1)
    return np.clip(np.floor(middle * N_DECILES), 0, N_DECILES - 1).astype(np.int64) + 1


@dataclass
class LayerBatch:
    """What one layer's hook keeps from one batch (all on the CPU)."""

    win_max: Float[torch.Tensor, "batch head"]
    paid: Float[torch.Tensor, "batch head pos_after_0"]
    received: Float[torch.Tensor, "batch head pos_after_0"]
    distance: Float[torch.Tensor, "head pos_after_0"]
    cand_batch: Int[torch.Tensor, " n"]  # window of each top-example candidate
    cand_head: Int[torch.Tensor, " n"]
    cand_keys: Int[torch.Tensor, "n pos k"]
    cand_values: Float[torch.Tensor, "n pos k"]
    cand_first: Float[torch.Tensor, "n pos"]
    res_keys: Int[torch.Tensor, "incoming head pos k"]
    res_values: Float[torch.Tensor, "incoming head pos k"]
    res_first: Float[torch.Tensor, "incoming head pos"]
    high_paid: Float[torch.Tensor, "batch head pos_after_0"]  # high-attention mass at each query position
    high_received: Float[torch.Tensor, "batch head pos_after_0"]  # and at each key position
    score_sums: Float[torch.Tensor, "head 3"] | None = None  # SCORE_METRICS summed over the batch's queries


class ScanState:
    """Everything a scan accumulates; fixed size for a given model and parameters.

    Per-head arrays are indexed by ``layer * n_heads + head``.
    """

    ARRAYS = ("hist", "top_scores", "top_window", "top_tokens", "top_keys", "top_values", "top_first",
              "res_priority", "res_window", "res_tokens", "res_scores", "res_keys", "res_values", "res_first",
              "distance_sum", "score_sum")
    SUMMARIES = ("tokens", "shard_tokens", "high_tokens", "shard_high_tokens")

    def __init__(self, n_layers: int, n_heads: int, seq_len: int, d_vocab: int, params: ScanParams):
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.seq_len = seq_len
        self.d_vocab = d_vocab
        self.params = params
        self.n_windows = 0
        heads = n_layers * n_heads
        self._init_histogram_and_top(heads)
        self._init_reservoir(heads)
        # Rows 0..heads-1: attention paid as a query; heads..2*heads-1: received as a key. ``tokens`` holds the
        # finished shards, ``shard_tokens`` the shard in progress (merged into ``tokens`` at its end).
        capacity = min(params.token_capacity, d_vocab)
        self.tokens = HeavyHitters.empty(2 * heads, capacity)
        self.shard_tokens = HeavyHitters.empty(2 * heads, capacity)
        # The same rows for the high-attention mass (A >= HIGH_ATTENTION, key >= 1): the token entropies.
        self.high_tokens = HeavyHitters.empty(2 * heads, capacity)
        self.shard_high_tokens = HeavyHitters.empty(2 * heads, capacity)
        # [2 * heads, tokens of the batch], filled layer by layer: attention paid/received, and its high part
        self._batch_weights: torch.Tensor | None = None
        self._batch_high: torch.Tensor | None = None
        self.token_count = torch.zeros(d_vocab, dtype=torch.int64)
        self.distance_sum = torch.zeros(heads, seq_len - 1, dtype=torch.int64)  # fixed point (heavy_hitters)
        # [head, SCORE_METRICS] sums over queries 1.. of every window, fixed point in units of 1 / SCORE_UNIT
        self.score_sum = torch.zeros(heads, len(SCORE_METRICS), dtype=torch.int64)

    def _init_histogram_and_top(self, heads: int) -> None:
        m, s, k = self.params.top_examples, self.seq_len, self.k
        self.hist = torch.zeros(heads, self.params.histogram_bins, dtype=torch.int64)
        self.top_scores = torch.full((heads, m), -np.inf, dtype=torch.float32)
        self.top_window = torch.full((heads, m), -1, dtype=torch.int64)
        self.top_tokens = torch.zeros(heads, m, s, dtype=torch.int32)
        self.top_keys = torch.zeros(heads, m, s, k, dtype=torch.int16)
        self.top_values = torch.zeros(heads, m, s, k, dtype=torch.float16)
        self.top_first = torch.zeros(heads, m, s, dtype=torch.float16)

    def _init_reservoir(self, heads: int) -> None:
        r, s, k = self.params.reservoir, self.seq_len, self.k
        self.res_priority = torch.full((r,), np.inf, dtype=torch.float64)
        self.res_window = torch.full((r,), -1, dtype=torch.int64)
        self.res_tokens = torch.zeros(r, s, dtype=torch.int32)
        self.res_scores = torch.zeros(heads, r, dtype=torch.float32)
        self.res_keys = torch.zeros(heads, r, s, k, dtype=torch.int16)
        self.res_values = torch.zeros(heads, r, s, k, dtype=torch.float16)
        self.res_first = torch.zeros(heads, r, s, dtype=torch.float16)

    @property
    def k(self) -> int:
        """Keys kept per query of a stored example."""
        return min(self.params.top_k_keys, self.seq_len - 1)

    def nbytes(self) -> int:
        tensors = [getattr(self, name) for name in self.ARRAYS] + [self.token_count]
        arrays = sum(t.numel() * t.element_size() for t in tensors)
        summaries = self.tokens.nbytes() + self.shard_tokens.nbytes(with_buffer=True)
        return arrays + summaries + self.high_tokens.nbytes() + self.shard_high_tokens.nbytes(with_buffer=True)

    # -- planning and merging -----------------------------------------------------------------

    def plan_reservoir(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which windows of the batch enter the reservoir: ``(batch rows, slots, priorities)``."""
        u = window_priorities(indices, self.params.seed)
        r = self.params.reservoir
        combined = np.concatenate([self.res_priority.numpy(), u])
        chosen = np.argsort(combined, kind="stable")[:r]
        incoming = np.sort(chosen[chosen >= r] - r)
        kept_slots = set(chosen[chosen < r].tolist())
        free = np.array([s for s in range(r) if s not in kept_slots], dtype=np.int64)[:len(incoming)]
        return incoming.astype(np.int64), free, u[incoming]

    def merge(self, layer: int, batch: LayerBatch, seq_tokens: Int[torch.Tensor, "batch pos"], indices: np.ndarray,
              res_rows: np.ndarray, res_slots: np.ndarray) -> None:
        """Fold one layer's reductions of a batch into the state."""
        h0, h1 = layer * self.n_heads, (layer + 1) * self.n_heads
        scores = batch.win_max.t().contiguous()  # [head, batch]
        bins = torch.from_numpy(score_bins(scores, self.params.histogram_bins))
        self.hist[h0:h1].scatter_add_(1, bins, torch.ones_like(bins))
        self._merge_token_sums(h0, h1, batch, seq_tokens)
        self.distance_sum[h0:h1] = add_exact(self.distance_sum[h0:h1], to_fixed(batch.distance))
        if batch.score_sums is None:
            raise ValueError(f"layer {layer}'s batch has no score sums (hook_attn_scores did not fire)")
        self.score_sum[h0:h1] = add_exact(self.score_sum[h0:h1], to_fixed(batch.score_sums, SCORE_UNIT))
        if len(batch.cand_batch):
            self._merge_top(h0, h1, scores, batch, seq_tokens, indices)
        if len(res_rows):
            slots = torch.from_numpy(res_slots)
            self.res_scores[h0:h1, slots] = scores[:, torch.from_numpy(res_rows)]
            self.res_keys[h0:h1, slots] = batch.res_keys.transpose(0, 1)
            self.res_values[h0:h1, slots] = batch.res_values.transpose(0, 1)
            self.res_first[h0:h1, slots] = batch.res_first.transpose(0, 1)

    def _merge_token_sums(self, h0: int, h1: int, batch: LayerBatch, seq_tokens: torch.Tensor) -> None:
        """Keep the layer's per-position attention paid and received; :meth:`count_tokens` folds the batch."""
        heads = self.n_layers * self.n_heads
        if self._batch_weights is None or self._batch_high is None:
            self._batch_weights = torch.zeros(2 * heads, batch.paid.shape[0] * batch.paid.shape[2])
            self._batch_high = torch.zeros_like(self._batch_weights)
        for weights, paid, received in ((self._batch_weights, batch.paid, batch.received),
                                        (self._batch_high, batch.high_paid, batch.high_received)):
            weights[h0:h1] = paid.permute(1, 0, 2).reshape(self.n_heads, -1)
            weights[heads + h0:heads + h1] = received.permute(1, 0, 2).reshape(self.n_heads, -1)

    def _merge_top(self, h0: int, h1: int, scores: torch.Tensor, batch: LayerBatch, seq_tokens: torch.Tensor,
                   indices: np.ndarray) -> None:
        n_heads, m = h1 - h0, self.params.top_examples
        n_batch = scores.shape[1]
        candidate_row = torch.full((n_heads, n_batch), -1, dtype=torch.int64)
        candidate_row[batch.cand_head, batch.cand_batch] = torch.arange(len(batch.cand_batch))
        masked = torch.where(candidate_row >= 0, scores, torch.tensor(-np.inf))
        # A stable sort keeps earlier windows first among equal scores (old entries precede the batch).
        values, order = torch.sort(torch.cat([self.top_scores[h0:h1], masked], dim=1), dim=1, descending=True,
                                   stable=True)
        values, order = values[:, :m], order[:, :m]
        from_old = order < m
        heads = torch.arange(n_heads)[:, None]
        rows = candidate_row[heads, (order - m).clamp(min=0)].clamp(min=0)  # [head, m]
        old_pick = order.clamp(max=m - 1)
        cand_window = torch.from_numpy(indices)[batch.cand_batch]
        cand_tokens = seq_tokens[batch.cand_batch].to(torch.int32)

        def choose(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            picked_old = old[h0:h1][heads, old_pick]
            picked_new = new[rows]
            mask = from_old.reshape(from_old.shape + (1,) * (picked_old.dim() - 2))
            return torch.where(mask, picked_old, picked_new)

        self.top_window[h0:h1] = choose(self.top_window, cand_window)
        self.top_tokens[h0:h1] = choose(self.top_tokens, cand_tokens)
        self.top_keys[h0:h1] = choose(self.top_keys, batch.cand_keys)
        self.top_values[h0:h1] = choose(self.top_values, batch.cand_values)
        self.top_first[h0:h1] = choose(self.top_first, batch.cand_first)
        self.top_scores[h0:h1] = values

    def commit_reservoir(self, seq_tokens: torch.Tensor, indices: np.ndarray, rows: np.ndarray, slots: np.ndarray,
                         priorities: np.ndarray) -> None:
        """Record the windows planned into the reservoir (after every layer has merged)."""
        if len(rows):
            slots_t = torch.from_numpy(slots)
            self.res_priority[slots_t] = torch.from_numpy(priorities)
            self.res_window[slots_t] = torch.from_numpy(indices[rows])
            self.res_tokens[slots_t] = seq_tokens[torch.from_numpy(rows)].to(torch.int32)

    def count_tokens(self, seq_tokens: torch.Tensor, n_windows: int) -> None:
        """Count the batch's tokens at positions 1.. and its windows; fold its token weights into the summary."""
        text = seq_tokens[:, 1:].reshape(-1)
        self.token_count.index_add_(0, text, torch.ones_like(text))
        if self._batch_weights is not None and self._batch_high is not None:
            self.shard_tokens.add(text, self._batch_weights)
            self.shard_high_tokens.add(text, self._batch_high)
            self._batch_weights = self._batch_high = None
        self.n_windows += n_windows
        if self.n_windows % self.params.shard_windows == 0:
            self.end_shard()

    def end_shard(self) -> None:
        """Merge the token summaries of the shard in progress into those of the finished shards."""
        for finished, current in (("tokens", "shard_tokens"), ("high_tokens", "shard_high_tokens")):
            if not getattr(self, current).is_empty():
                getattr(self, finished).merge(getattr(self, current))
                setattr(self, current, HeavyHitters.empty(*getattr(self, finished).ids.shape))

    def merge_state(self, shard: "ScanState") -> None:
        """Fold the state of the next shard (scanned from an empty state, its shard ended) into this one.

        Exact: the result does not depend on how the windows were split into shards, as long as the
        token summaries of the shards are merged in shard order (see the module docstring).
        """
        for state in (self, shard):
            if not state.shard_tokens.is_empty() or not state.shard_high_tokens.is_empty():
                raise ValueError("merge_state needs both states at a shard boundary (end_shard first)")
        self.hist += shard.hist
        self.distance_sum = add_exact(self.distance_sum, shard.distance_sum)
        self.score_sum = add_exact(self.score_sum, shard.score_sum)
        self.token_count += shard.token_count
        self.n_windows += shard.n_windows
        self.tokens.merge(shard.tokens)
        self.high_tokens.merge(shard.high_tokens)
        self._merge_top_state(shard)
        self._merge_reservoir_state(shard)

    def _merge_top_state(self, shard: "ScanState") -> None:
        m = self.params.top_examples
        windows = torch.cat([self.top_window, shard.top_window], dim=1)
        scores = torch.cat([self.top_scores, shard.top_scores], dim=1)
        order = torch.sort(windows, dim=1, stable=True).indices  # then by score, highest first: (-score, window)
        order = order.gather(1, torch.sort(scores.gather(1, order), dim=1, descending=True, stable=True).indices)
        order = order[:, :m]
        for name in ("top_scores", "top_window", "top_tokens", "top_keys", "top_values", "top_first"):
            both = torch.cat([getattr(self, name), getattr(shard, name)], dim=1)
            index = order.reshape(order.shape + (1,) * (both.dim() - 2)).expand((-1, -1) + both.shape[2:])
            setattr(self, name, both.gather(1, index))

    def _merge_reservoir_state(self, shard: "ScanState") -> None:
        r = self.params.reservoir
        priority = torch.cat([self.res_priority, shard.res_priority])
        window = torch.cat([self.res_window, shard.res_window])
        self._take_reservoir(_by_priority(priority, window)[:r], shard)

    def canonical_reservoir(self) -> None:
        """Order the reservoir's slots by (priority, window), empty slots last: the layout a merge gives."""
        self._take_reservoir(_by_priority(self.res_priority, self.res_window), None)

    def _take_reservoir(self, slots: torch.Tensor, shard: "ScanState | None") -> None:
        for name in ("res_priority", "res_window", "res_tokens"):
            both = getattr(self, name) if shard is None else torch.cat([getattr(self, name), getattr(shard, name)])
            setattr(self, name, both[slots])
        for name in ("res_scores", "res_keys", "res_values", "res_first"):
            both = getattr(self, name)
            if shard is not None:
                both = torch.cat([both, getattr(shard, name)], dim=1)
            setattr(self, name, both[:, slots])

    # -- saving ---------------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as arrays; the reservoir's filled slots only, the token summaries' used counters only."""
        arrays = {name: getattr(self, name).numpy() for name in self.ARRAYS if name not in RESERVOIR}
        slots = torch.nonzero(self.res_window >= 0).flatten()
        arrays["res_slots"] = slots.numpy()
        for name, axis in RESERVOIR.items():
            arrays[name] = getattr(self, name).index_select(axis, slots).numpy()
        seen = torch.nonzero(self.token_count).flatten()
        arrays.update(seen_ids=seen.numpy(), seen_count=self.token_count[seen].numpy())
        for name in self.SUMMARIES:
            arrays.update(getattr(self, name).to_arrays(name))
        return arrays

    def load_arrays(self, arrays: dict[str, np.ndarray], n_windows: int) -> None:
        """Restore :meth:`to_arrays`; :class:`CorruptFileError` for a checkpoint that does not fit (one
        saved before an array existed, or by other parameters)."""
        missing = [name for name in self.ARRAYS + ("res_slots", "seen_ids", "seen_count") if name not in arrays]
        if missing:
            raise CorruptFileError(f"The scan checkpoint lacks {', '.join(missing)} (an older format); "
                                   "it will be recomputed.")
        slots = torch.from_numpy(np.array(arrays["res_slots"])).long()
        for name in self.ARRAYS:
            current = getattr(self, name)
            value = torch.from_numpy(np.array(arrays[name]))
            if name in RESERVOIR:  # filled slots only: put them back in place
                axis = RESERVOIR[name]
                expected = current.shape[:axis] + (len(slots),) + current.shape[axis + 1:]
                if value.shape != expected or value.dtype != current.dtype:
                    raise CorruptFileError(f"The scan checkpoint's {name} has the wrong shape; it will be recomputed.")
                value = current.index_copy(axis, slots, value)
            elif value.shape != current.shape or value.dtype != current.dtype:
                raise CorruptFileError(f"The scan checkpoint's {name} has the wrong shape; it will be recomputed.")
            setattr(self, name, value)
        seen = torch.from_numpy(np.array(arrays["seen_ids"])).long()
        self.token_count[seen] = torch.from_numpy(np.array(arrays["seen_count"]))
        for name in self.SUMMARIES:
            try:
                summary = HeavyHitters.from_arrays(arrays, name, self.tokens.capacity)
            except ValueError as err:
                raise CorruptFileError(f"The scan checkpoint's {name} summary is unusable ({err}).") from err
            if summary.ids.shape != self.tokens.ids.shape:
                raise CorruptFileError(f"The scan checkpoint's {name} summary has the wrong shape.")
            setattr(self, name, summary)
        self.n_windows = n_windows


# The reservoir's arrays and their slot axis: saved for filled slots only.
RESERVOIR = {"res_priority": 0, "res_window": 0, "res_tokens": 0, "res_scores": 1, "res_keys": 1, "res_values": 1,
             "res_first": 1}


def _by_priority(priority: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Slots ordered by (priority, window index); empty slots (priority inf, window -1) last."""
    order = torch.sort(window, stable=True).indices
    return order[torch.sort(priority[order], stable=True).indices]
