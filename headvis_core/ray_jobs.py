"""Sharded jobs on a Ray cluster: what the sharded scan and the sharded atlas share.

A job is a deterministic plan of shards ``0, 1, ...`` (the plan depends only on
the job's inputs, never on the workers). :func:`worker_pool` connects to a
cluster (or starts a local one), starts ``workers`` actors that each load the
driver's model once (on a GPU when the cluster has one; the driver's
environment, :data:`FORWARDED_ENV`, forwarded) and checks that every worker
loaded the same model as the driver. :class:`ShardDriver` keeps every actor
busy with whole shards, retries the shard of a worker that died, and merges
the results strictly in shard order, so the merged result is the one a single
process gets by merging the same shards in the same order. Workers report how
far each running shard has got to a :class:`ProgressBoard`, so the driver
shows one progress bar for all of them.

Failures: the driver alone retries (Ray's own task retries are off). A
shard whose worker was lost (its process died, or it stalled: no progress
report for ``stall_seconds``) runs again on a fresh actor that replaces the
lost one, up to :data:`SHARD_ATTEMPTS` runs; any error the shard's code
raised (a user error, a bug, out of memory) fails the job at once with that
error's own message. Before any actor starts, the workers are capped to what
the cluster has free (CPUs, and one GPU each where it has GPUs), and workers
that do not come up within ``start_seconds`` fail with an :class:`InputError`
that says what was asked for and what the cluster has.

Ray is optional (``pip install ray==2.60.0``); :func:`ray_available` says
whether it is installed.
"""

import logging
import os
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Optional

import numpy as np
import torch

from headvis_core.errors import HeadVisError, InputError, ModelLoadError
from headvis_core.models.loader import LoadedModel, load_model

try:
    import ray
except ImportError:  # optional: the default install runs everything in one process
    ray = None

