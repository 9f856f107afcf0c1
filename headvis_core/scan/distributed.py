"""A dataset scan sharded over a Ray cluster: the same result as :func:`run_scan`, resumable per shard.

The driver cuts the corpus into the deterministic shards of
:mod:`headvis_core.scan.shards`. Each Ray actor (:class:`ShardWorker`) loads
the model once (on a GPU when the cluster has one) and returns one shard's
partial state at a time. The driver stores every finished shard as it
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
* a worker that dies is restarted by Ray and its unfinished shard run again
  (actor ``max_restarts`` / ``max_task_retries``); a shard that still fails
  is resubmitted by the driver, up to ``SHARD_ATTEMPTS`` times.

Ray is optional (``pip install ray==2.60.0``); :func:`ray_available` says
whether it is installed.
"""

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from headvis_core.data.corpus import Corpus, iter_window_batches
from headvis_core.errors import CorruptFileError, HeadVisError, InputError
from headvis_core.models.loader import LoadedModel, load_model
from headvis_core.progress import ProgressCallback, report
from headvis_core.scan.params import ScanParams
from headvis_core.scan.result import ScanResult
from headvis_core.scan.run import _key_lock, _ScanRun, interrupts_deferred, new_state, scan_folder, start_scan
from headvis_core.scan.shards import n_shards, scan_shard, scan_windows, shard_batch_size
from headvis_core.scan.state import ScanState
from headvis_core.scan.store import model_identity, read_stage, write_stage

try:
    import ray
except ImportError:  # optional: the default install scans in one process
    ray = None

