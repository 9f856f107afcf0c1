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

Ray is optional (``pip install ray==2.60.0``); :func:`ray_available` says
whether it is installed.
"""

import os
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional

import numpy as np
import torch

from headvis_core.errors import HeadVisError, InputError
from headvis_core.models.loader import LoadedModel, load_model

try:
    import ray
except ImportError:  # optional: the default install runs everything in one process
    ray = None

SHARD_ATTEMPTS = 3  # runs of one shard before the job fails (a worker that dies is restarted in between)
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
    """A Ray actor the workers tell how far each shard has got (in the job's units), for one progress bar."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def update(self, shard: int, units: int) -> None:
        self.done[shard] = units

    def snapshot(self) -> dict[int, int]:
        return dict(self.done)


class ModelWorker:
    """Base of a job's Ray actor: the driver's model, loaded once, and a way to report progress.

    Subclasses take their job's own arguments after these and add the methods that run one shard.
    """

    def __init__(self, model_name: str, dtype: str, device: Optional[str], threads: int, board: Any = None):
        torch.set_num_threads(threads)
        self.loaded = load_model(model_name, device=device, dtype=dtype)
        self.board = board

    def identity(self) -> dict[str, str]:
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
    runtime_env = {"env_vars": env}
    try:
        if address and address != "auto":
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        else:
            try:
                ray.init(address="auto", runtime_env=runtime_env, log_to_driver=False)
            except ConnectionError:
                ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
    except Exception as err:  # ray raises several kinds for an unreachable address
        raise InputError(f"Cannot connect to the Ray cluster at {address!r}: {err}") from err
    try:
        yield ray
    finally:
        ray.shutdown()


def actor_options(cpus_per_worker: int) -> dict[str, Any]:
    """Each actor: its CPUs, a GPU when the cluster has one, and restarts when its process dies."""
    options = {"num_cpus": cpus_per_worker, "max_restarts": SHARD_ATTEMPTS, "max_task_retries": SHARD_ATTEMPTS}
    if ray.cluster_resources().get("GPU", 0) >= 1:
        options["num_gpus"] = 1
    return options


@dataclass
class WorkerPool:
    actors: list
    board: Any  # the ProgressBoard actor
    start_seconds: float  # from the actors' creation to every model loaded and checked


@contextmanager
def worker_pool(worker_class: type, loaded: LoadedModel, workers: int, address: Optional[str] = None,
                cpus_per_worker: int = 1, args: tuple = ()) -> Iterator[WorkerPool]:
    """``workers`` actors of ``worker_class`` (a :class:`ModelWorker`), each holding ``loaded``'s model.

    ``address``: ``None`` or ``"auto"`` (a running cluster, else a new local one with
    ``workers * cpus_per_worker`` CPUs), or a cluster address. ``args`` follow the
    :class:`ModelWorker` arguments of the actors. The actors are killed on exit.
    """
    check_workers(workers)
    with ray_session(address, workers * cpus_per_worker):
        remote = ray.remote(**actor_options(cpus_per_worker))(worker_class)
        device = "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
        board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        started = time.perf_counter()
        actors = [remote.remote(loaded.info.name, loaded.info.dtype, device, cpus_per_worker, board, *args)
                  for _ in range(workers)]
        try:
            expected = model_identity(loaded)
            for identity in ray.get([actor.identity.remote() for actor in actors]):
                if identity != expected:
                    raise InputError(f"A worker loaded {identity}, not the driver's {expected}.")
            yield WorkerPool(actors, board, time.perf_counter() - started)
        finally:
            for actor in actors + [board]:
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
    """

    def __init__(self, pool: WorkerPool, submit: Callable[[Any, int], Any], receive: Callable[[int, Any], Any],
                 merge: Callable[[int, Any], None], first: int = 0, last: Optional[int] = None,
                 pending: Optional[dict[int, Any]] = None, on_tick: Optional[Callable[[], None]] = None,
                 merge_guard: Callable[[], ContextManager] = nullcontext):
        self.pool, self.submit, self.receive, self.merge = pool, submit, receive, merge
        self.merged = first  # shards merged: the next one to merge
        self.next_shard = first
        self.last = last
        self.pending = dict(pending or {})  # finished, not merged yet
        self.on_tick, self.merge_guard = on_tick, merge_guard
        self.in_flight: dict[Any, tuple[int, int]] = {}  # ref -> (shard, actor)
        self.attempts: dict[int, int] = {}
        self.receive_seconds: list[float] = []  # per shard received: receive + the merges it allowed

    def running(self) -> set[int]:
        return {index for index, _ in self.in_flight.values()}

    def running_units(self) -> int:
        """Units the workers reported for the shards still running (0 for a shard run again)."""
        done, running = ray.get(self.pool.board.snapshot.remote()), self.running()
        return sum(units for index, units in done.items() if index in running)

    def _submit(self, index: int) -> None:
        load = [0] * len(self.pool.actors)
        for _, actor in self.in_flight.values():
            load[actor] += 1
        actor = int(np.argmin(load))
        self.pool.board.update.remote(index, 0)  # a retried shard starts again from 0
        self.in_flight[self.submit(self.pool.actors[actor], index)] = (index, actor)
        self.attempts[index] = self.attempts.get(index, 0) + 1

    def _fill(self) -> None:
        while (len(self.in_flight) < SHARDS_PER_WORKER * len(self.pool.actors)
               and (self.last is None or self.next_shard <= self.last)):
            if self.next_shard not in self.pending:
                self._submit(self.next_shard)
            self.next_shard += 1

    def _receive(self, ref: Any) -> None:
        index, _ = self.in_flight.pop(ref)
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as err:
            user_error = isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, HeadVisError)
            if self.attempts[index] >= SHARD_ATTEMPTS or user_error:
                raise HeadVisError(f"Shard {index} failed {self.attempts[index]} times: {err}") from err
            self._submit(index)  # the worker died: Ray restarts it, the shard runs again
            return
        started = time.perf_counter()
        item = self.receive(index, value)
        if item is not None:
            self.pending[index] = item
        self.merge_ready()
        self.receive_seconds.append(time.perf_counter() - started)

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
            if self.on_tick is not None:
                self.on_tick()
        if self.pending:
            raise HeadVisError(f"Shards {sorted(self.pending)} finished but shard {self.merged} never did.")
