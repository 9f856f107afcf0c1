"""A finished dataset scan and the queries the page and the CLI ask of it.

:meth:`ScanResult.from_state` buckets the state's reservoir by each head's
deciles; the lookups then read plain arrays (per head, indexed by
``layer * n_heads + head``), so an opened result needs neither the model nor
the corpus.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from headvis_core.atlas.metrics import SCORE_METRICS, distance_mean_variance
from headvis_core.errors import CorruptFileError
from headvis_core.heads import HeadRef
from headvis_core.scan.heavy_hitters import FIXED_POINT, entropy_bits_bounded, estimates_of, from_fixed
from headvis_core.scan.params import N_DECILES, ScanParams
from headvis_core.scan.state import SCORE_UNIT, ScanState, bin_deciles, score_bins
from headvis_core.scan.store import read_stage
from headvis_core.sparse_attention import SparseAttention

# The HeadVis metrics as scan statistics (definitions: headvis_core.atlas.metrics and scan/run.py), one line each,
# pooled over every query 1.. of every window of the scan: columns of ScanResult.head_summary().
SCAN_METRIC_DESCRIPTIONS: dict[str, str] = {
    "logit_std": "standard deviation of a query's pre-softmax scores over the keys it may see, mean over queries",
    "top_logit_margin": "largest minus second-largest pre-softmax score of a query, mean over queries",
    "logit_z_score": "(max - mean) / std of a query's pre-softmax scores, mean over queries",
    "query_token_entropy": "entropy (bits) of the query tokens of pairs with attention >= 0.3 to a key past "
                           "position 0, weighted by that attention",
    "key_token_entropy": "entropy (bits) of the key tokens (past position 0) receiving attention >= 0.3 from a "
                         "query, weighted by that attention",
    "qk_distance": "query position minus key position, mean weighted by attention mass, position 0 excluded",
    "qk_distance_variance": "variance of q - k weighted by attention mass, position 0 excluded",
}


@dataclass
class ScanExample:
    window_index: int | str  # a HeadVis tree's custom sequences have ids such as "c1"
    score: float  # max attention excluding row and column 0
    decile: int  # 1-10, 0 for top examples outside the reservoir's bucketing
    token_ids: np.ndarray  # [seq_len]
    str_tokens: list[str]
    attention: SparseAttention
    max_query: int  # where the max attention sits
    max_key: int

    @property
    def text(self) -> str:
        return "".join(self.str_tokens[1:])


@dataclass
class DecileBucket:
    decile: int  # 10 = highest
    n_windows: int  # windows of the corpus in this decile
    low: float  # score range (bin edges)
    high: float
    examples: list[ScanExample]


def _decile_slots(state: ScanState, deciles_of_bins: np.ndarray) -> np.ndarray:
    """``[head, decile, example]`` reservoir slot of each kept example (-1: none), best score first.

    The reservoir is read in priority order (a uniform random order), so each
    decile keeps a random sample of its windows.
    """
    p = state.params
    valid = np.nonzero(state.res_window.numpy() >= 0)[0]
    valid = valid[np.argsort(state.res_priority.numpy()[valid], kind="stable")]
    res_scores = state.res_scores.numpy()
    n_heads_total = res_scores.shape[0]
    slot = np.full((n_heads_total, N_DECILES, p.examples_per_decile), -1, dtype=np.int64)
    for head in range(n_heads_total):
        decile = deciles_of_bins[head, score_bins(res_scores[head, valid], p.histogram_bins)]
        for d in range(1, N_DECILES + 1):
            chosen = valid[decile == d][:p.examples_per_decile]
            chosen = chosen[np.argsort(-res_scores[head, chosen], kind="stable")]
            slot[head, d - 1, :len(chosen)] = chosen
    return slot


@dataclass
class ScanResult:
    """A finished scan: per-head arrays indexed by ``layer * n_heads + head`` plus metadata."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    path: Optional[Path] = None

    @classmethod
    def from_state(cls, state: ScanState, tokenizer: Any, meta: dict[str, Any]) -> "ScanResult":
        """Bucket the reservoir by each head's deciles and keep the chosen examples only.

        Ends the state's last shard and puts its reservoir in canonical order first, so a one-process
        and a sharded scan of the same windows give the same arrays.
        """
        state.end_shard()
        state.canonical_reservoir()
        hist = state.hist.numpy()
        slot = _decile_slots(state, bin_deciles(hist))
        safe = np.clip(slot, 0, None)
        heads_idx = np.arange(hist.shape[0])[:, None, None]
        valid = state.res_window.numpy() >= 0
        used_tokens = np.unique(np.concatenate([state.res_tokens.numpy()[valid].ravel(),
                                                state.top_tokens.numpy().ravel()]))
        seen = torch.nonzero(state.token_count).flatten().numpy()
        vocab_ids = np.union1d(used_tokens, seen).astype(np.int64)
        vocab = tokenizer.batch_decode([[int(i)] for i in vocab_ids])
        res_scores = state.res_scores.numpy()
        arrays = {
            "hist": hist,
            "top_scores": state.top_scores.numpy(),
            "top_window": state.top_window.numpy(),
            "top_tokens": state.top_tokens.numpy(),
            "top_keys": state.top_keys.numpy(),
            "top_values": state.top_values.numpy(),
            "top_first": state.top_first.numpy(),
            "ex_slot": slot,
            "ex_window": np.where(slot >= 0, state.res_window.numpy()[safe], -1),
            "ex_scores": np.where(slot >= 0, res_scores[heads_idx, safe], np.nan).astype(np.float32),
            "ex_tokens": state.res_tokens.numpy()[safe],
            "ex_keys": state.res_keys.numpy()[heads_idx, safe],
            "ex_values": state.res_values.numpy()[heads_idx, safe],
            "ex_first": state.res_first.numpy()[heads_idx, safe],
            "token_ids": seen,
            "token_count": state.token_count.numpy()[seen],
            "hh_ids": state.tokens.ids.numpy(),  # rows: heads as queries, then heads as keys
            "hh_totals": state.tokens.totals.numpy(),
            "hh_slack": state.tokens.slack.numpy(),
            "distance_sum": from_fixed(state.distance_sum),
            "score_sum": from_fixed(state.score_sum, SCORE_UNIT),  # [head, SCORE_METRICS]
            "high_ids": state.high_tokens.ids.numpy(),  # rows as hh_*: heads as queries, then as keys
            "high_totals": state.high_tokens.totals.numpy(),
            "high_slack": state.high_tokens.slack.numpy(),
            "high_weight": state.high_tokens.weight.numpy(),
            "vocab_ids": vocab_ids,
        }
        return cls(arrays, {**meta, "vocab": vocab})

    # -- lookups -------------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.meta["n_heads"])

    @property
    def n_windows(self) -> int:
        return int(self.meta["n_windows"])

    @property
    def params(self) -> ScanParams:
        return ScanParams(**self.meta["params"])

    def _slot(self, head: HeadRef) -> int:
        head.check(self.n_layers, self.n_heads)
        return head.layer * self.n_heads + head.head

    def token_strings(self, ids: np.ndarray) -> list[str]:
        if not hasattr(self, "_vocab_lookup"):
            self._vocab_lookup = dict(zip(self.arrays["vocab_ids"].tolist(), self.meta["vocab"]))
        return [self._vocab_lookup.get(int(i), f"<{int(i)}>") for i in ids]

    def _example(self, prefix: str, slot: int, index: tuple, decile: int, window: int, score: float) -> ScanExample:
        tokens = self.arrays[f"{prefix}_tokens"][index]
        keys = self.arrays[f"{prefix}_keys"][slot][index[1:]].astype(np.int64)
        values = self.arrays[f"{prefix}_values"][slot][index[1:]].astype(np.float32)
        first = self.arrays[f"{prefix}_first"][slot][index[1:]].astype(np.float32)
        values[0] = 0.0  # position 0 has no keys after position 0
        q, j = np.unravel_index(int(np.argmax(values)), values.shape)
        return ScanExample(window_index=int(window), score=float(score), decile=decile, token_ids=tokens,
                           str_tokens=self.token_strings(tokens), attention=SparseAttention(keys, values, first),
                           max_query=int(q), max_key=int(keys[q, j]))

    def score_histogram(self, head: HeadRef) -> tuple[np.ndarray, np.ndarray]:
        """``(bin_edges [bins + 1], counts [bins])`` of the window scores of ``head``."""
        counts = self.arrays["hist"][self._slot(head)]
        return np.linspace(0.0, 1.0, len(counts) + 1), counts

    def _decile_examples(self, slot: int, decile: int) -> list[ScanExample]:
        examples = []
        for e in range(self.arrays["ex_slot"].shape[2]):
            if self.arrays["ex_slot"][slot, decile - 1, e] < 0:
                continue
            index = (slot, decile - 1, e)
            examples.append(self._example("ex", slot, index, decile, self.arrays["ex_window"][index],
                                          self.arrays["ex_scores"][index]))
        return examples

    def deciles(self, head: HeadRef) -> list[DecileBucket]:
        """Decile buckets of ``head``, highest (10) first, with their example windows."""
        slot = self._slot(head)
        counts = self.arrays["hist"][slot]
        of_bin = bin_deciles(counts)
        edges = np.linspace(0.0, 1.0, len(counts) + 1)
        buckets = []
        for d in range(N_DECILES, 0, -1):
            in_decile = np.nonzero((of_bin == d) & (counts > 0))[0]
            low = float(edges[in_decile[0]]) if len(in_decile) else float("nan")
            high = float(edges[in_decile[-1] + 1]) if len(in_decile) else float("nan")
            buckets.append(DecileBucket(decile=d, n_windows=int(counts[in_decile].sum()), low=low, high=high,
                                        examples=self._decile_examples(slot, d)))
        return buckets

    def top_examples(self, head: HeadRef) -> list[ScanExample]:
        """The highest-scoring windows of ``head`` over the whole corpus (exact), best first."""
        slot = self._slot(head)
        out = []
        for e, window in enumerate(self.arrays["top_window"][slot]):
            if window >= 0:
                out.append(self._example("top", slot, (slot, e), 10, window, self.arrays["top_scores"][slot, e]))
        return out

    def top_tokens(self, head: HeadRef, role: str = "query", n: int = 20, min_count: int = 5) -> pd.DataFrame:
        """Tokens that pay (``role="query"``) or receive (``"key"``) the most attention on average.

        Columns: token, token_id, count (occurrences at positions 1..), mean_attention, total_attention,
        error_bound. Tokens seen fewer than ``min_count`` times are left out (their averages are noise).

        Totals come from a bounded summary (:mod:`headvis_core.scan.heavy_hitters`): each lies in
        ``[total_attention, total_attention + slack]``, so the true mean lies in
        ``[mean_attention, mean_attention + error_bound]``; ``error_bound`` is 0 (exact) while the
        corpus has no more distinct tokens than the summary's capacity. Scans saved before the summary
        (per-vocabulary sums) open with ``error_bound`` 0.
        """
        if role not in ("query", "key"):
            raise ValueError("role must be 'query' or 'key'")
        slot = self._slot(head)
        counts = self.arrays["token_count"]
        keep = counts >= min_count
        if not keep.any():
            keep = counts > 0
        ids, counts = self.arrays["token_ids"][keep], counts[keep]
        if "token_paid" in self.arrays:  # format of scans stored before the bounded summary
            sums, slack = self.arrays["token_paid" if role == "query" else "token_received"][slot][keep], 0.0
        else:
            row = slot + (0 if role == "query" else self.n_layers * self.n_heads)
            sums = estimates_of(self.arrays["hh_ids"][row], self.arrays["hh_totals"][row], ids)
            slack = float(self.arrays["hh_slack"][row]) / FIXED_POINT
        mean = sums / counts
        order = np.lexsort((ids, -mean))[:n]
        return pd.DataFrame({"token": self.token_strings(ids[order]), "token_id": ids[order], "count": counts[order],
                             "mean_attention": mean[order], "total_attention": sums[order],
                             "error_bound": slack / counts[order]})

    def distance_histogram(self, head: HeadRef) -> np.ndarray:
        """Share of ``head``'s attention (positions 1..) at each query-key distance 0, 1, ..., as ``[distance]``."""
        values = self.arrays["distance_sum"][self._slot(head)]
        return values / max(values.sum(), 1e-12)

    @property
    def stale_note(self) -> str | None:
        """Why this stored scan lacks some statistics (stored before they existed), or None when it has all."""
        if "score_sum" in self.arrays and "high_totals" in self.arrays:
            return None
        return ("This scan was stored before the HeadVis statistics (logit_std, top_logit_margin, "
                "logit_z_score, token entropies); rerun it (--force) to add them.")

    def headvis_metrics(self) -> dict[str, np.ndarray]:
        """``{metric: [layer * n_heads + head]}`` for :data:`SCAN_METRIC_DESCRIPTIONS`, and per side whether
        the token entropy is exact (``query_token_entropy_exact``: the head's high-attention tokens fit the
        summary) and its error bound (``query_token_entropy_error``: 0 when exact; otherwise the value is
        the middle of an interval proven to hold the true entropy, and this its half-width; see
        :func:`headvis_core.scan.heavy_hitters.entropy_bits_bounded`). Definitions: ``scan/run.py``.

        Scans stored before these statistics give NaN for the score and entropy ones (and ``exact``
        False); the distances come from the distance histogram every scan has.
        """
        heads = self.n_layers * self.n_heads
        dist = self.arrays["distance_sum"]
        d = np.arange(dist.shape[1], dtype=np.float64)
        moments = torch.from_numpy(np.stack([dist.sum(1), dist @ d, dist @ d ** 2]))
        mean, variance = distance_mean_variance(moments)
        out = {"qk_distance": mean.numpy(), "qk_distance_variance": variance.numpy()}
        nan = np.full(heads, np.nan)
        if "score_sum" in self.arrays:
            n_queries = int(self.arrays["hist"][0].sum()) * dist.shape[1]  # windows x queries 1.. of each
            for i, name in enumerate(SCORE_METRICS):
                out[name] = self.arrays["score_sum"][:, i] / n_queries if n_queries else nan
        else:
            out.update({name: nan for name in SCORE_METRICS})
        for side, rows in (("query", slice(0, heads)), ("key", slice(heads, 2 * heads))):
            if "high_totals" in self.arrays:
                summary = [self.arrays[f"high_{name}"][rows] for name in ("totals", "weight", "slack")]
                entropy, error = entropy_bits_bounded(*summary, n_tokens=len(self.arrays["token_ids"]))
                exact = self.arrays["high_slack"][rows] == 0
            else:
                entropy, error, exact = nan, nan, np.zeros(heads, dtype=bool)
            out[f"{side}_token_entropy"] = entropy
            out[f"{side}_token_entropy_exact"] = exact
            out[f"{side}_token_entropy_error"] = error
        return out

    def head_summary(self) -> pd.DataFrame:
        """One row per head: mean and top-decile window score, its typical attention distance, and the HeadVis
        metrics (:data:`SCAN_METRIC_DESCRIPTIONS`; see :meth:`headvis_metrics`)."""
        hist = self.arrays["hist"].astype(np.float64)
        n_bins = hist.shape[1]
        centres = (np.arange(n_bins) + 0.5) / n_bins
        mean = (hist * centres).sum(1) / np.maximum(hist.sum(1), 1)
        of_bin = bin_deciles(hist)
        lower_edges = np.arange(n_bins) / n_bins
        top_low = np.array([lower_edges[(of_bin[i] == N_DECILES) & (hist[i] > 0)].min(initial=1.0)
                            for i in range(len(hist))])
        dist = self.arrays["distance_sum"]
        dist_share = dist / np.maximum(dist.sum(1, keepdims=True), 1e-12)
        rows = np.arange(hist.shape[0])
        return pd.DataFrame({
            "layer": rows // self.n_heads,
            "head": rows % self.n_heads,
            "name": [f"{r // self.n_heads}.{r % self.n_heads}" for r in rows],
            "mean_max_attention": mean,
            "top_decile_from": top_low,
            "top_score": self.arrays["top_scores"][:, 0],
            "mode_distance": dist_share.argmax(1),
            "share_at_mode": dist_share.max(1),
            "mean_distance": (dist_share * np.arange(dist.shape[1])).sum(1),
            **self.headvis_metrics(),
        })

    def examples_table(self, head: HeadRef) -> pd.DataFrame:
        """All stored examples of ``head`` (top and per decile) as text, for download."""
        def row(kind: str, decile: int | str, ex: ScanExample) -> dict[str, Any]:
            return {"set": kind, "decile": decile, "window": ex.window_index, "score": ex.score,
                    "query": f"{ex.max_query}:{ex.str_tokens[ex.max_query]}",
                    "key": f"{ex.max_key}:{ex.str_tokens[ex.max_key]}", "text": ex.text}

        rows = [row("top", "", ex) for ex in self.top_examples(head)]
        rows += [row("decile", bucket.decile, ex) for bucket in self.deciles(head) for ex in bucket.examples]
        return pd.DataFrame(rows)


def load_scan(folder: Path) -> ScanResult:
    """A complete stored scan, checked against its manifest; :class:`CorruptFileError` if damaged or partial."""
    folder = Path(folder)
    try:
        status, arrays, meta = read_stage(folder)
    except FileNotFoundError as err:
        raise CorruptFileError(f"No scan is stored in {folder}.") from err
    if status != "complete":
        raise CorruptFileError(f"The scan in {folder.name} is unfinished ({meta.get('n_windows', 0)} windows so far); "
                               "run it again to resume.")
    return ScanResult(arrays, meta, path=folder)
