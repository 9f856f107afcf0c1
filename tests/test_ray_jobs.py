"""The shared sharded-job driver: shards merged strictly in order whatever order they finish in; only a
lost worker's shard run again (exactly ``SHARD_ATTEMPTS`` times at most), any other error final with its own
message; workers capped to what the cluster holds, a worker that cannot start or load a clear error; a
stalled worker replaced; bad addresses refused before any connection."""

import os
import sys
import time
from pathlib import Path

import pytest

from headvis_core.errors import HeadVisError, InputError, ModelLoadError
from headvis_core.ray_jobs import (
    SHARD_ATTEMPTS,
    ModelWorker,
    MonotonicBar,
    ProgressBoard,
    ShardDriver,
    check_address,
    ray_available,
    worker_pool,
    workers_that_fit,
)
from tests.conftest import ray_cluster

needs_ray = pytest.mark.skipif(not ray_available(), reason="Ray is not installed (pip install ray==2.60.0)")
N_SHARDS = 6


class ScriptedWorker(ModelWorker):
    """Shard ``i`` does ``script[i]`` (default: returns ``10 * i``); every run of a shard is counted in a file.

    ``user``: an InputError; ``bug``: a ValueError; ``exit``: the worker process dies; ``stall_once``: the first
    run never returns; ``wait_for_N``: waits until the driver has received shard N (a marker file).
    """

    def __init__(self, model_name, dtype, device, threads, board, script: dict, folder: str):
        super().__init__(model_name, dtype, device, threads, board)
        self.script, self.folder = script, Path(folder)

    def run(self, index: int) -> int:
        runs = self.folder / f"runs-{index}"
        with open(runs, "a") as file:
            file.write("x")
        action = self.script.get(index, "")
        if action == "user":
            raise InputError(f"shard {index} is bad")
        if action == "bug":
            raise ValueError(f"shard {index} has a bug")
        if action == "exit":
            os._exit(1)
        if action == "stall_once" and runs.read_text() == "x":
            time.sleep(3600)
        if action.startswith("wait_for_"):
            while not (self.folder / f"received-{action.rsplit('_', 1)[1]}").exists():
                time.sleep(0.01)
        self.tell(index, 1)
        return index * 10


class BrokenModelWorker(ModelWorker):
    def __init__(self, model_name, dtype, device, threads, board):
        super().__init__("no-such-model-anywhere", dtype, device, threads, board)


def runs(folder: Path, index: int) -> int:
    path = folder / f"runs-{index}"
    return len(path.read_text()) if path.exists() else 0


@pytest.fixture(scope="module")
def cluster():
    yield from ray_cluster(pickle_by_value=[sys.modules[__name__]])


def scripted_driver(pool, folder: Path, merged: list, **kwargs) -> ShardDriver:
    def receive(index, value):
        (folder / f"received-{index}").touch()
        return value

    return ShardDriver(pool, submit=lambda actor, index: actor.run.remote(index), receive=receive,
                       merge=lambda index, value: merged.append((index, value)), **kwargs)


@needs_ray
def test_results_are_merged_in_shard_order_and_stored_shards_are_not_run(cluster, tiny_gpt2, tmp_path):
    arrived, merged, ticks = [], [], []
    # shard 1 finishes only after the driver has received shard 2: out of order, whatever the timing
    with worker_pool(ScriptedWorker, tiny_gpt2, workers=2, args=({1: "wait_for_2"}, str(tmp_path))) as pool:
        driver = scripted_driver(pool, tmp_path, merged, first=1, last=N_SHARDS - 1, pending={3: "stored"},
                                 on_tick=lambda: ticks.append(1))
        receive = driver.receive
        driver.receive = lambda index, value: arrived.append(index) or receive(index, value)
        driver.run()
    assert arrived.index(2) < arrived.index(1)
    assert sorted(arrived) == [1, 2, 4, 5]  # shard 0 was merged before, shard 3 was stored
    assert merged == [(1, 10), (2, 20), (3, "stored"), (4, 40), (5, 50)]
    assert ticks and pool.start_seconds > 0


@needs_ray
def test_a_user_error_fails_the_job_at_once_with_its_own_message(cluster, tiny_gpt2, tmp_path):
    with worker_pool(ScriptedWorker, tiny_gpt2, workers=2, args=({2: "user"}, str(tmp_path))) as pool:
        with pytest.raises(InputError) as raised:
            scripted_driver(pool, tmp_path, [], last=N_SHARDS - 1).run()
    assert str(raised.value) == "shard 2 is bad"  # no remote traceback
    assert runs(tmp_path, 2) == 1