SHARD_ATTEMPTS = 3
SHARDS_DIR = "shards"
# Environment the workers need from the driver (where models and results live, how threads wait).
FORWARDED_ENV = ("HEADVIS_HOME", "HF_HOME", "OMP_WAIT_POLICY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def ray_available() -> bool:
    return ray is not None


class ProgressBoard:
    """A Ray actor the workers tell how far each shard has got, so the driver can show one bar."""

    def __init__(self) -> None:
        self.windows: dict[int, int] = {}

    def update(self, shard: int, windows: int) -> None:
        self.windows[shard] = windows

    def snapshot(self) -> dict[int, int]:
        return dict(self.windows)


class ShardWorker:
    """One Ray actor: a model loaded once, scanning whole shards into partial states."""

    def __init__(self, model_name: str, dtype: str, device: Optional[str], corpus: Corpus, params: ScanParams,
                 threads: int, board: Any = None):
        torch.set_num_threads(threads)
        self.loaded = load_model(model_name, device=device, dtype=dtype)
        self.corpus = corpus
        self.params = params
        self.board = board

    def identity(self) -> dict[str, str]:
        return model_identity(self.loaded)

    def scan_shard(self, index: int, batch_size: int) -> tuple[dict[str, np.ndarray], int]:
        def tell(windows: int) -> None:
            if self.board is not None:
                self.board.update.remote(index, windows)

        state = scan_shard(self.loaded, self.corpus, self.params, index, batch_size, on_batch=tell)
        return state.to_arrays(), state.n_windows


@contextmanager
def ray_session(address: Optional[str], num_cpus: int) -> Iterator[Any]:
    """Ray, connected: to ``address`` (``"auto"``: a running cluster, else a local one), or a new local cluster.

    A cluster this call starts is shut down on exit; one that was already connected is left alone.
    """
    if ray is None:
        raise InputError("Sharded scans need Ray: pip install ray==2.60.0")
    if ray.is_initialized():
        yield ray
        return
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    runtime_env = {"env_vars": env}
    started = False
    try:
        if address and address != "auto":
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        else:
            try:
                ray.init(address="auto", runtime_env=runtime_env, log_to_driver=False)
            except ConnectionError:
                ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
        started = True
    except Exception as err:  # ray raises several kinds for an unreachable address
        raise InputError(f"Cannot connect to the Ray cluster at {address!r}: {err}") from err
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


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


class _Driver:
    """Submits shards to the actors, stores and merges what comes back, checkpoints the merged state."""

    def __init__(self, scan: _ScanRun, actors: list, batch_size: int, stored: dict[int, ScanState],
                 progress: Optional[ProgressCallback], board: Any = None):
        params = scan.params
        self.scan, self.actors, self.batch_size, self.progress = scan, actors, batch_size, progress
        self.pending = stored  # finished shards not merged yet
        self.merged = _shards_done(scan.state)  # shards in scan.state
        self.next_shard = self.merged
        self.last = None if n_shards(params) is None else n_shards(params) - 1  # known last shard
        self.in_flight: dict[Any, tuple[int, int]] = {}  # ref -> (shard, actor)
        self.attempts: dict[int, int] = {}
        self.merge_seconds: list[float] = []
        self.consistent = True
        self.board = board
        self.shown = 0.0  # the bar never goes back (a retried shard starts again from 0)

    def _submit(self, index: int) -> None:
        load = [0] * len(self.actors)
        for _, actor in self.in_flight.values():
            load[actor] += 1
        actor = int(np.argmin(load))
        ref = self.actors[actor].scan_shard.remote(index, self.batch_size)
        self.in_flight[ref] = (index, actor)
        self.attempts[index] = self.attempts.get(index, 0) + 1

    def _fill(self) -> None:
        while len(self.in_flight) < 2 * len(self.actors) and (self.last is None or self.next_shard <= self.last):
            if self.next_shard not in self.pending:
                self._submit(self.next_shard)
            self.next_shard += 1

    def _receive(self, ref: Any) -> None:
        index, _ = self.in_flight.pop(ref)
        try:
            arrays, n_windows = ray.get(ref)
        except ray.exceptions.RayError as err:
            if self.attempts[index] >= SHARD_ATTEMPTS or isinstance(err, ray.exceptions.RayTaskError) and isinstance(
                    err.cause, HeadVisError):
                raise HeadVisError(f"Shard {index} failed {self.attempts[index]} times: {err}") from err
            self._submit(index)
            return
        params = self.scan.params
        if n_windows < params.shard_windows:  # the corpus ends in this shard (or before it)
            self.last = index if self.last is None else min(self.last, index if n_windows else index - 1)
        if n_windows == 0:
            return
        started = time.perf_counter()
        write_stage(_shard_folder(self.scan.folder, index), "complete", arrays,
                    {"n_windows": n_windows, "shard": index}, {"shard": index, "windows_done": n_windows})
        self.pending[index] = _load_state(self.scan.loaded, params, arrays, n_windows)
        self._merge_ready()
        self.merge_seconds.append(time.perf_counter() - started)

    def _merge_ready(self) -> None:
        while self.merged in self.pending:
            self.consistent = False  # an interruption inside a merge must not save a half-merged state
            with interrupts_deferred():  # a Ctrl-C waits for the merge, then the merged state is saved
                self.scan.state.merge_state(self.pending[self.merged])
                del self.pending[self.merged]
                self.merged += 1
            self.consistent = True
        if time.time() - self.scan.last_checkpoint >= self.scan.checkpoint_seconds:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Save the merged state, then delete the stored shards it covers."""
        if self.consistent and self.scan.state.n_windows > self.scan.saved_at:
            self.scan.checkpoint()
            for index in range(self.merged):
                shutil.rmtree(_shard_folder(self.scan.folder, index), ignore_errors=True)

    def run(self) -> None:
        self._merge_ready()
        self._fill()
        while self.in_flight:
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=1.0)
            if ready:
                self._receive(ready[0])
                self._fill()
            self._report()
        if self.pending:
            raise HeadVisError(f"Shards {sorted(self.pending)} finished but shard {self.merged} never did.")

    def _report(self) -> None:
        params, done = self.scan.params, self.scan.state.n_windows
        done += sum(s.n_windows for s in self.pending.values())
        if self.board is not None:  # windows of the shards still running
            running = {index for index, _ in self.in_flight.values()}
            done += sum(n for index, n in ray.get(self.board.snapshot.remote()).items() if index in running)
        total = params.max_windows
        if self.last is not None:
            total = min(total or np.inf, (self.last + 1) * params.shard_windows)
        fraction = done / total if total else 0.0
        self.shown = max(self.shown, min(fraction, 0.99))
        rate = (done - self.scan.resumed_from) * params.window_len / max(time.time() - self.scan.started, 1e-9)
        report(self.progress, self.shown, f"{done} windows, {rate:.0f} tokens/s, {len(self.actors)} workers")


def _actor_options(ray_module: Any, cpus_per_worker: int) -> dict[str, Any]:
    gpus = ray_module.cluster_resources().get("GPU", 0)
    options = {"num_cpus": cpus_per_worker, "max_restarts": SHARD_ATTEMPTS, "max_task_retries": SHARD_ATTEMPTS}
    if gpus >= 1:
        options["num_gpus"] = 1
    return options


def run_sharded_scan(loaded: LoadedModel, corpus: Corpus, params: ScanParams = ScanParams(), workers: int = 2,
                     address: Optional[str] = None, out_dir: Optional[Path] = None, batch_size: int = 8,
                     progress: Optional[ProgressCallback] = None, checkpoint_seconds: float = 30.0,
                     force: bool = False, cpus_per_worker: int = 1) -> ScanResult:
    """:func:`headvis_core.scan.run.run_scan` with the shards scanned by ``workers`` Ray actors.

    ``address``: ``None`` or ``"auto"`` (a running cluster, else a new local one with
    ``workers * cpus_per_worker`` CPUs), or a cluster address. ``loaded`` gives the model's name and
    dtype (each worker loads its own copy) and the tokenizer for the result. The result and its
    folder are the one-process scan's: either can resume what the other stored.
    """
    if workers < 1:
        raise InputError("The number of workers must be at least 1.")
    if ray is None:
        raise InputError("Sharded scans need Ray: pip install ray==2.60.0")
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
        with ray_session(address, workers * cpus_per_worker) as ray_module:
            remote = ray_module.remote(**_actor_options(ray_module, cpus_per_worker))(ShardWorker)
            device = "cuda" if ray_module.cluster_resources().get("GPU", 0) >= 1 else "cpu"
            board = ray_module.remote(num_cpus=0)(ProgressBoard).remote()
            actors = [remote.remote(loaded.info.name, loaded.info.dtype, device, corpus, params, cpus_per_worker,
                                    board) for _ in range(workers)]
            driver = _Driver(scan, actors, batch_size, stored, progress, board)
            try:
                loading = time.perf_counter()
                for identity in ray_module.get([actor.identity.remote() for actor in actors]):
                    if identity != model_identity(loaded):
                        raise InputError(f"A worker loaded {identity}, not the driver's {model_identity(loaded)}.")
                scan.meta["worker_start_seconds"] = round(time.perf_counter() - loading, 3)
                scanning = time.perf_counter()
                driver.run()
                scan.meta["sharded_scan_seconds"] = round(time.perf_counter() - scanning, 3)
            except BaseException:  # interrupted or failed: keep what is merged (the stored shards stay too)
                driver.checkpoint()
                raise
            finally:
                for actor in actors + [board]:
                    ray_module.kill(actor)
        scan.meta.update(workers=workers, shards_received=len(driver.merge_seconds),
                         merge_seconds_per_shard=float(np.mean(driver.merge_seconds)) if driver.merge_seconds else 0.0)
        result = scan.finish()
        shutil.rmtree(folder / SHARDS_DIR, ignore_errors=True)
        report(progress, 1.0, f"{scan.state.n_windows} windows scanned by {workers} workers")
        return result
