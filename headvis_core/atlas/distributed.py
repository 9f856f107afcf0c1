"""The atlas's real-text shards on a Ray cluster: the one-process atlas's table, bit for bit.

The real text (the expensive part of an atlas over a corpus) is cut into the
deterministic shards of :func:`headvis_core.atlas.metrics.plan_text_shards`.
:class:`RayTextShards` runs them through the shared sharded-job driver
(:mod:`headvis_core.ray_jobs`): each actor (:class:`AtlasShardWorker`) loads
the model once and returns one shard's partial sums at a time
(:func:`headvis_core.atlas.metrics.text_shard_partial`, the same function the
one-process atlas runs); the driver adds them up in shard order, as the
one-process atlas does, so both give the same table. A worker that dies is
replaced and its shard run again. The induction probe, retrieval, copying
scores and passport examples stay on the driver.

Not resumable per shard: an atlas is small next to a scan, and a finished one
is kept in the result store; a killed sharded atlas starts again.

    compute_atlas(loaded.model, folder, text_shards=RayTextShards(loaded, workers=2))
"""

import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from headvis_core.atlas.metrics import MetricSums, TextShardPlan, text_shard_partial
from headvis_core.errors import InputError
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


class AtlasShardWorker(ModelWorker):
    """One Ray actor: a model loaded once, returning the partial sums of whole text shards."""

    def __init__(self, model_name: str, dtype: str, device: Optional[str], threads: int, board: Any,
                 seen_ids: torch.Tensor, direct_copying: bool):
        super().__init__(model_name, dtype, device, threads, board)
        self.sums = MetricSums(self.loaded.model, seen_ids, direct_copying=direct_copying)

    def text_shard(self, index: int, batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
        return text_shard_partial(self.loaded.model, self.sums, batches,
                                  on_batch=lambda done: self.tell(index, done))


class RayTextShards:
    """A :data:`headvis_core.atlas.metrics.TextShardRunner` on ``workers`` Ray actors.

    ``address``: ``None`` or ``"auto"`` (a running cluster, else a new local one with
    ``workers * cpus_per_worker`` CPUs), or a cluster address. ``loaded`` names the model each
    worker loads (and is checked against). After a run, :attr:`stats` holds the worker start and
    the sharded text's seconds, the shards and the merge time per shard.
    """

    def __init__(self, loaded: LoadedModel, workers: int = 2, address: Optional[str] = None,
                 cpus_per_worker: int = 1, stall_seconds: float = STALL_SECONDS):
        check_workers(workers)
        check_address(address)
        if not ray_available():
            raise InputError(f"A sharded atlas needs Ray: {INSTALL_HINT}")
        self.loaded, self.workers, self.address, self.cpus_per_worker = loaded, workers, address, cpus_per_worker
        self.driver_options = {"stall_seconds": stall_seconds}
        self.stats: dict[str, float] = {}
        self.notes: list[str] = []

    def __call__(self, plan: TextShardPlan, direct_copying: bool, merge: Callable[[dict[str, np.ndarray]], None],
                 progress: Optional[ProgressCallback] = None) -> None:
        if not plan.n_shards:
            return
        n_batches = len(plan.batches)
        merged_batches = [0]
        bar = MonotonicBar()
        self.notes = []
        workers = min(self.workers, plan.n_shards)
        if workers < self.workers:
            self.notes.append(f"{self.workers} workers asked, {workers} started: the real text is "
                              f"{plan.n_shards} shard(s) (--shard-seqs sets their size)")

        def submit(actor: Any, index: int) -> Any:
            return actor.text_shard.remote(index, plan.shard_batches(index))

        def merge_in_order(index: int, shard_sums: dict[str, np.ndarray]) -> None:
            merge(shard_sums)
            merged_batches[0] += len(plan.shards[index])

        def tick() -> None:
            done = merged_batches[0] + driver.running_units()
            done += sum(len(plan.shards[index]) for index in driver.pending)
            report(progress, bar(done / n_batches), f"real text: {done} of {n_batches} batches, {workers} workers")

        report(progress, 0.0, f"starting {workers} Ray workers")
        with worker_pool(AtlasShardWorker, self.loaded, workers, self.address, self.cpus_per_worker,
                         (plan.seen_ids, direct_copying)) as pool:
            self.notes += pool.notes
            for note in self.notes:
                report(progress, 0.0, f"note: {note}")
            workers = len(pool.actors)
            driver = ShardDriver(pool, submit, receive=lambda index, value: value, merge=merge_in_order,
                                 first=0, last=plan.n_shards - 1, on_tick=tick, **self.driver_options)
            started = time.perf_counter()
            driver.run()
            received = driver.receive_seconds
            self.stats = {"worker_start_seconds": pool.start_seconds,
                          "text_seconds": time.perf_counter() - started, "shards": plan.n_shards,
                          "shard_runs": sum(driver.attempts.values()), "workers": workers,
                          "merge_seconds_per_shard": float(np.mean(received)) if received else 0.0}
        report(progress, 1.0, f"real text: {n_batches} batches in {plan.n_shards} shards on {workers} workers")
