"""A dataset scan sharded over a Ray cluster: the same result as :func:`run_scan`, resumable per shard.

The driver cuts the corpus into the deterministic shards of
:mod:`headvis_core.scan.shards` and runs them through the shared sharded-job
driver (:mod:`headvis_core.ray_jobs`): each Ray actor (:class:`ShardWorker`)
loads the model once (on a GPU when the cluster has one) and returns one
shard's partial state at a time. The driver stores every finished shard as it
arrives (atomic, checksummed: :func:`headvis_core.scan.store.write_stage`
under ``<scan folder>/shards/<index>``), merges the shards into the scan's
state in shard order (:meth:`ScanState.merge_state`) and checkpoints that
state like a one-process scan does; the stored shards it covers are then
deleted. So:

* the result equals the one-process scan's, array for array (the shard
  plan and the merge order do not depend on the workers or their timing);
* a killed run resumes from the checkpoint plus the stored shards, redoing
  none of them (a one-process checkpoint in the middle of a shard is first
  completed to the shard's end on the driver);
* a worker that dies (or stalls) is replaced and its unfinished shards run again
  (:class:`headvis_core.ray_jobs.ShardDriver`, up to ``SHARD_ATTEMPTS`` runs).

Ray is optional (``pip install ray==2.60.0``); :func:`ray_available` says
whether it is installed.
"""

import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from headvis_core.data.corpus import Corpus, iter_window_batches
from headvis_core.errors import CorruptFileError, InputError
from headvis_core.models.loader import LoadedModel
from headvis_core.progress import ProgressCallback, report
from headvis_core.ray_jobs import (
    INSTALL_HINT,
    STALL_SECONDS,
    ModelWorker,
    MonotonicBar,
    ShardDriver,
    check_address,
    check_workers,
    ray_available,
    worker_pool,
)
from headvis_core.scan.params import ScanParams
from headvis_core.scan.result import ScanResult
from headvis_core.scan.run import _key_lock, _ScanRun, interrupts_deferred, new_state, scan_folder, start_scan
from headvis_core.scan.shards import n_shards, scan_shard, scan_windows, shard_batch_size
from headvis_core.scan.state import ScanState
from headvis_core.scan.store import read_stage, write_stage

__all__ = ["SHARDS_DIR", "ShardWorker", "ray_available", "run_sharded_scan"]

SHARDS_DIR = "shards"


class ShardWorker(ModelWorker):
    """One Ray actor: a model loaded once, scanning whole shards into partial states."""

    def __init__(self, model_name: str, dtype: str, device: Optional[str], threads: int, board: Any,
                 corpus: Corpus, params: ScanParams):
        super().__init__(model_name, dtype, device, threads, board)
        self.corpus = corpus
        self.params = params

    def scan_shard(self, index: int, batch_size: int) -> tuple[dict[str, np.ndarray], int]:
        state = scan_shard(self.loaded, self.corpus, self.params, index, batch_size,
                           on_batch=lambda windows: self.tell(index, windows))
        return state.to_arrays(), state.n_windows


def _shard_folder(folder: Path, index: int) -> Path:
    return folder / SHARDS_DIR / f"{index:07d}"


def _load_state(loaded: LoadedModel, params: ScanParams, arrays: dict[str, np.ndarray], n_windows: int) -> ScanState:
    state = new_state(loaded, params)
    state.load_arrays(arrays, n_windows)
    return state


def _stored_shards(loaded: LoadedModel, params: ScanParams, folder: Path, first: int) -> dict[int, ScanState]:
    """The finished shards stored under ``folder`` from shard ``first`` on; damaged or covered ones deleted."""
    found = {}
    root = folder / SHARDS_DIR
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        index = int(path.name) if path.name.isdigit() else -1
        if index >= first:
            try:
                _, arrays, meta = read_stage(path)
                found[index] = _load_state(loaded, params, arrays, int(meta["n_windows"]))
                continue
            except (CorruptFileError, FileNotFoundError, KeyError, ValueError):
                pass  # redone
        shutil.rmtree(path, ignore_errors=True)
    return found


