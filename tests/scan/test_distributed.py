"""The scan sharded over a local Ray cluster: the one-process result exactly, after kills and resumes too."""

import json
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from headvis_core.data.corpus import open_corpus
from headvis_core.errors import InputError
from headvis_core.scan import ScanParams, list_scans, load_scan, run_scan
from headvis_core.scan.distributed import SHARDS_DIR, ray_available, run_sharded_scan
from tests.conftest import ray_cluster, write_random_words
from tests.scan.test_shards import assert_same_arrays

pytestmark = pytest.mark.skipif(not ray_available(), reason="Ray is not installed (pip install ray==2.60.0)")

PARAMS = ScanParams(window_len=10, max_windows=60, examples_per_decile=2, top_examples=5, top_k_keys=3,
                    reservoir_size=12, histogram_bins=512, shard_windows=8, token_capacity=6)


@pytest.fixture(scope="module")
def cluster():
    yield from ray_cluster()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_corpus")
    write_random_words(root / "a.txt", 500)
    return open_corpus(str(root))


@pytest.fixture(scope="module")
def one_process(tiny_llama, corpus, tmp_path_factory):
    return run_scan(tiny_llama, corpus, PARAMS, out_dir=tmp_path_factory.mktemp("whole"), batch_size=4)


def test_two_workers_give_the_one_process_result(cluster, tiny_llama, corpus, one_process, tmp_path):
    fractions = []
    result = run_sharded_scan(tiny_llama, corpus, PARAMS, workers=2, out_dir=tmp_path, batch_size=4,
                              progress=lambda f, m: fractions.append(f))
    assert result.n_windows == 60
    assert_same_arrays(result, one_process)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 3  # one bar
    assert not (result.path / SHARDS_DIR).exists()
    assert [s.status for s in list_scans(tmp_path)] == ["complete"]


def kill_a_worker_mid_shard(killed: list, stop: threading.Event) -> None:
    """SIGKILL the first actor process seen running a shard (Ray names it after the method it runs)."""
    while not stop.is_set() and not killed:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if "ray::ShardWorker.scan_shard" in " ".join(proc.info["cmdline"] or []):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return
        time.sleep(0.005)


def test_a_worker_killed_mid_shard_is_replaced_and_the_result_is_the_same(cluster, tiny_llama, corpus,
                                                                          one_process, tmp_path):
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=kill_a_worker_mid_shard, args=(killed, stop))
    killer.start()
    try:
        result = run_sharded_scan(tiny_llama, corpus, PARAMS, workers=2, out_dir=tmp_path, batch_size=4)
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 1
    assert_same_arrays(result, one_process)
    # Ray retries nothing itself: the killed worker's shard(s) were run again by the driver (1 or 2 were queued)
    assert 1 <= result.meta["shard_runs"] - result.meta["shards_received"] <= 2


class Interrupted(Exception):
    pass


def test_a_killed_run_resumes_without_redoing_finished_shards(cluster, tiny_llama, corpus, one_process, tmp_path):
    def stop_near_the_end(fraction, message):
        if fraction >= 0.9:
            raise Interrupted()

    with pytest.raises(Interrupted):
        run_sharded_scan(tiny_llama, corpus, PARAMS, workers=2, out_dir=tmp_path, batch_size=4,
                         progress=stop_near_the_end, checkpoint_seconds=3600)
    checkpoint = [s.windows for s in list_scans(tmp_path) if s.status == "partial"]
    merged = checkpoint[0] if checkpoint else 0  # shards merged into the saved state
    shard_files = list(tmp_path.glob(f"*/{SHARDS_DIR}/*/manifest.json"))  # finished, not merged yet
    finished = merged + sum(json.loads(f.read_text())["windows_done"] for f in shard_files)
    # 54 of 60 windows counted, less up to 4 shards in flight (2 per worker) whose windows the workers reported
    assert merged in (60, *range(0, 60, PARAMS.shard_windows)) and finished >= 54 - 4 * PARAMS.shard_windows
    messages = []
    resumed = run_sharded_scan(tiny_llama, corpus, PARAMS, workers=2, out_dir=tmp_path, batch_size=4,
                               progress=lambda f, m: messages.append(m))
    assert resumed.meta["resumed_from"] == merged
    assert resumed.meta["shards_received"] == 8 - -(-merged // PARAMS.shard_windows) - len(shard_files)  # none redone
    assert any("finished shard(s) found" in m for m in messages) == bool(shard_files)
    assert_same_arrays(resumed, one_process)


@pytest.mark.parametrize("batches", [3, 15])  # 12 windows: inside the second shard; 60: all of them
def test_a_one_process_checkpoint_is_finished_and_resumed(cluster, tiny_llama, corpus, one_process, tmp_path,
                                                          batches):
    calls = []

    def stop(fraction, message):
        calls.append(message)
        if len(calls) == batches:
            raise Interrupted()

    with pytest.raises(Interrupted):  # one process, stopped after some batches of 4
        run_scan(tiny_llama, corpus, PARAMS, out_dir=tmp_path, batch_size=4, progress=stop, checkpoint_seconds=3600)
    assert [s.windows for s in list_scans(tmp_path)] == [4 * batches]
    result = run_sharded_scan(tiny_llama, corpus, PARAMS, workers=2, out_dir=tmp_path, batch_size=4)
    assert result.meta["resumed_from"] == 4 * batches
    assert result.meta["shards_received"] == 8 - -(-4 * batches // PARAMS.shard_windows)
    assert_same_arrays(result, one_process)


def test_bad_worker_counts_and_addresses(tiny_llama, corpus, tmp_path):
    with pytest.raises(InputError, match="workers"):
        run_sharded_scan(tiny_llama, corpus, PARAMS, workers=0, out_dir=tmp_path)
    with pytest.raises(InputError, match="not a Ray cluster address"):
        run_sharded_scan(tiny_llama, corpus, PARAMS, workers=2, address="head node", out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_smollm2_over_two_workers_equals_the_one_process_scan(cluster, smollm2, corpus_dir, tmp_path):
    corpus = open_corpus(str(corpus_dir / "gutenberg"))
    params = ScanParams(window_len=24, max_windows=8, examples_per_decile=1, reservoir_size=8, shard_windows=4,
                        token_capacity=32)
    whole = run_scan(smollm2, corpus, params, out_dir=tmp_path / "a", batch_size=4)
    sharded = run_sharded_scan(smollm2, corpus, params, workers=2, out_dir=tmp_path / "b", batch_size=4)
    assert_same_arrays(sharded, whole)
    assert np.all(sharded.arrays["hh_slack"] >= 0)


def test_cli_scan_over_ray_and_its_bad_inputs(cluster, corpus, tmp_path, capsys):
    from headvis_core.cli.main import main

    args = ["scan", "--model", "tiny-gpt2", "--corpus", corpus.spec, "--out", str(tmp_path), "--window", "8",
            "--max-windows", "16", "--shard-windows", "8", "--batch-size", "4", "--token-capacity", "16"]
    assert main(args + ["--ray", "auto", "--workers", "2", "--show", "1.2"]) == 0
    out = capsys.readouterr().out
    assert "16 windows (128 tokens)" in out and "head 1.2" in out
    [stored] = list_scans(tmp_path)
    result = load_scan(stored.folder)
    assert result.params.shard_windows == 8 and result.arrays["hh_ids"].shape[1] == 16
    for bad in (["--ray", "auto", "--workers", "0"], ["--shard-windows", "0"]):
        assert main(args + bad) == 2 and bad[-2] in capsys.readouterr().err