SHARD_ATTEMPTS = 3  # runs of one shard before the job fails (a lost worker is replaced in between)
START_SECONDS = 600.0  # default wait for every worker to load its model
STALL_SECONDS = 1800.0  # default: a worker with work and no progress report for this long is lost
SHARDS_PER_WORKER = 2  # shards queued per actor, so a worker never waits for the driver
# Environment the workers need from the driver (where models and results live, how threads wait).
FORWARDED_ENV = ("HEADVIS_HOME", "HF_HOME", "OMP_WAIT_POLICY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
INSTALL_HINT = "pip install ray==2.60.0"
# host:port (a name, IPv4 or [IPv6]), optionally after ray://
ADDRESS = re.compile(r"^(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}$")


def ray_available() -> bool:
    return ray is not None


def check_workers(workers: int) -> None:
    if workers < 1:
        raise InputError(f"The number of workers must be at least 1, not {workers}.")


def check_address(address: Optional[str]) -> None:
    """Refuse a cluster address that is neither ``auto`` nor ``host:port`` before trying to connect."""
    if address is None or address == "auto":
        return
    port = address.rsplit(":", 1)[-1]
    if not ADDRESS.match(address) or not 0 < int(port) < 65536:
        raise InputError(f"{address!r} is not a Ray cluster address: give 'auto' or HOST:PORT (e.g. 10.0.0.5:6379).")


def model_identity(loaded: LoadedModel) -> dict[str, str]:
    """What a worker's copy of the model must share with the driver's (the device may differ)."""
    info = loaded.info
    return {"name": info.name, "source": info.source, "dtype": info.dtype, "n_params": str(info.n_params)}


class ProgressBoard:
    """A Ray actor the workers tell how far each shard has got (in the job's units), for one progress bar.

    Each report also counts as a sign of life of the shard's worker (see ``ShardDriver.stall_seconds``).
    """

    def __init__(self) -> None:
        self.done: dict[int, int] = {}
        self.reports = 0

    def update(self, shard: int, units: int) -> None:
        self.done[shard] = units
        self.reports += 1

    def forget(self, shard: int) -> None:
        """A finished shard: its units are merged by the driver now."""
        self.done.pop(shard, None)

    def snapshot(self) -> dict[int, int]:
        return dict(self.done)


class MonotonicBar:
    """A progress fraction that never goes back (a retried shard starts again from 0) and stays
    below 1 until the job has finished."""

    def __init__(self) -> None:
        self.shown = 0.0

    def __call__(self, fraction: float) -> float:
        self.shown = max(self.shown, min(fraction, 0.99))
        return self.shown


class ModelWorker:
    """Base of a job's Ray actor: the driver's model, loaded once, and a way to report progress.

    Subclasses take their job's own arguments after these and add the methods that run one shard.
    """

    def __init__(self, model_name: str, dtype: str, device: Optional[str], threads: int, board: Any = None):
        torch.set_num_threads(threads)
        self.board = board
        self.load_error: Optional[Exception] = None
        try:
            self.loaded = load_model(model_name, device=device, dtype=dtype)
        except Exception as err:  # kept for identity(): the driver gets the cause, not a dead actor
            self.load_error = err

    def identity(self) -> dict[str, str]:
        if self.load_error is not None:
            raise self.load_error
        return model_identity(self.loaded)

    def tell(self, shard: int, units: int) -> None:
        """Report ``units`` of ``shard`` done (not waited for)."""
        if self.board is not None:
            self.board.update.remote(shard, units)


@contextmanager
def ray_session(address: Optional[str], num_cpus: int) -> Iterator[Any]:
    """Ray, connected: to ``address`` (``"auto"``: a running cluster, else a local one), or a new local cluster.

    A cluster this call starts is shut down on exit; one that was already connected is left alone.
    """
    if ray is None:
        raise InputError(f"Sharded jobs need Ray: {INSTALL_HINT}")
    check_address(address)
    if ray.is_initialized():
        yield ray
        return
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    # the workers' own output stays in Ray's logs; Ray's INFO lines at startup are hidden, its warnings are not
    quiet = {"runtime_env": {"env_vars": env}, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address and address != "auto":
            ray.init(address=address, **quiet)
        else:
            try:
                ray.init(address="auto", **quiet)
            except ConnectionError:
                ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
    except Exception as err:  # ray raises several kinds for an unreachable address
        raise InputError(f"Cannot connect to the Ray cluster at {address!r}: {err}") from err
    try:
        yield ray
    finally:
        ray.shutdown()


def actor_options(cpus_per_worker: int) -> dict[str, Any]:
    """Each actor: its CPUs and a GPU when the cluster has one. Neither Ray restarts a dead actor nor retries
    its tasks: the driver owns the retries (:class:`ShardDriver` replaces a lost actor)."""
    options = {"num_cpus": cpus_per_worker, "max_restarts": 0, "max_task_retries": 0}
    if ray.cluster_resources().get("GPU", 0) >= 1:
        options["num_gpus"] = 1
    return options


def workers_that_fit(workers: int, options: dict[str, Any], available: dict[str, float]) -> tuple[int, list[str]]:
    """How many of ``workers`` actors asking ``options`` a cluster with resources ``available`` can hold, and notes.

    Raises :class:`InputError` when not even one fits (the actors would wait for resources for ever).
    :func:`worker_pool` gives the cluster's total resources (its free ones lag behind actors just
    killed); resources other jobs hold are caught by its start timeout.
    """
    fits, notes = workers, []
    for resource, option in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        asked = options.get(option, 0)
        if asked:
            room = int(available.get(resource, 0) // asked)
            if room < 1:
                raise InputError(f"The Ray cluster has {available.get(resource, 0):g} {resource}(s); each "
                                 f"worker needs {asked}: no worker can start.")
            if room < fits:
                notes.append(f"{workers} workers asked, {room} started: the cluster has "
                             f"{available.get(resource, 0):g} {resource}(s) and each worker needs {asked}")
                fits = room
    return fits, notes


@dataclass
class WorkerPool:
    actors: list
    board: Any  # the ProgressBoard actor
    start_seconds: float  # from the actors' creation to every model loaded and checked
    new_actor: Callable[[], Any] = None  # another actor like these (a replacement for a lost one)
    notes: list = field(default_factory=list)  # what the pool changed from what was asked (fewer workers)


def lost_worker(err: BaseException) -> bool:
    """Whether ``err`` says the shard's worker was lost (worth running the shard again), not that it failed."""
    lost = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError, ray.exceptions.LocalRayletDiedError)
    return isinstance(err, lost) and not isinstance(err, ray.exceptions.RayTaskError)


def cause_message(err: BaseException) -> str:
    """What went wrong in a worker, without Ray's remote traceback."""
    if isinstance(err, ray.exceptions.RayTaskError):
        return f"{type(err.cause).__name__}: {err.cause}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def worker_identity(ref: Any, model_name: str) -> dict[str, str]:
    """A worker's :meth:`ModelWorker.identity`, or the reason it could not load the model (no traceback)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, HeadVisError):
            raise err.cause from None
        raise ModelLoadError(f"A Ray worker could not load {model_name}: {cause_message(err)}") from None
    except ray.exceptions.RayError as err:
        raise ModelLoadError(f"A Ray worker died loading {model_name}: {cause_message(err)}") from None


def _check_identities(actors: list, expected: dict[str, str], timeout: float, options: dict[str, Any]) -> None:
    refs = [actor.identity.remote() for actor in actors]
    ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if waiting:
        asked = ", ".join(f"{name}={value}" for name, value in options.items() if name.startswith("num_"))
        raise InputError(f"{len(waiting)} of {len(refs)} Ray workers did not start within {timeout:g} s (each asks "
                         f"{asked}; the cluster has {ray.available_resources()} free): use fewer --workers or a "
                         "bigger cluster.")
    for ref in ready:
        identity = worker_identity(ref, expected["name"])
        if identity != expected:
            raise InputError(f"A worker loaded {identity}, not the driver's {expected}.")


@contextmanager
def worker_pool(worker_class: type, loaded: LoadedModel, workers: int, address: Optional[str] = None,
                cpus_per_worker: int = 1, args: tuple = (),
                start_seconds: float = START_SECONDS) -> Iterator[WorkerPool]:
    """``workers`` actors of ``worker_class`` (a :class:`ModelWorker`), each holding ``loaded``'s model.

    ``address``: ``None`` or ``"auto"`` (a running cluster, else a new local one with
    ``workers * cpus_per_worker`` CPUs), or a cluster address. ``args`` follow the
    :class:`ModelWorker` arguments of the actors. Fewer workers start when the cluster's
    resources hold fewer (said in :attr:`WorkerPool.notes`); workers not up within
    ``start_seconds`` raise :class:`InputError`. The actors are killed on exit.
    """
    check_workers(workers)
    with ray_session(address, workers * cpus_per_worker):
        options = actor_options(cpus_per_worker)
        workers, notes = workers_that_fit(workers, options, ray.cluster_resources())
        remote = ray.remote(**options)(worker_class)
        device = "cuda" if options.get("num_gpus") else "cpu"
        board = ray.remote(num_cpus=0)(ProgressBoard).remote()

        def new_actor() -> Any:
            return remote.remote(loaded.info.name, loaded.info.dtype, device, cpus_per_worker, board, *args)

        started = time.perf_counter()
        actors = [new_actor() for _ in range(workers)]
        pool = WorkerPool(actors, board, 0.0, new_actor, notes)
        try:
            _check_identities(actors, model_identity(loaded), start_seconds, options)
            pool.start_seconds = time.perf_counter() - started
            yield pool
        finally:
            for actor in pool.actors + [board]:
                ray.kill(actor)


class ShardDriver:
    """Runs a job's shards on a :class:`WorkerPool` and merges the results in shard order.

    Args:
        pool: the actors.
        submit: ``submit(actor, index)`` starts shard ``index`` on ``actor`` and returns its object ref.
        receive: ``receive(index, value)`` is called with each shard's value as it arrives (store it,
            convert it) and returns what to merge, or ``None`` for an empty shard (past the data's end).
        merge: ``merge(index, item)``, called for shards ``first, first + 1, ...`` strictly in order.
        first: the first shard to run (those before it are merged already).
        last: the last shard, or ``None`` while unknown (``receive`` may set :attr:`last` once the data ends).
        pending: shards finished earlier (stored), ``{index: item}``: merged in their turn, not run again.
        on_tick: called after every wait (about once a second, and after each result): progress.
        merge_guard: a context (e.g. one deferring Ctrl-C) around each merge and its bookkeeping.
        stall_seconds: a worker with shards to run that neither reports progress nor returns a shard for
            this long is taken as lost: it is killed and replaced, and its shards run again.

    After a run, :attr:`attempts` holds the runs of each shard started here, :attr:`replaced` the actors
    replaced.
    """

    def __init__(self, pool: WorkerPool, submit: Callable[[Any, int], Any], receive: Callable[[int, Any], Any],
                 merge: Callable[[int, Any], None], first: int = 0, last: Optional[int] = None,
                 pending: Optional[dict[int, Any]] = None, on_tick: Optional[Callable[[], None]] = None,
                 merge_guard: Callable[[], ContextManager] = nullcontext, stall_seconds: float = STALL_SECONDS):
        self.pool, self.submit, self.receive, self.merge = pool, submit, receive, merge
        self.merged = first  # shards merged: the next one to merge
        self.next_shard = first
        self.last = last
        self.pending = dict(pending or {})  # finished, not merged yet
        self.on_tick, self.merge_guard = on_tick, merge_guard
        self.stall_seconds = stall_seconds
        self.in_flight: dict[Any, tuple[int, int, Any]] = {}  # ref -> (shard, slot in pool.actors, actor)
        self.attempts: dict[int, int] = {}
        self.replaced = 0
        self.receive_seconds: list[float] = []  # per shard received: receive + the merges it allowed
        self.snapshot: dict[int, int] = {}  # the board's last report
        self.alive_at: dict[int, float] = {}  # slot -> last sign of life while it had work
        self.starting: dict[int, Any] = {}  # slot -> identity ref of a replacement still loading its model

    def running(self) -> set[int]:
        return {index for index, _, _ in self.in_flight.values()}

    def running_units(self) -> int:
        """Units the workers reported for the shards still running (0 for a shard run again)."""
        running = self.running()
        return sum(units for index, units in self.snapshot.items() if index in running)

    def _submit(self, index: int) -> None:
        load = [0] * len(self.pool.actors)
        for _, slot, _ in self.in_flight.values():
            load[slot] += 1
        slot = int(np.argmin(load))
        if not load[slot]:
            self.alive_at[slot] = time.monotonic()  # an idle worker's clock starts with its new work
        self.pool.board.update.remote(index, 0)  # a retried shard starts again from 0
        actor = self.pool.actors[slot]
        self.in_flight[self.submit(actor, index)] = (index, slot, actor)
        self.attempts[index] = self.attempts.get(index, 0) + 1

    def _fill(self) -> None:
        while (len(self.in_flight) < SHARDS_PER_WORKER * len(self.pool.actors)
               and (self.last is None or self.next_shard <= self.last)):
            if self.next_shard not in self.pending:
                self._submit(self.next_shard)
            self.next_shard += 1

    def _replace(self, slot: int, why: str = "lost") -> None:
        """Kill the actor in ``slot`` (lost or stalled) and start a fresh one there; its shards run again."""
        ray.kill(self.pool.actors[slot], no_restart=True)
        self.pool.actors[slot] = self.pool.new_actor()
        self.starting[slot] = self.pool.actors[slot].identity.remote()  # no stall clock while it loads
        self.replaced += 1
        lost = [(ref, index) for ref, (index, owner, _) in self.in_flight.items() if owner == slot]
        for ref, _ in lost:
            del self.in_flight[ref]
        for _, index in sorted(lost, key=lambda item: item[1]):
            self._retry_lost(index, f"its worker was {why}")

    def _retry_lost(self, index: int, why: str) -> None:
        """Run again a shard whose worker was lost, unless it has had its :data:`SHARD_ATTEMPTS` runs."""
        if self.attempts[index] >= SHARD_ATTEMPTS:
            raise HeadVisError(f"Shard {index} failed {self.attempts[index]} times: {why}.")
        self._submit(index)

    def _receive(self, ref: Any) -> None:
        index, slot, actor = self.in_flight.pop(ref)
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as err:
            if not lost_worker(err):  # the shard's own code failed: running it again gives the same error
                cause = getattr(err, "cause", None)
                if isinstance(cause, HeadVisError):
                    raise cause from None
                raise HeadVisError(f"Shard {index} failed: {cause_message(err)}") from err
            why = f"lost ({cause_message(err)})"
            if self.pool.actors[slot] is actor:  # not replaced yet (its other shards fail the same way)
                self._replace(slot, why)
            return self._retry_lost(index, f"its worker was {why}")
        self.alive_at[slot] = time.monotonic()
        self.pool.board.forget.remote(index)
        self.snapshot.pop(index, None)
        started = time.perf_counter()
        item = self.receive(index, value)
        if item is not None:
            self.pending[index] = item
        self.merge_ready()
        self.receive_seconds.append(time.perf_counter() - started)

    def _watch(self) -> None:
        """Read the board; replace a worker with work and no sign of life for ``stall_seconds``."""
        now = time.monotonic()
        snapshot = ray.get(self.pool.board.snapshot.remote())
        busy = {slot for _, slot, _ in self.in_flight.values()}
        for index, slot, _ in list(self.in_flight.values()):
            if snapshot.get(index) != self.snapshot.get(index):
                self.alive_at[slot] = now
        self.snapshot = snapshot
        for index in set(snapshot) - self.running():  # a worker's report that came after its shard's result
            self.pool.board.forget.remote(index)
        for slot, ref in list(self.starting.items()):
            if ray.wait([ref], timeout=0)[0]:
                worker_identity(ref, "the model")  # a replacement that cannot load it fails the job
                del self.starting[slot]
                self.alive_at[slot] = now
        for slot in sorted(busy - set(self.starting)):
            if now - self.alive_at.get(slot, now) > self.stall_seconds:
                self._replace(slot, f"stalled (no progress for {self.stall_seconds:g} s)")
                self.alive_at[slot] = now

    def merge_ready(self) -> None:
        """Merge the finished shards that are next in order."""
        while self.merged in self.pending:
            with self.merge_guard():
                self.merge(self.merged, self.pending.pop(self.merged))
                self.merged += 1

    def run(self) -> None:
        self.merge_ready()
        self._fill()
        while self.in_flight:
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=1.0)
            if ready:
                self._receive(ready[0])
                self._fill()
            if self.in_flight:
                self._watch()
                self._fill()
            if self.on_tick is not None:
                self.on_tick()
        if self.pending:
            raise HeadVisError(f"Shards {sorted(self.pending)} finished but shard {self.merged} never did.")