@needs_ray
def test_a_code_error_is_not_retried(cluster, tiny_gpt2, tmp_path):
    with worker_pool(ScriptedWorker, tiny_gpt2, workers=2, args=({2: "bug"}, str(tmp_path))) as pool:
        driver = scripted_driver(pool, tmp_path, [], last=N_SHARDS - 1)
        with pytest.raises(HeadVisError) as raised:
            driver.run()
    assert str(raised.value) == "Shard 2 failed: ValueError: shard 2 has a bug"
    assert runs(tmp_path, 2) == 1 and driver.attempts[2] == 1 and driver.replaced == 0


@needs_ray
def test_a_shard_that_kills_its_worker_runs_exactly_shard_attempts_times(cluster, tiny_gpt2, tmp_path):
    with worker_pool(ScriptedWorker, tiny_gpt2, workers=2, args=({2: "exit"}, str(tmp_path))) as pool:
        driver = scripted_driver(pool, tmp_path, [], last=N_SHARDS - 1)
        with pytest.raises(HeadVisError, match=f"Shard 2 failed {SHARD_ATTEMPTS} times: its worker was lost") \
                as raised:
            driver.run()
    assert "Traceback" not in str(raised.value)
    assert runs(tmp_path, 2) == SHARD_ATTEMPTS  # neither Ray nor the driver ran it once more
    assert driver.attempts[2] == SHARD_ATTEMPTS


@needs_ray
def test_a_stalled_worker_is_replaced_and_its_shard_run_again(cluster, tiny_gpt2, tmp_path):
    merged = []
    with worker_pool(ScriptedWorker, tiny_gpt2, workers=2, args=({2: "stall_once"}, str(tmp_path))) as pool:
        driver = scripted_driver(pool, tmp_path, merged, last=N_SHARDS - 1, stall_seconds=3)
        driver.run()
    assert merged == [(i, 10 * i) for i in range(N_SHARDS)]
    assert runs(tmp_path, 2) == 2 and driver.replaced == 1 and driver.attempts[2] == 2


@needs_ray
def test_a_worker_that_cannot_load_the_model_is_a_clear_error(cluster, tiny_gpt2):
    with pytest.raises(ModelLoadError) as raised:
        with worker_pool(BrokenModelWorker, tiny_gpt2, workers=2):
            pass
    assert "no-such-model-anywhere" in str(raised.value) and "Traceback" not in str(raised.value)


@needs_ray
def test_workers_are_capped_to_the_cluster_and_a_slow_start_is_an_error(cluster, tiny_gpt2, tmp_path):
    with worker_pool(ScriptedWorker, tiny_gpt2, workers=3, args=({}, str(tmp_path))) as pool:
        assert len(pool.actors) == 2  # the cluster has 2 CPUs: a third worker would wait for ever
        assert pool.notes == ["3 workers asked, 2 started: the cluster has 2 CPU(s) and each worker needs 1"]
    with pytest.raises(InputError, match="did not start within 0 s"):
        with worker_pool(ScriptedWorker, tiny_gpt2, workers=1, args=({}, str(tmp_path)), start_seconds=0):
            pass


def test_workers_that_fit_counts_cpus_and_gpus():
    assert workers_that_fit(2, {"num_cpus": 1}, {"CPU": 4.0}) == (2, [])
    fits, notes = workers_that_fit(2, {"num_cpus": 1, "num_gpus": 1}, {"CPU": 8.0, "GPU": 1.0})
    assert fits == 1 and "1 GPU(s)" in notes[0]
    with pytest.raises(InputError, match="no worker can start"):
        workers_that_fit(2, {"num_cpus": 2}, {"CPU": 1.0})


def test_the_progress_board_drops_finished_shards():
    board = ProgressBoard()
    board.update(1, 0)
    board.update(2, 5)
    board.forget(1)
    assert board.snapshot() == {2: 5}


def test_the_bar_never_goes_back_and_waits_for_the_end():
    bar = MonotonicBar()
    assert [bar(f) for f in (0.2, 0.5, 0.1, 1.0)] == [0.2, 0.5, 0.5, 0.99]


@pytest.mark.parametrize("address", ["nowhere", "host:0", "host:70000", "a b:10", "http://x:1"])
def test_bad_addresses_are_refused_before_connecting(address):
    with pytest.raises(InputError, match="not a Ray cluster address"):
        check_address(address)


@pytest.mark.parametrize("address", [None, "auto", "10.0.0.5:6379", "head-node:6379", "ray://head:10001",
                                     "[::1]:6379"])
def test_good_addresses_pass(address):
    check_address(address)
