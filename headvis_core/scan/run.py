"""Dataset scans: every head's behaviour across a corpus, HeadVis style, in bounded memory.

The corpus is cut into windows of ``window_len`` tokens (BOS put in front
where the model uses one) and run through the model in batches. A hook on
each layer's ``hook_pattern`` reduces the ``[batch, head, query, key]``
pattern at once, so no pattern outlives its layer. For every head it keeps:

* **window score**: each window's maximum attention weight, excluding the
  row and the column of position 0 (the BOS/first token, where heads park
  attention they do not need; as HeadVis does). Scores go into a histogram
  of ``histogram_bins`` equal bins on [0, 1].
* **deciles** (10 = highest, 1 = lowest) of the window score, read from that
  histogram: a bin's decile is that of its middle rank,
  ``floor(10 * (windows below the bin + half the bin) / windows) + 1``, so
  boundaries are exact up to the bin width (1/4096 by default) and windows
  in one bin share a decile.
* **examples per decile**: a uniform random sample (reservoir) of
  ``reservoir_size`` windows, the same windows for every head, chosen by
  the smallest hash-derived priority of the window index (so a resumed
  scan keeps exactly the same sample). At the end each head's sampled
  windows are bucketed by its deciles and ``examples_per_decile`` are kept
  per decile. With ``reservoir_size = 40 x examples_per_decile`` a decile
  holds about 4x the examples it needs. Each example keeps the top
  ``top_k_keys`` keys of every query (sparse attention) and the attention
  to position 0.
* **top examples**: the exact ``top_examples`` highest-scoring windows (a
  fixed-size running top-k per head).
* **top tokens**: per token id, the attention it pays as a query (to
  positions 1..) and receives as a key (from queries 1..), summed and
  averaged per occurrence; held per vocabulary entry, so memory is bounded
  by the vocabulary, not the corpus.
* **distance histogram**: attention weight summed by query-key distance
  ``q - k`` over positions 1.., which separates previous-token heads
  (distance 1), local heads and long-range (induction, duplicate) heads.

All state has a fixed size set by the model and the parameters, whatever
the corpus size. Results live under ``results_dir("scans")/<key>`` where the
key hashes model + corpus fingerprint + parameters. A manifest names the
data file and its SHA-256; data files are written atomically and named by
their hash, so a crash leaves either the old or the new complete file, and
a corrupt or partial file is detected, deleted and recomputed, never shown.
Progress is checkpointed every ``checkpoint_seconds``; re-running after an
interruption resumes from the last checkpoint with the same result.
"""

import hashlib
import io
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from headvis_core.data.corpus import Corpus, iter_window_batches
from headvis_core.errors import CorruptFileError, InputError
from headvis_core.heads import HeadRef
from headvis_core.hooks import run_with_hooks
from headvis_core.lab.patterns import pattern_hook
from headvis_core.models.loader import LoadedModel
from headvis_core.paths import results_dir
from headvis_core.progress import ProgressCallback, report
from headvis_core.storage import atomic_write_bytes, atomic_write_json, read_json
from headvis_core.tokens import bos_token_id
from headvis_core.viz.token_view import SparseAttention

FORMAT_VERSION = 1
N_DECILES = 10
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ScanParams:
    """What a scan computes (all of it goes into the result key)."""

    window_len: int = 64  # corpus tokens per window, BOS not counted
    max_windows: Optional[int] = 1000  # None: the whole corpus
    examples_per_decile: int = 4
    top_examples: int = 8
    top_k_keys: int = 4  # sparse attention kept per query of an example
    reservoir_size: Optional[int] = None  # None: 40 x examples_per_decile
    histogram_bins: int = 4096
    seed: int = 0

    @property
    def reservoir(self) -> int:
        return int(self.reservoir_size or 4 * N_DECILES * self.examples_per_decile)

    def check(self, n_ctx: int) -> None:
        if not 2 <= self.window_len < min(n_ctx, 32767):
            raise InputError(f"The window length must be between 2 and {min(n_ctx, 32767) - 1} tokens for this "
                             f"model (context {n_ctx}, one position for BOS); got {self.window_len}.")
        if self.max_windows is not None and self.max_windows < 1:
            raise InputError("The number of windows must be at least 1.")
        for name in ("examples_per_decile", "top_examples", "top_k_keys", "histogram_bins"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be at least 1.")


# --------------------------------------------------------------------------------------------------
# Keys and storage


def model_identity(loaded: LoadedModel) -> dict[str, str]:
    info = loaded.info
    return {"name": info.name, "source": info.source, "dtype": info.dtype}


def scan_key(loaded: LoadedModel, corpus: Corpus, params: ScanParams) -> str:
    """Folder name of a scan: readable prefix plus a hash of model + corpus + parameters."""
    payload = json.dumps({"format": FORMAT_VERSION, "model": model_identity(loaded), "corpus": corpus.fingerprint,
                          "params": asdict(params)}, sort_keys=True)
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
    label = Path(corpus.spec.rstrip("/")).name or corpus.spec
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in f"{loaded.info.name}-{label}")[:60]
    return f"{safe}-{digest}"


