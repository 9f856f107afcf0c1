"""Dataset scans: every head's behaviour across a corpus, HeadVis style, in bounded memory.

The corpus is cut into windows of ``window_len`` tokens (BOS put in front
where the model uses one) and run through the model in batches. A hook on
each layer's ``hook_pattern`` reduces the ``[batch, head, query, key]``
pattern at once, and one on its ``hook_attn_scores`` (pre-softmax) reduces
the scores to three sums per head, so neither outlives its layer; the pass
stops at the last layer's pattern (no last MLP, final norm or unembedding: a
scan needs no logits). For every head it keeps:

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
  averaged per occurrence; the sums are held in a bounded heavy-hitters
  summary per head (:mod:`headvis_core.scan.heavy_hitters`: exact while the
  corpus has at most ``token_capacity`` distinct tokens, else within a
  stated bound), so memory grows with neither the corpus nor the vocabulary.
* **distance histogram**: attention weight summed by query-key distance
  ``q - k`` over positions 1.., which separates previous-token heads
  (distance 1), local heads and long-range (induction, duplicate) heads.
* **the HeadVis metrics** (Anthropic 2025, HeadVis ``compute_head_metrics``;
  definitions in :mod:`headvis_core.atlas.metrics`, whose functions compute
  them here too), each pooled over every query ``q >= 1`` of every window,
  as the atlas pools them over its probe set:

  - ``logit_std``, ``top_logit_margin``, ``logit_z_score``: per query, from
    the pre-softmax scores over the keys the mask allows
    (:func:`~headvis_core.atlas.metrics.score_metric_sums`, in float32 on the
    hook's device), summed per batch and kept in fixed point (int64, units of
    ``1 / SCORE_UNIT``), so a merge is integer addition; the mean divides by
    ``windows x (seq_len - 1)`` queries.
  - ``qk_distance``, ``qk_distance_variance``: the mass-weighted mean and
    variance of ``q - k`` over pairs with ``k >= 1``, read from the distance
    histogram above. That histogram sums ``A[q, k]`` over exactly the pairs
    :func:`~headvis_core.atlas.metrics.distance_moments` sums (``k >= 1``;
    query 0 has no such key), so its moments are the atlas's, up to the
    fixed-point rounding of each batch's sum (``2**-30``).
  - ``query_token_entropy``, ``key_token_entropy``: the entropy in bits of
    the token ids under the high-attention mass (pairs with ``A[q, k] >=
    HIGH_ATTENTION``, ``k >= 1``, weighted by ``A``;
    :func:`~headvis_core.atlas.metrics.high_attention_position_mass`) at the
    query and at the key. That mass per token id is a second pair of bounded
    heavy-hitters summaries beside the top tokens': the entropy is exact
    while a head has at most ``token_capacity`` distinct high-attention
    tokens on that side (the summary's ``slack`` is then 0, and the result
    records it per head: ``*_token_entropy_exact``); beyond that, the value
    is the middle of a proven interval around the true entropy and
    ``*_token_entropy_error`` its half-width
    (:func:`headvis_core.scan.heavy_hitters.entropy_bits_bounded`).

All state (:mod:`headvis_core.scan.state`) has a fixed size set by the model
and the parameters, whatever the corpus size. Results live under
``results_dir("scans")/<key>`` where the key hashes model + corpus
fingerprint + parameters (:mod:`headvis_core.scan.store`). Progress is
checkpointed every ``checkpoint_seconds`` and when the scan is interrupted
(Ctrl-C, a Streamlit rerun, an error): every batch merged so far is saved.
Re-running resumes from the checkpoint with the same result.
"""


import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from jaxtyping import Float, Int

from headvis_core.atlas.metrics import SCORE_METRICS, high_attention_position_mass, run_until, score_metric_sums
from headvis_core.data.corpus import Corpus, iter_window_batches
from headvis_core.errors import CorruptFileError, InputError
from headvis_core.hooks import pattern_hook
from headvis_core.models.loader import LoadedModel
from headvis_core.progress import ProgressCallback, report
from headvis_core.scan import store
from headvis_core.scan.params import ScanParams
from headvis_core.scan.result import ScanResult
from headvis_core.scan.state import LayerBatch, ScanState
from headvis_core.scan.store import clear_stage, model_identity, read_stage, scan_key, write_stage
from headvis_core.sparse_attention import top_attended_keys
from headvis_core.tokens import bos_token_id


