"""The shared sharded-job driver: shards merged strictly in order whatever order they finish in, a user
error not retried, bad addresses refused before any connection."""

import sys
import time

import pytest

from headvis_core.errors import HeadVisError, InputError
from headvis_core.ray_jobs import ModelWorker, ShardDriver, check_address, ray_available, worker_pool

needs_ray = pytest.mark.skipif(not ray_available(), reason="Ray is not installed (pip install ray==2.60.0)")
N_SHARDS = 6


class SlowFirstWorker(ModelWorker):
    """Shard ``i`` takes longer the smaller ``i`` is, so shards finish out of order; shard ``bad`` is a user error."""

    def __init__(self, model_name, dtype, device, threads, board, bad: int):
        super().__init__(model_name, dtype, device, threads, board)
        self.bad = bad

    def run(self, index: int) -> int:
        if index == self.bad:
            raise InputError(f"shard {index} is bad")
        time.sleep(0.05 * (N_SHARDS - index))
        self.tell(index, 1)
        return index * 10


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@needs_ray
def test_results_are_merged_in_shard_order_and_stored_shards_are_not_run(cluster, tiny_gpt2):
    arrived, merged, ticks = [], [], []
    with worker_pool(SlowFirstWorker, tiny_gpt2, workers=2, args=(-1,)) as pool:
        driver = ShardDriver(pool, submit=lambda actor, index: actor.run.remote(index),
                             receive=lambda index, value: arrived.append(index) or value,
                             merge=lambda index, value: merged.append((index, value)), first=1,
                             last=N_SHARDS - 1, pending={3: "stored"}, on_tick=lambda: ticks.append(1))
        driver.run()
    assert arrived != sorted(arrived)  # they did finish out of order
    assert sorted(arrived) == [1, 2, 4, 5]  # shard 0 was merged before, shard 3 was stored
    assert merged == [(1, 10), (2, 20), (3, "stored"), (4, 40), (5, 50)]
    assert ticks and pool.start_seconds > 0


@needs_ray
def test_a_user_error_in_a_shard_fails_the_job_at_once(cluster, tiny_gpt2):
    with worker_pool(SlowFirstWorker, tiny_gpt2, workers=2, args=(2,)) as pool:
        driver = ShardDriver(pool, submit=lambda actor, index: actor.run.remote(index),
                             receive=lambda index, value: value, merge=lambda index, value: None,
                             last=N_SHARDS - 1)
        with pytest.raises(HeadVisError, match="Shard 2 failed 1 times"):
            driver.run()


@pytest.mark.parametrize("address", ["nowhere", "host:0", "host:70000", "a b:10", "http://x:1"])
def test_bad_addresses_are_refused_before_connecting(address):
    with pytest.raises(InputError, match="not a Ray cluster address"):
        check_address(address)


@pytest.mark.parametrize("address", [None, "auto", "10.0.0.5:6379", "head-node:6379", "ray://head:10001",
                                     "[::1]:6379"])
def test_good_addresses_pass(address):
    check_address(address)