def scans_root() -> Path:
    """Where scans are stored by default (the pages and the CLI without ``--out``)."""
    return results_dir("scans")


def _pack(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    meta_bytes = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    np.savez(buffer, __meta__=meta_bytes, **arrays)
    return buffer.getvalue()


def _unpack(data: bytes, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
    except Exception as err:  # a damaged zip can fail in many ways
        raise CorruptFileError(f"The stored scan file {name} cannot be read ({err}).") from err
    return arrays, meta


def _write_stage(folder: Path, stage: str, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                 manifest_extra: dict[str, Any]) -> None:
    """Write a data file named by its hash, then the manifest pointing to it, then drop older files."""
    data = _pack(arrays, meta)
    digest = hashlib.sha256(data).hexdigest()
    name = f"{stage}-{digest[:16]}.npz"
    atomic_write_bytes(folder / name, data)
    atomic_write_json(folder / MANIFEST, {"format": FORMAT_VERSION, "status": stage, "file": name, "sha256": digest,
                                          "bytes": len(data), "updated": time.time(), **manifest_extra})
    for old in folder.glob("*.npz"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _read_stage(folder: Path) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
    """``(status, arrays, meta)`` of a stored scan, checking the manifest's checksum.

    Raises :class:`CorruptFileError` for a corrupt or partial file and
    ``FileNotFoundError`` when nothing is stored.
    """
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "file" not in manifest:
        raise CorruptFileError(f"The scan manifest in {folder.name} is not one this version can read.")
    path = folder / manifest["file"]
    if not path.is_file():
        raise CorruptFileError(f"The scan data file {manifest['file']} named by the manifest is missing.")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise CorruptFileError(f"The scan data file {path.name} is corrupt or incomplete (checksum mismatch).")
    arrays, meta = _unpack(data, path.name)
    return manifest["status"], arrays, meta


def _clear(folder: Path) -> None:
    for path in list(folder.glob("*.npz")) + [folder / MANIFEST]:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Streaming state


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
    values = np.asarray(scores.cpu().numpy() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    return np.clip(np.floor(values * n_bins), 0, n_bins - 1).astype(np.int64)


def bin_deciles(counts: np.ndarray) -> np.ndarray:
    """Decile (1-10) of every histogram bin ``counts [..., bins]``, from the bin's middle rank."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    below = np.cumsum(counts, axis=-1) - counts
    middle = (below + counts / 2) / np.maximum(total, 1)
    return np.clip(np.floor(middle * N_DECILES), 0, N_DECILES - 1).astype(np.int64) + 1


@dataclass
class _LayerBatch:
    """What one layer's hook keeps from one batch (all on the CPU)."""

    win_max: torch.Tensor  # [batch, head]
    paid: torch.Tensor  # [batch, head, pos-1]
    received: torch.Tensor  # [batch, head, pos-1]
    distance: torch.Tensor  # [head, pos-1]
    cand_batch: torch.Tensor  # [n] window of each top-example candidate
    cand_head: torch.Tensor  # [n]
    cand_keys: torch.Tensor  # [n, pos, k]
    cand_values: torch.Tensor  # [n, pos, k]
    cand_first: torch.Tensor  # [n, pos]
    res_keys: torch.Tensor  # [incoming, head, pos, k]
    res_values: torch.Tensor
    res_first: torch.Tensor  # [incoming, head, pos]


def _sparse_rows(patterns: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``k`` keys among positions 1.. of every query of ``patterns [..., query, key]``, and column 0."""
    top = torch.topk(patterns[..., 1:], k, dim=-1)
    return ((top.indices + 1).to(torch.int16).cpu(), top.values.to(torch.float16).cpu(),
            patterns[..., 0].to(torch.float16).cpu())


class ScanState:
    """Everything a scan accumulates; fixed size for a given model and parameters.

    Per-head arrays are indexed by ``layer * n_heads + head``.
    """

    def __init__(self, n_layers: int, n_heads: int, seq_len: int, d_vocab: int, params: ScanParams):
        self.n_layers, self.n_heads, self.seq_len, self.d_vocab, self.params = n_layers, n_heads, seq_len, d_vocab, params
        heads, m, r, k, s = n_layers * n_heads, params.top_examples, params.reservoir, self.k, seq_len
        self.n_windows = 0
        self.hist = torch.zeros(heads, params.histogram_bins, dtype=torch.int64)
        self.top_scores = torch.full((heads, m), -np.inf, dtype=torch.float32)
        self.top_window = torch.full((heads, m), -1, dtype=torch.int64)
        self.top_tokens = torch.zeros(heads, m, s, dtype=torch.int32)
        self.top_keys = torch.zeros(heads, m, s, k, dtype=torch.int16)
        self.top_values = torch.zeros(heads, m, s, k, dtype=torch.float16)
        self.top_first = torch.zeros(heads, m, s, dtype=torch.float16)
        self.res_priority = torch.full((r,), np.inf, dtype=torch.float64)
        self.res_window = torch.full((r,), -1, dtype=torch.int64)
        self.res_tokens = torch.zeros(r, s, dtype=torch.int32)
        self.res_scores = torch.zeros(heads, r, dtype=torch.float32)
        self.res_keys = torch.zeros(heads, r, s, k, dtype=torch.int16)
        self.res_values = torch.zeros(heads, r, s, k, dtype=torch.float16)
        self.res_first = torch.zeros(heads, r, s, dtype=torch.float16)
        self.paid_sum = torch.zeros(heads, d_vocab, dtype=torch.float64)
        self.received_sum = torch.zeros(heads, d_vocab, dtype=torch.float64)
        self.token_count = torch.zeros(d_vocab, dtype=torch.int64)
        self.distance_sum = torch.zeros(heads, s - 1, dtype=torch.float64)

    ARRAYS = ("hist", "top_scores", "top_window", "top_tokens", "top_keys", "top_values", "top_first",
              "res_priority", "res_window", "res_tokens", "res_scores", "res_keys", "res_values", "res_first",
              "distance_sum")

    @property
    def k(self) -> int:
        return min(self.params.top_k_keys, self.seq_len - 1)

    def nbytes(self) -> int:
        tensors = [getattr(self, name) for name in self.ARRAYS] + [self.paid_sum, self.received_sum, self.token_count]
        return sum(t.numel() * t.element_size() for t in tensors)

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

    def merge(self, layer: int, batch: _LayerBatch, seq_tokens: torch.Tensor, indices: np.ndarray,
              res_rows: np.ndarray, res_slots: np.ndarray) -> None:
        h0, h1 = layer * self.n_heads, (layer + 1) * self.n_heads
        scores = batch.win_max.t().contiguous()  # [head, batch]
        bins = torch.from_numpy(score_bins(scores, self.params.histogram_bins))
        self.hist[h0:h1].scatter_add_(1, bins, torch.ones_like(bins))
        text = seq_tokens[:, 1:].reshape(-1)  # tokens at positions 1..
        self.paid_sum[h0:h1].index_add_(1, text, batch.paid.permute(1, 0, 2).reshape(self.n_heads, -1).double())
        self.received_sum[h0:h1].index_add_(1, text, batch.received.permute(1, 0, 2).reshape(self.n_heads, -1).double())
        self.distance_sum[h0:h1] += batch.distance.double()
        if len(batch.cand_batch):
            self._merge_top(h0, h1, scores, batch, seq_tokens, indices)
        if len(res_rows):
            slots = torch.from_numpy(res_slots)
            self.res_scores[h0:h1, slots] = scores[:, torch.from_numpy(res_rows)]
            self.res_keys[h0:h1, slots] = batch.res_keys.transpose(0, 1)
            self.res_values[h0:h1, slots] = batch.res_values.transpose(0, 1)
            self.res_first[h0:h1, slots] = batch.res_first.transpose(0, 1)

    def _merge_top(self, h0: int, h1: int, scores: torch.Tensor, batch: _LayerBatch, seq_tokens: torch.Tensor,
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
        if len(rows):
            slots_t = torch.from_numpy(slots)
            self.res_priority[slots_t] = torch.from_numpy(priorities)
            self.res_window[slots_t] = torch.from_numpy(indices[rows])
            self.res_tokens[slots_t] = seq_tokens[torch.from_numpy(rows)].to(torch.int32)

    # -- saving ---------------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {name: getattr(self, name).numpy() for name in self.ARRAYS}
        seen = torch.nonzero(self.token_count).flatten()
        arrays.update(seen_ids=seen.numpy(), seen_count=self.token_count[seen].numpy(),
                      seen_paid=self.paid_sum[:, seen].numpy(), seen_received=self.received_sum[:, seen].numpy())
        return arrays

    def load_arrays(self, arrays: dict[str, np.ndarray], n_windows: int) -> None:
        for name in self.ARRAYS:
            current = getattr(self, name)
            value = torch.from_numpy(np.array(arrays[name]))
            if value.shape != current.shape or value.dtype != current.dtype:
                raise CorruptFileError(f"The scan checkpoint's {name} has the wrong shape; it will be recomputed.")
            setattr(self, name, value)
        seen = torch.from_numpy(np.array(arrays["seen_ids"])).long()
        self.token_count[seen] = torch.from_numpy(np.array(arrays["seen_count"]))
        self.paid_sum[:, seen] = torch.from_numpy(np.array(arrays["seen_paid"]))
        self.received_sum[:, seen] = torch.from_numpy(np.array(arrays["seen_received"]))
        self.n_windows = n_windows


# --------------------------------------------------------------------------------------------------
# Running


def _batch_hooks(state: ScanState, res_rows: torch.Tensor, out: dict[int, _LayerBatch]) -> list:
    """One hook per layer that reduces ``pattern [batch, head, query, key]`` to what the state keeps."""
    n = state.seq_len - 1
    k = state.k

    def make(layer: int):
        def reduce_pattern(pattern: torch.Tensor, hook: Any) -> None:
            p = pattern.detach().float()
            inner = p[:, :, 1:, 1:]  # drop the row and column of position 0
            win_max = inner.amax(dim=(-1, -2))  # [batch, head]
            per_distance = torch.zeros(p.shape[1], n + 1, device=p.device)
            per_distance.index_add_(1, distance_index(n, p.device), inner.sum(0).reshape(p.shape[1], n * n))
            heap_floor = state.top_scores[layer * state.n_heads:(layer + 1) * state.n_heads, -1].to(p.device)
            cand_batch, cand_head = torch.nonzero(win_max > heap_floor[None, :], as_tuple=True)
            cand = _sparse_rows(p[cand_batch, cand_head], k)
            res = _sparse_rows(p[res_rows.to(p.device)], k)
            out[layer] = _LayerBatch(win_max.cpu(), inner.sum(-1).cpu(), inner.sum(-2).cpu(), per_distance[:, :n].cpu(),
                                     cand_batch.cpu(), cand_head.cpu(), *cand, *res)
        return reduce_pattern

    return [(pattern_hook(layer), make(layer)) for layer in range(state.n_layers)]


_distance_cache: dict[tuple[int, str], torch.Tensor] = {}


def distance_index(n: int, device: Any) -> torch.Tensor:
    """``[n * n]`` bin of each (query, key) pair: ``q - k``, or ``n`` (discarded) where the key is later."""
    key = (n, str(device))
    if key not in _distance_cache:
        q = torch.arange(n)[:, None]
        kk = torch.arange(n)[None, :]
        _distance_cache[key] = torch.where(kk <= q, q - kk, torch.tensor(n)).reshape(-1).to(device)
    return _distance_cache[key]


def scan_batch(model: Any, state: ScanState, seq_tokens: torch.Tensor, indices: np.ndarray,
               device: Any = "cpu") -> None:
    """Run one batch ``seq_tokens [batch, seq_len]`` (BOS included) and fold it into ``state``."""
    res_rows, res_slots, priorities = state.plan_reservoir(indices)
    out: dict[int, _LayerBatch] = {}
    run_with_hooks(model, seq_tokens.to(device), fwd_hooks=_batch_hooks(state, torch.from_numpy(res_rows), out),
                   stop_at_layer=state.n_layers)
    for layer in range(state.n_layers):
        state.merge(layer, out[layer], seq_tokens, indices, res_rows, res_slots)
    state.commit_reservoir(seq_tokens, indices, res_rows, res_slots, priorities)
    text = seq_tokens[:, 1:].reshape(-1)
    state.token_count.index_add_(0, text, torch.ones_like(text))
    state.n_windows += len(indices)


def _vocab_size(model: Any) -> int:
    return max(int(model.cfg.d_vocab), len(model.tokenizer))


_key_locks: dict[str, threading.Lock] = {}
_key_locks_guard = threading.Lock()


def _key_lock(key: str) -> threading.Lock:
    with _key_locks_guard:
        return _key_locks.setdefault(key, threading.Lock())


def run_scan(loaded: LoadedModel, corpus: Corpus, params: ScanParams = ScanParams(), out_dir: Optional[Path] = None,
             batch_size: int = 8, progress: Optional[ProgressCallback] = None, checkpoint_seconds: float = 30.0,
             force: bool = False) -> "ScanResult":
    """Scan ``corpus`` with ``loaded`` (or open the stored result); see the module docstring.

    A stored complete result is returned as it is; a corrupt one is deleted
    and recomputed; a checkpoint from an interrupted run is resumed.
    """
    model = loaded.model
    params.check(int(model.cfg.n_ctx))
    root = Path(out_dir) if out_dir is not None else scans_root()
    key = scan_key(loaded, corpus, params)
    folder = root / key
    with _key_lock(str(folder)):
        folder.mkdir(parents=True, exist_ok=True)
        state, bos = _open_state(loaded, corpus, params, folder, force, progress)
        if isinstance(state, ScanResult):
            return state
        started, last_checkpoint = time.time(), time.time()
        resumed_from = state.n_windows
        meta = _meta(loaded, corpus, params, key)
        labels = {"key": key, "model": loaded.info.name, "corpus": corpus.description}

        def checkpoint() -> None:
            _write_stage(folder, "partial", state.to_arrays(), {**meta, "n_windows": state.n_windows},
                         {**labels, "windows_done": state.n_windows})

        consistent, saved_at = True, state.n_windows
        try:
            for batch in iter_window_batches(corpus, model.tokenizer, params.window_len, batch_size,
                                             params.max_windows, start=state.n_windows):
                seq = torch.from_numpy(batch.tokens)
                if bos is not None:
                    seq = torch.cat([torch.full((seq.shape[0], 1), bos, dtype=seq.dtype), seq], dim=1)
                consistent = False
                scan_batch(model, state, seq, batch.indices, device=loaded.info.device)
                consistent = True
                if time.time() - last_checkpoint >= checkpoint_seconds:
                    checkpoint()
                    last_checkpoint, saved_at = time.time(), state.n_windows
                rate = (state.n_windows - resumed_from) * params.window_len / max(time.time() - started, 1e-9)
                fraction = batch.fraction_read
                if params.max_windows:
                    fraction = max(fraction, state.n_windows / params.max_windows)
                report(progress, min(fraction, 0.99), f"{state.n_windows} windows, {rate:.0f} tokens/s")
        except BaseException:
            # Interrupted (Ctrl-C, a Streamlit rerun, a failing callback): keep the finished batches
            # if the state is whole; a half-merged batch is dropped with everything after the last checkpoint.
            if consistent and state.n_windows > saved_at:
                checkpoint()
            raise
        if state.n_windows == 0:
            raise InputError(f"The corpus {corpus.spec!r} gave no windows to scan.")
        result = ScanResult.from_state(state, model.tokenizer, {**meta, "n_windows": state.n_windows,
                                                                "resumed_from": resumed_from,
                                                                "state_bytes": state.nbytes(),
                                                                "seconds": round(time.time() - started, 2)})
        _write_stage(folder, "complete", result.arrays, result.meta, {**labels, "windows_done": state.n_windows})
        result.path = folder
        report(progress, 1.0, f"{state.n_windows} windows scanned")
        return result


def _meta(loaded: LoadedModel, corpus: Corpus, params: ScanParams, key: str) -> dict[str, Any]:
    info = loaded.info
    return {"key": key, "model": model_identity(loaded), "n_layers": info.n_layers, "n_heads": info.n_heads,
            "corpus": {"spec": corpus.spec, "description": corpus.description, "fingerprint": corpus.fingerprint,
                       "skipped": [asdict(s) for s in corpus.skipped]},
            "params": asdict(params), "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def _open_state(loaded: LoadedModel, corpus: Corpus, params: ScanParams, folder: Path, force: bool,
                progress: Optional[ProgressCallback]):
    model = loaded.model
    bos = bos_token_id(model)
    seq_len = params.window_len + (1 if bos is not None else 0)
    state = ScanState(loaded.info.n_layers, loaded.info.n_heads, seq_len, _vocab_size(model), params)
    if force:
        _clear(folder)
        return state, bos
    try:
        status, arrays, meta = _read_stage(folder)
    except FileNotFoundError:
        return state, bos
    except CorruptFileError as err:
        report(progress, 0.0, f"{err} Recomputing.")
        _clear(folder)
        return state, bos
    if status == "complete":
        result = ScanResult(arrays, meta, path=folder)
        return result, bos
    try:
        state.load_arrays(arrays, int(meta["n_windows"]))
        report(progress, 0.0, f"resuming after {state.n_windows} windows")
    except (CorruptFileError, KeyError, ValueError) as err:
        report(progress, 0.0, f"checkpoint unusable ({err}); starting again")
        _clear(folder)
        state = ScanState(loaded.info.n_layers, loaded.info.n_heads, seq_len, _vocab_size(model), params)
    return state, bos


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class ScanExample:
    window_index: int
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


@dataclass
class ScanResult:
    """A finished scan: per-head arrays indexed by ``layer * n_heads + head`` plus metadata."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    path: Optional[Path] = None

    @classmethod
    def from_state(cls, state: ScanState, tokenizer: Any, meta: dict[str, Any]) -> "ScanResult":
        """Bucket the reservoir by each head's deciles and keep the chosen examples only."""
        p = state.params
        hist = state.hist.numpy()
        deciles_of_bins = bin_deciles(hist)  # [head, bins]
        n_heads_total = hist.shape[0]
        valid = np.nonzero(state.res_window.numpy() >= 0)[0]
        valid = valid[np.argsort(state.res_priority.numpy()[valid], kind="stable")]  # random order
        kk = p.examples_per_decile
        slot = np.full((n_heads_total, N_DECILES, kk), -1, dtype=np.int64)
        res_scores = state.res_scores.numpy()
        for head in range(n_heads_total):
            decile = deciles_of_bins[head, score_bins(res_scores[head, valid], p.histogram_bins)]
            for d in range(1, N_DECILES + 1):
                chosen = valid[decile == d][:kk]
                chosen = chosen[np.argsort(-res_scores[head, chosen], kind="stable")]
                slot[head, d - 1, :len(chosen)] = chosen
        safe = np.clip(slot, 0, None)
        heads_idx = np.arange(n_heads_total)[:, None, None]
        used_tokens = np.unique(np.concatenate([state.res_tokens.numpy()[valid].ravel(),
                                                state.top_tokens.numpy().ravel()]))
        seen = torch.nonzero(state.token_count).flatten().numpy()
        vocab_ids = np.union1d(used_tokens, seen).astype(np.int64)
        vocab = tokenizer.batch_decode([[int(i)] for i in vocab_ids])
        arrays = {
            "hist": hist,
            "top_scores": state.top_scores.numpy(), "top_window": state.top_window.numpy(),
            "top_tokens": state.top_tokens.numpy(), "top_keys": state.top_keys.numpy(),
            "top_values": state.top_values.numpy(), "top_first": state.top_first.numpy(),
            "ex_slot": slot, "ex_window": np.where(slot >= 0, state.res_window.numpy()[safe], -1),
            "ex_scores": np.where(slot >= 0, res_scores[heads_idx, safe], np.nan).astype(np.float32),
            "ex_tokens": state.res_tokens.numpy()[safe],
            "ex_keys": state.res_keys.numpy()[heads_idx, safe], "ex_values": state.res_values.numpy()[heads_idx, safe],
            "ex_first": state.res_first.numpy()[heads_idx, safe],
            "token_ids": seen, "token_count": state.token_count.numpy()[seen],
            "token_paid": state.paid_sum.numpy()[:, seen], "token_received": state.received_sum.numpy()[:, seen],
            "distance_sum": state.distance_sum.numpy(),
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

    def _strings(self, ids: np.ndarray) -> list[str]:
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
                           str_tokens=self._strings(tokens), attention=SparseAttention(keys, values, first),
                           max_query=int(q), max_key=int(keys[q, j]))

    def score_histogram(self, head: HeadRef) -> tuple[np.ndarray, np.ndarray]:
        """``(bin_edges [bins + 1], counts [bins])`` of the window scores of ``head``."""
        counts = self.arrays["hist"][self._slot(head)]
        return np.linspace(0.0, 1.0, len(counts) + 1), counts

    def deciles(self, head: HeadRef) -> list[DecileBucket]:
        """Decile buckets of ``head``, highest (10) first, with their example windows."""
        slot = self._slot(head)
        counts = self.arrays["hist"][slot]
        of_bin = bin_deciles(counts)
        edges = np.linspace(0.0, 1.0, len(counts) + 1)
        buckets = []
        for d in range(N_DECILES, 0, -1):
            in_decile = np.nonzero((of_bin == d) & (counts > 0))[0]
            examples = []
            for e in range(self.arrays["ex_slot"].shape[2]):
                if self.arrays["ex_slot"][slot, d - 1, e] < 0:
                    continue
                examples.append(self._example("ex", slot, (slot, d - 1, e), d,
                                              self.arrays["ex_window"][slot, d - 1, e],
                                              self.arrays["ex_scores"][slot, d - 1, e]))
            buckets.append(DecileBucket(
                decile=d, n_windows=int(counts[in_decile].sum()),
                low=float(edges[in_decile[0]]) if len(in_decile) else float("nan"),
                high=float(edges[in_decile[-1] + 1]) if len(in_decile) else float("nan"), examples=examples))
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

        Columns: token, token_id, count (occurrences at positions 1..), mean_attention, total_attention.
        Tokens seen fewer than ``min_count`` times are left out (their averages are noise).
        """
        if role not in ("query", "key"):
            raise ValueError("role must be 'query' or 'key'")
        slot = self._slot(head)
        sums = self.arrays["token_paid" if role == "query" else "token_received"][slot]
        counts = self.arrays["token_count"]
        keep = counts >= min_count
        if not keep.any():
            keep = counts > 0
        ids, sums, counts = self.arrays["token_ids"][keep], sums[keep], counts[keep]
        mean = sums / counts
        order = np.lexsort((ids, -mean))[:n]
        return pd.DataFrame({"token": self._strings(ids[order]), "token_id": ids[order], "count": counts[order],
                             "mean_attention": mean[order], "total_attention": sums[order]})

    def distance_histogram(self, head: HeadRef) -> np.ndarray:
        """Share of ``head``'s attention (positions 1..) at each query-key distance 0, 1, ..., as ``[distance]``."""
        values = self.arrays["distance_sum"][self._slot(head)]
        return values / max(values.sum(), 1e-12)

    def head_summary(self) -> pd.DataFrame:
        """One row per head: mean and top-decile window score, and its typical attention distance."""
        hist = self.arrays["hist"].astype(np.float64)
        centres = (np.arange(hist.shape[1]) + 0.5) / hist.shape[1]
        total = np.maximum(hist.sum(1), 1)
        mean = (hist * centres).sum(1) / total
        of_bin = bin_deciles(hist)
        lower_edges = np.arange(hist.shape[1]) / hist.shape[1]
        top_low = np.array([lower_edges[(of_bin[i] == 10) & (hist[i] > 0)].min(initial=1.0) for i in range(len(hist))])
        dist = self.arrays["distance_sum"]
        dist_share = dist / np.maximum(dist.sum(1, keepdims=True), 1e-12)
        rows = np.arange(hist.shape[0])
        return pd.DataFrame({
            "layer": rows // self.n_heads, "head": rows % self.n_heads,
            "name": [f"{r // self.n_heads}.{r % self.n_heads}" for r in rows],
            "mean_max_attention": mean, "top_decile_from": top_low,
            "top_score": self.arrays["top_scores"][:, 0],
            "mode_distance": dist_share.argmax(1), "share_at_mode": dist_share.max(1),
            "mean_distance": (dist_share * np.arange(dist.shape[1])).sum(1)})

    def examples_table(self, head: HeadRef) -> pd.DataFrame:
        """All stored examples of ``head`` (top and per decile) as text, for download."""
        rows = []
        for ex in self.top_examples(head):
            rows.append({"set": "top", "decile": "", "window": ex.window_index, "score": ex.score,
                         "query": f"{ex.max_query}:{ex.str_tokens[ex.max_query]}",
                         "key": f"{ex.max_key}:{ex.str_tokens[ex.max_key]}", "text": ex.text})
        for bucket in self.deciles(head):
            for ex in bucket.examples:
                rows.append({"set": "decile", "decile": bucket.decile, "window": ex.window_index, "score": ex.score,
                             "query": f"{ex.max_query}:{ex.str_tokens[ex.max_query]}",
                             "key": f"{ex.max_key}:{ex.str_tokens[ex.max_key]}", "text": ex.text})
        return pd.DataFrame(rows)


def load_scan(folder: Path) -> ScanResult:
    """A complete stored scan, checked against its manifest; :class:`CorruptFileError` if damaged or partial."""
    folder = Path(folder)
    try:
        status, arrays, meta = _read_stage(folder)
    except FileNotFoundError as err:
        raise CorruptFileError(f"No scan is stored in {folder}.") from err
    if status != "complete":
        raise CorruptFileError(f"The scan in {folder.name} is unfinished ({meta.get('n_windows', 0)} windows so far); "
                               "run it again to resume.")
    return ScanResult(arrays, meta, path=folder)


@dataclass(frozen=True)
class StoredScan:
    folder: Path
    status: str  # "complete", "partial" or "unreadable"
    model: str
    corpus: str
    windows: int
    updated: float

    @property
    def label(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.updated)) if self.updated else "?"
        return f"{self.model} on {self.corpus}: {self.windows} windows, {self.status} ({when})"


def list_scans(root: Optional[Path] = None, model_name: Optional[str] = None) -> list[StoredScan]:
    """Stored scans under ``root`` (newest first), optionally only those of ``model_name``.

    Reads manifests only; the data is checked when a scan is opened.
    """
    root = Path(root) if root is not None else scans_root()
    found = []
    for manifest_path in sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else []:
        try:
            manifest = read_json(manifest_path)
            key = manifest.get("key", manifest_path.parent.name)
            status, windows, updated = manifest.get("status", "?"), int(manifest.get("windows_done", 0)), manifest.get("updated", 0)
            model, corpus = str(manifest.get("model", "?")), str(manifest.get("corpus", key))
        except (CorruptFileError, OSError, AttributeError, ValueError):
            model, corpus, status, windows, updated = "?", manifest_path.parent.name, "unreadable", 0, 0
        found.append(StoredScan(manifest_path.parent, status, model, corpus, windows, float(updated or 0)))
    if model_name is not None:
        found = [s for s in found if s.model == model_name]
    return sorted(found, key=lambda s: -s.updated)



# --------------------------------------------------------------------------------------------------
# Figures


def distance_figure(shares: np.ndarray, title: str = "") -> "go.Figure":
    """Bar chart of attention share by query-key distance (``shares [distance]`` from :meth:`ScanResult.distance_histogram`)."""
    import plotly.graph_objects as go

    distances = np.arange(len(shares))
    fig = go.Figure(go.Bar(x=distances, y=shares, hovertemplate="distance %{x}<br>share %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title or "Attention by query-key distance (positions after 0)", height=320,
                      xaxis_title="query position - key position", yaxis_title="share of attention",
                      margin=dict(t=40, b=40, l=50, r=10))
    return fig


def score_histogram_figure(edges: np.ndarray, counts: np.ndarray, title: str = "", n_bars: int = 50) -> "go.Figure":
    """Histogram of window scores, bars coloured by decile (``edges [bins + 1]``, ``counts [bins]``)."""
    import plotly.graph_objects as go

    group = max(1, len(counts) // n_bars)
    n = len(counts) // group * group
    merged = counts[:n].reshape(-1, group).sum(1)
    lows = edges[:n:group]
    of_bin = bin_deciles(counts)[:n].reshape(-1, group).max(1)
    fig = go.Figure(go.Bar(x=lows + (edges[group] - edges[0]) / 2, y=merged, width=edges[group] - edges[0],
                           marker=dict(color=of_bin, colorscale="Viridis", cmin=1, cmax=10,
                                       colorbar=dict(title="decile")),
                           hovertemplate="score %{x:.3f}<br>%{y} windows<extra></extra>"))
    fig.update_layout(title=title or "Window scores (max attention outside position 0)", height=320,
                      xaxis_title="window score", yaxis_title="windows", margin=dict(t=40, b=40, l=50, r=10))
    return fig