def _shards_done(state: ScanState) -> int:
    """Shards merged into ``state``, which ends at a shard boundary or at the end of the windows."""
    return -(-state.n_windows // state.params.shard_windows)


class _ScanShards:
    """The scan's side of a :class:`ShardDriver`: store each shard, merge it into the scan, checkpoint."""

    def __init__(self, scan: _ScanRun, batch_size: int, progress: Optional[ProgressCallback]):
        self.scan, self.batch_size, self.progress = scan, batch_size, progress
        self.consistent = True  # False while a merge is under way: a failed merge must not be saved
        self.bar = MonotonicBar()
        self.driver: Optional[ShardDriver] = None

    def submit(self, actor: Any, index: int) -> Any:
        return actor.scan_shard.remote(index, self.batch_size)

    def receive(self, index: int, value: tuple[dict[str, np.ndarray], int]) -> Optional[ScanState]:
        arrays, n_windows = value
        params, driver = self.scan.params, self.driver
        if n_windows < params.shard_windows:  # the corpus ends in this shard (or before it)
            end = index if n_windows else index - 1
            driver.last = end if driver.last is None else min(driver.last, end)
        if n_windows == 0:
            return None
        write_stage(_shard_folder(self.scan.folder, index), "complete", arrays,
                    {"n_windows": n_windows, "shard": index}, {"shard": index, "windows_done": n_windows})
        return _load_state(self.scan.loaded, params, arrays, n_windows)

    def merge(self, index: int, state: ScanState) -> None:
        self.consistent = False
        self.scan.state.merge_state(state)
        self.consistent = True
        if time.time() - self.scan.last_checkpoint >= self.scan.checkpoint_seconds:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Save the merged state, then delete the stored shards it covers."""
        if self.consistent and self.scan.state.n_windows > self.scan.saved_at:
            self.scan.checkpoint()
            for index in range(_shards_done(self.scan.state)):
                shutil.rmtree(_shard_folder(self.scan.folder, index), ignore_errors=True)

    def report(self) -> None:
        params, driver, done = self.scan.params, self.driver, self.scan.state.n_windows
        done += sum(s.n_windows for s in driver.pending.values()) + driver.running_units()
        total = params.max_windows
        if driver.last is not None:
            total = min(total or np.inf, (driver.last + 1) * params.shard_windows)
        fraction = done / total if total else 0.0
        rate = (done - self.scan.resumed_from) * params.window_len / max(time.time() - self.scan.started, 1e-9)
        report(self.progress, self.bar(fraction),
               f"{done} windows, {rate:.0f} tokens/s, {len(driver.pool.actors)} workers")


def run_sharded_scan(loaded: LoadedModel, corpus: Corpus, params: ScanParams = ScanParams(), workers: int = 2,
                     address: Optional[str] = None, out_dir: Optional[Path] = None, batch_size: int = 8,
                     progress: Optional[ProgressCallback] = None, checkpoint_seconds: float = 30.0,
                     force: bool = False, cpus_per_worker: int = 1,
                     stall_seconds: float = STALL_SECONDS) -> ScanResult:
    """:func:`headvis_core.scan.run.run_scan` with the shards scanned by ``workers`` Ray actors.

    ``address``: ``None`` or ``"auto"`` (a running cluster, else a new local one with
    ``workers * cpus_per_worker`` CPUs), or a cluster address. ``loaded`` gives the model's name and
    dtype (each worker loads its own copy) and the tokenizer for the result. The result and its
    folder are the one-process scan's: either can resume what the other stored. A worker with
    no progress report for ``stall_seconds`` is replaced and its shards run again.
    """
    check_workers(workers)
    check_address(address)
    if not ray_available():
        raise InputError(f"Sharded scans need Ray: {INSTALL_HINT}")
    params.check(int(loaded.model.cfg.n_ctx))
    batch_size = shard_batch_size(batch_size, params)
    next(iter_window_batches(corpus, loaded.model.tokenizer, params.window_len, 1, 1))  # InputError if no window
    key, folder = scan_folder(loaded, corpus, params, out_dir)
    with _key_lock(str(folder)):
        folder.mkdir(parents=True, exist_ok=True)
        if force:
            shutil.rmtree(folder / SHARDS_DIR, ignore_errors=True)
        scan = start_scan(loaded, corpus, params, key, folder, force, progress, checkpoint_seconds)
        if isinstance(scan, ScanResult):
            return scan
        boundary = -(-scan.state.n_windows // params.shard_windows) * params.shard_windows
        boundary = min(boundary, params.max_windows or boundary)
        if scan.state.n_windows < boundary:  # a one-process checkpoint inside a shard: finish that shard here
            for _ in scan_windows(loaded, corpus, scan.state, scan.state.n_windows, boundary, batch_size):
                pass
        scan.state.end_shard()  # the state now ends a shard, or the windows: merge its token summary
        stored = _stored_shards(loaded, params, folder, _shards_done(scan.state))
        if stored:
            report(progress, 0.0, f"{len(stored)} finished shard(s) found; not redone")
        shards = _ScanShards(scan, batch_size, progress)
        planned = n_shards(params)
        if planned is not None and planned - _shards_done(scan.state) - len(stored) < workers:
            left = max(planned - _shards_done(scan.state) - len(stored), 1)
            report(progress, 0.0, f"note: {workers} workers asked, {left} started: {left} shard(s) left to scan")
            workers = left
        try:
            with worker_pool(ShardWorker, loaded, workers, address, cpus_per_worker, (corpus, params)) as pool:
                for note in pool.notes:
                    report(progress, 0.0, f"note: {note}")
                workers = len(pool.actors)
                scan.meta["worker_start_seconds"] = round(pool.start_seconds, 3)
                shards.driver = driver = ShardDriver(
                    pool, shards.submit, shards.receive, shards.merge, first=_shards_done(scan.state),
                    last=None if n_shards(params) is None else n_shards(params) - 1, pending=stored,
                    on_tick=shards.report, merge_guard=interrupts_deferred, stall_seconds=stall_seconds)
                scanning = time.perf_counter()
                driver.run()
                scan.meta["sharded_scan_seconds"] = round(time.perf_counter() - scanning, 3)
        except BaseException:  # interrupted or failed: keep what is merged (the stored shards stay too)
            shards.checkpoint()
            raise
        received = driver.receive_seconds
        scan.meta.update(workers=workers, shards_received=len(received), shard_runs=sum(driver.attempts.values()),
                         merge_seconds_per_shard=float(np.mean(received)) if received else 0.0)
        result = scan.finish()
        shutil.rmtree(folder / SHARDS_DIR, ignore_errors=True)
        report(progress, 1.0, f"{scan.state.n_windows} windows scanned by {workers} workers")
        return result