def _stored_sparse_rows(patterns: Float[torch.Tensor, "... query key"],
                        k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``k`` keys (positions 1..) of every query and the attention to 0, in the state's compact dtypes."""
    keys, values, first = top_attended_keys(patterns, k)
    return keys.to(torch.int16).cpu(), values.to(torch.float16).cpu(), first.to(torch.float16).cpu()


_distance_cache: dict[tuple[int, str], torch.Tensor] = {}


def distance_index(n: int, device: Any) -> Int[torch.Tensor, " pairs"]:
    """``[n * n]`` bin of each (query, key) pair: ``q - k``, or ``n`` (discarded) where the key is later."""
    key = (n, str(device))
    if key not in _distance_cache:
        q = torch.arange(n)[:, None]
        kk = torch.arange(n)[None, :]
        _distance_cache[key] = torch.where(kk <= q, q - kk, torch.tensor(n)).reshape(-1).to(device)
    return _distance_cache[key]


def reduce_layer_pattern(state: ScanState, layer: int, pattern: Float[torch.Tensor, "batch head query key"],
                         res_rows: Int[torch.Tensor, " incoming"]) -> LayerBatch:
    """What the state keeps of one layer's pattern on one batch, computed where the pattern lives."""
    n = state.seq_len - 1
    p = pattern.detach().float()
    inner = p[:, :, 1:, 1:]  # drop the row and column of position 0
    win_max = inner.amax(dim=(-1, -2))  # [batch, head]
    per_distance = torch.zeros(p.shape[1], n + 1, device=p.device)
    per_distance.index_add_(1, distance_index(n, p.device), inner.sum(0).reshape(p.shape[1], n * n))
    heap_floor = state.top_scores[layer * state.n_heads:(layer + 1) * state.n_heads, -1].to(p.device)
    cand_batch, cand_head = torch.nonzero(win_max > heap_floor[None, :], as_tuple=True)
    cand = _stored_sparse_rows(p[cand_batch, cand_head], state.k)
    res = _stored_sparse_rows(p[res_rows.to(p.device)], state.k)
    high_paid, high_received = high_attention_position_mass(p)
    return LayerBatch(win_max.cpu(), inner.sum(-1).cpu(), inner.sum(-2).cpu(), per_distance[:, :n].cpu(),
                      cand_batch.cpu(), cand_head.cpu(), *cand, *res, high_paid.cpu(), high_received.cpu())


def reduce_layer_scores(scores: Float[torch.Tensor, "batch head query key"]) -> Float[torch.Tensor, "head 3"]:
    """``[head, SCORE_METRICS]``: each score statistic summed over the batch's queries ``q >= 1``.

    Reduced in float32 where the scores live (the masked entries are found in the scores' own dtype).
    """
    sums, _ = score_metric_sums(scores.detach(), dtype=torch.float32)
    return torch.stack([sums[name] for name in SCORE_METRICS], dim=1).double().cpu()


@dataclass
class ReducedBatch:
    """One batch's forward pass reduced layer by layer, not yet folded into the state."""

    layers: dict[int, LayerBatch]
    res_rows: np.ndarray
    res_slots: np.ndarray
    priorities: np.ndarray


def reduce_batch(model: Any, state: ScanState, seq_tokens: Int[torch.Tensor, "batch pos"], indices: np.ndarray,
                 device: Any = "cpu") -> ReducedBatch:
    """Run one batch and reduce each layer's scores and pattern in their hooks; ``state`` is read, never changed.

    The pass stops at the last layer's pattern (:func:`headvis_core.atlas.metrics.run_until`): the last
    MLP, the final norm and the unembedding never run, since the scan needs no logits.
    """
    res_rows, res_slots, priorities = state.plan_reservoir(indices)
    rows = torch.from_numpy(res_rows)
    out: dict[int, LayerBatch] = {}
    score_sums: dict[int, torch.Tensor] = {}

    def reduce_scores(layer: int, scores: torch.Tensor) -> None:
        score_sums[layer] = reduce_layer_scores(scores)

    def reduce_pattern(layer: int, pattern: torch.Tensor) -> None:
        out[layer] = reduce_layer_pattern(state, layer, pattern, rows)
        out[layer].score_sums = score_sums.pop(layer, None)

    hooks = {}
    for layer in range(state.n_layers):  # the scores hook fires before the pattern hook of its layer
        hooks[f"blocks.{layer}.attn.hook_attn_scores"] = partial(reduce_scores, layer)
        hooks[pattern_hook(layer)] = partial(reduce_pattern, layer)
    run_until(model, seq_tokens.to(device), hooks, last=pattern_hook(state.n_layers - 1))
    missing = [layer for layer in range(state.n_layers) if out[layer].score_sums is None]
    if missing:
        raise InputError(f"This model's attention does not expose pre-softmax scores (hook_attn_scores) on "
                         f"layers {missing}, which a scan needs for its score statistics.")
    return ReducedBatch(out, res_rows, res_slots, priorities)


def merge_batch(state: ScanState, reduced: ReducedBatch, seq_tokens: Int[torch.Tensor, "batch pos"],
                indices: np.ndarray) -> None:
    """Fold a reduced batch into ``state`` (every layer, then the reservoir and the token counts)."""
    for layer in range(state.n_layers):
        state.merge(layer, reduced.layers[layer], seq_tokens, indices, reduced.res_rows, reduced.res_slots)
    state.commit_reservoir(seq_tokens, indices, reduced.res_rows, reduced.res_slots, reduced.priorities)
    state.count_tokens(seq_tokens, len(indices))


def scan_batch(model: Any, state: ScanState, seq_tokens: Int[torch.Tensor, "batch pos"], indices: np.ndarray,
               device: Any = "cpu") -> None:
    """Run one batch ``seq_tokens [batch, seq_len]`` (BOS included) and fold it into ``state``."""
    merge_batch(state, reduce_batch(model, state, seq_tokens, indices, device), seq_tokens, indices)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) back until the block ends, so it cannot leave a half-merged state.

    Only the main thread receives signals, so elsewhere (a Streamlit script thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def vocab_size(model: Any) -> int:
    """Rows of the per-token sums: the larger of the embedding and the tokenizer."""
    return max(int(model.cfg.d_vocab), len(model.tokenizer))


def new_state(loaded: LoadedModel, params: ScanParams) -> ScanState:
    """An empty state for ``loaded`` (one position more than the window where the model prepends BOS)."""
    seq_len = params.window_len + (1 if bos_token_id(loaded.model) is not None else 0)
    return ScanState(loaded.info.n_layers, loaded.info.n_heads, seq_len, vocab_size(loaded.model), params)


_key_locks: dict[str, threading.Lock] = {}
_key_locks_guard = threading.Lock()


def _key_lock(key: str) -> threading.Lock:
    """One lock per scan folder, so two sessions never write the same scan at once."""
    with _key_locks_guard:
        return _key_locks.setdefault(key, threading.Lock())


def _meta(loaded: LoadedModel, corpus: Corpus, params: ScanParams, key: str) -> dict[str, Any]:
    info = loaded.info
    return {"key": key, "model": model_identity(loaded), "n_layers": info.n_layers, "n_heads": info.n_heads,
            "corpus": {"spec": corpus.spec, "description": corpus.description, "fingerprint": corpus.fingerprint,
                       "skipped": [asdict(s) for s in corpus.skipped]},
            "params": asdict(params), "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def _open_state(loaded: LoadedModel, params: ScanParams, folder: Path, force: bool,
                progress: Optional[ProgressCallback]) -> ScanState | ScanResult:
    """The stored complete result, or the state to continue: resumed, or empty (nothing usable stored)."""
    state = new_state(loaded, params)
    if force:
        clear_stage(folder)
        return state
    try:
        status, arrays, meta = read_stage(folder)
    except FileNotFoundError:
        return state
    except CorruptFileError as err:
        report(progress, 0.0, f"{err} Recomputing.")
        clear_stage(folder)
        return state
    if status == "complete":
        stored = ScanResult(arrays, meta, path=folder)
        if stored.stale_note is None:
            return stored
        # a rerun asks for the whole result: one stored before the HeadVis statistics is recomputed
        report(progress, 0.0, f"{stored.stale_note} Recomputing.")
        clear_stage(folder)
        return state
    try:
        state.load_arrays(arrays, int(meta["n_windows"]))
        report(progress, 0.0, f"resuming after {state.n_windows} windows")
    except (CorruptFileError, KeyError, ValueError) as err:
        report(progress, 0.0, f"checkpoint unusable ({err}); starting again")
        clear_stage(folder)
        state = new_state(loaded, params)
    return state


@dataclass
class _ScanRun:
    """One run of the scan loop over a folder: the state and when it was last saved."""

    loaded: LoadedModel
    corpus: Corpus
    params: ScanParams
    folder: Path
    state: ScanState
    meta: dict[str, Any]
    labels: dict[str, Any]
    checkpoint_seconds: float
    started: float = 0.0
    resumed_from: int = 0
    saved_at: int = 0
    last_checkpoint: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.last_checkpoint = time.time()
        self.resumed_from = self.saved_at = self.state.n_windows

    def checkpoint(self) -> None:
        state = self.state
        write_stage(self.folder, "partial", state.to_arrays(), {**self.meta, "n_windows": state.n_windows},
                    {**self.labels, "windows_done": state.n_windows})
        self.last_checkpoint, self.saved_at = time.time(), state.n_windows

    def scan_all(self, batch_size: int, progress: Optional[ProgressCallback]) -> None:
        """Scan the remaining windows; on an interruption (Ctrl-C included), save the finished batches first.

        A batch's forward pass changes nothing in the state, so an interruption there loses only that
        batch; the merge holds Ctrl-C back until it is done (:func:`interrupts_deferred`).
        """
        model, params, state = self.loaded.model, self.params, self.state
        bos = bos_token_id(model)
        consistent = True
        try:
            for batch in iter_window_batches(self.corpus, model.tokenizer, params.window_len, batch_size,
                                             params.max_windows, start=state.n_windows):
                seq = torch.from_numpy(batch.tokens)
                if bos is not None:
                    seq = torch.cat([torch.full((seq.shape[0], 1), bos, dtype=seq.dtype), seq], dim=1)
                reduced = reduce_batch(model, state, seq, batch.indices, device=self.loaded.info.device)
                with interrupts_deferred():
                    consistent = False
                    merge_batch(state, reduced, seq, batch.indices)
                    consistent = True
                if time.time() - self.last_checkpoint >= self.checkpoint_seconds:
                    self.checkpoint()
                self._report(progress, batch.fraction_read)
        except BaseException:
            # Interrupted (Ctrl-C, a Streamlit rerun, a failing callback): keep the finished batches if the
            # state is whole; a merge that failed part-way drops everything after the last checkpoint.
            if consistent and state.n_windows > self.saved_at:
                self.checkpoint()
            raise

    def _report(self, progress: Optional[ProgressCallback], fraction_read: float) -> None:
        n_windows = self.state.n_windows
        rate = (n_windows - self.resumed_from) * self.params.window_len / max(time.time() - self.started, 1e-9)
        fraction = fraction_read
        if self.params.max_windows:
            fraction = max(fraction, n_windows / self.params.max_windows)
        report(progress, min(fraction, 0.99), f"{n_windows} windows, {rate:.0f} tokens/s")

    def finish(self) -> ScanResult:
        """Bucket the state into a result and store it as the complete stage."""
        state = self.state
        if state.n_windows == 0:
            raise InputError(f"The corpus {self.corpus.spec!r} gave no windows to scan.")
        meta = {**self.meta, "n_windows": state.n_windows, "resumed_from": self.resumed_from,
                "state_bytes": state.nbytes(), "seconds": round(time.time() - self.started, 2)}
        result = ScanResult.from_state(state, self.loaded.model.tokenizer, meta)
        labels = {**self.labels, "windows_done": state.n_windows}
        write_stage(self.folder, "complete", result.arrays, result.meta, labels)
        result.path = self.folder
        return result


def scan_folder(loaded: LoadedModel, corpus: Corpus, params: ScanParams,
                out_dir: Optional[Path]) -> tuple[str, Path]:
    """The scan's key and its folder, under ``out_dir`` or the scans root."""
    key = scan_key(loaded, corpus, params)
    return key, (Path(out_dir) if out_dir is not None else store.scans_root()) / key


def start_scan(loaded: LoadedModel, corpus: Corpus, params: ScanParams, key: str, folder: Path, force: bool,
               progress: Optional[ProgressCallback], checkpoint_seconds: float) -> "ScanResult | _ScanRun":
    """The stored result in ``folder`` if it is complete, else a run that resumes its checkpoint (or starts).

    Call it holding the folder's key lock: the one-process and the sharded scan share this start.
    """
    opened = _open_state(loaded, params, folder, force, progress)
    if isinstance(opened, ScanResult):
        return opened
    labels = {"key": key, "model": loaded.info.name, "corpus": corpus.description}
    return _ScanRun(loaded, corpus, params, folder, opened, _meta(loaded, corpus, params, key), labels,
                    checkpoint_seconds)


def run_scan(loaded: LoadedModel, corpus: Corpus, params: ScanParams = ScanParams(), out_dir: Optional[Path] = None,
             batch_size: int = 8, progress: Optional[ProgressCallback] = None, checkpoint_seconds: float = 30.0,
             force: bool = False) -> ScanResult:
    """Scan ``corpus`` with ``loaded`` (or open the stored result); see the module docstring.

    A stored complete result is returned as it is; a corrupt one is deleted
    and recomputed; a checkpoint from an interrupted run is resumed.
    """
    params.check(int(loaded.model.cfg.n_ctx))
    batch_size = math.gcd(batch_size, params.shard_windows)  # no batch straddles a shard: see scan/shards.py
    key, folder = scan_folder(loaded, corpus, params, out_dir)
    with _key_lock(str(folder)):
        folder.mkdir(parents=True, exist_ok=True)
        scan = start_scan(loaded, corpus, params, key, folder, force, progress, checkpoint_seconds)
        if isinstance(scan, ScanResult):
            return scan
        scan.scan_all(batch_size, progress)
        result = scan.finish()
        report(progress, 1.0, f"{scan.state.n_windows} windows scanned")
        return result
