"""The atlas's real text in shards: one process or Ray workers, the same table bit for bit."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import psutil
import pytest
import torch

from headvis_core.atlas.metrics import DEFAULT_SHARD_SEQUENCES, MetricSums, plan_text_shards, text_shard_partial
from headvis_core.atlas.run import METRIC_COLUMNS, compute_atlas, folder_probe_set
from headvis_core.cli.main import main as cli_main
from headvis_core.errors import InputError
from headvis_core.ray_jobs import ray_available
from tests.conftest import ray_cluster, write_random_words

needs_ray = pytest.mark.skipif(not ray_available(), reason="Ray is not installed (pip install ray==2.60.0)")
SIZES = {"n_seqs": 24, "seq_len": 64, "batch_size": 2, "shard_sequences": 4}  # 12 batches, 6 shards


@pytest.fixture(scope="module")
def cluster():
    yield from ray_cluster()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas_corpus")
    for seed, name in enumerate(("a.txt", "b.txt"), start=2):
        write_random_words(root / name, 1500, seed=seed)
    return root


@pytest.fixture(scope="module")
def one_process(tiny_llama, corpus):
    return compute_atlas(tiny_llama.model, folder=corpus, model_name="tiny-llama", **SIZES)


def assert_same_atlas(a, b) -> None:
    """Every metric column equal bit for bit (NaN where NaN), and the same behaviours and top tokens."""
    assert list(a.table.columns) == list(b.table.columns)
    for column in METRIC_COLUMNS:
        assert np.array_equal(a.table[column].to_numpy(), b.table[column].to_numpy(), equal_nan=True), column
    assert a.table.equals(b.table)
    assert a.top_tokens == b.top_tokens


def sequences(lengths: list[int]) -> list[torch.Tensor]:
    return [torch.arange(n)[None] for n in lengths]


def test_the_shard_plan_cuts_whole_batches_by_sequences():
    plan = plan_text_shards(sequences([5] * 7 + [3] * 2), batch_size=2, shard_sequences=4)
    # batches by length, longest first: [5]x2, x2, x2, x1, then [3]x2
    assert [b.shape for b in plan.batches] == [(2, 5)] * 3 + [(1, 5), (2, 3)]
    assert plan.shards == [range(0, 2), range(2, 4), range(4, 5)]
    assert [len(plan.shard_batches(i)) for i in range(plan.n_shards)] == [2, 2, 1]
    assert plan.seen_ids.tolist() == [1, 2, 3, 4]
    # a batch bigger than a shard is a shard of its own; the default keeps the default probe in one shard
    assert plan_text_shards(sequences([5] * 4), 4, 1).shards == [range(0, 1)]
    assert plan_text_shards(sequences([9] * 64), 16).shards == [range(0, 4)]
    assert DEFAULT_SHARD_SEQUENCES == 64
    assert plan_text_shards([], 4).n_shards == 0
    with pytest.raises(InputError):
        plan_text_shards(sequences([5]), 4, 0)


def test_shards_change_only_the_rounding_of_the_sums(tiny_llama, corpus, one_process):
    """One shard (the old single pass) and 6 shards add the same numbers in another order."""
    whole = compute_atlas(tiny_llama.model, folder=corpus, model_name="tiny-llama",
                          **{**SIZES, "shard_sequences": 1000})
    per_batch = compute_atlas(tiny_llama.model, folder=corpus, model_name="tiny-llama",
                              **{**SIZES, "shard_sequences": 1})
    assert_same_atlas(per_batch, whole)  # a batch per shard adds batch by batch, as one pass does
    for column in METRIC_COLUMNS:
        np.testing.assert_allclose(one_process.table[column], whole.table[column], rtol=1e-7, atol=1e-12,
                                   err_msg=column)


def test_a_shard_partial_starts_from_zero_whatever_was_left(tiny_llama, corpus):
    model = tiny_llama.model
    probe = folder_probe_set(model, corpus, n_seqs=4, seq_len=32)
    plan = plan_text_shards(probe.sequences, 2, 2)
    sums = MetricSums(model, plan.seen_ids)
    clean = text_shard_partial(model, sums, plan.shard_batches(0))
    sums.add_text(model, plan.batches[1])  # a failed shard's leftovers
    again = text_shard_partial(model, sums, plan.shard_batches(0))
    assert sorted(clean) == sorted(again)
    assert all(np.array_equal(clean[name], again[name]) for name in clean)
    assert all(not tensor.any() for tensor in sums.text_tensors().values())  # taken: zero again


@needs_ray
def test_two_ray_workers_give_the_one_process_table(cluster, tiny_llama, corpus, one_process):
    from headvis_core.atlas.distributed import RayTextShards

    fractions = []
    runner = RayTextShards(tiny_llama, workers=2)
    sharded = compute_atlas(tiny_llama.model, folder=corpus, model_name="tiny-llama", text_shards=runner,
                            progress=lambda fraction, message: fractions.append(fraction), **SIZES)
    assert_same_atlas(sharded, one_process)
    assert runner.stats["shards"] == 6
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 3  # one bar


def kill_a_worker_mid_shard(killed: list, stop: threading.Event) -> None:
    """SIGKILL the first actor process seen running a shard (Ray names it after the method it runs)."""
    while not stop.is_set() and not killed:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if "ray::AtlasShardWorker.text_shard" in " ".join(proc.info["cmdline"] or []):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return
        time.sleep(0.005)


@needs_ray
def test_a_worker_killed_mid_shard_is_replaced_and_the_table_is_the_same(cluster, tiny_llama, corpus,
                                                                         one_process):
    from headvis_core.atlas.distributed import RayTextShards

    killed, stop = [], threading.Event()
    killer = threading.Thread(target=kill_a_worker_mid_shard, args=(killed, stop))
    killer.start()
    runner = RayTextShards(tiny_llama, workers=2)
    try:
        sharded = compute_atlas(tiny_llama.model, folder=corpus, model_name="tiny-llama", text_shards=runner,
                                **SIZES)
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 1
    assert_same_atlas(sharded, one_process)
    # Ray retries nothing itself: the killed worker's shard(s) were run again by the driver (1 or 2 were queued)
    assert 1 <= runner.stats["shard_runs"] - runner.stats["shards"] <= 2


@needs_ray
def test_smollm2_over_two_workers_equals_the_one_process_atlas(cluster, smollm2, corpus_dir):
    from headvis_core.atlas.distributed import RayTextShards

    sizes = {"n_seqs": 8, "seq_len": 32, "batch_size": 2, "shard_sequences": 2, "n_induction_seqs": 2}
    folder = corpus_dir / "gutenberg"
    whole = compute_atlas(smollm2.model, folder=folder, model_name="smollm2-135m", **sizes)
    sharded = compute_atlas(smollm2.model, folder=folder, model_name="smollm2-135m",
                            text_shards=RayTextShards(smollm2, workers=2), **sizes)
    assert_same_atlas(sharded, whole)
    assert whole.table.direct_copying.notna().all()


@pytest.mark.parametrize("kwargs, message", [({"workers": 0}, "at least 1"),
                                             ({"address": "no port"}, "not a Ray cluster address"),
                                             ({"address": "host:99999"}, "not a Ray cluster address")])
def test_bad_worker_counts_and_addresses_are_refused_at_once(tiny_llama, kwargs, message):
    from headvis_core.atlas.distributed import RayTextShards

    if not ray_available() and "workers" not in kwargs:
        pytest.skip("Ray is not installed")
    with pytest.raises(InputError, match=message):
        RayTextShards(tiny_llama, **kwargs)


def test_the_one_process_atlas_never_imports_ray():
    """What the Head atlas page runs (compute_atlas without text_shards) works where Ray is not installed."""
    code = ("import sys; from headvis_core.atlas.run import compute_atlas; "
            "from headvis_core.models.loader import load_model; "
            "compute_atlas(load_model('tiny-gpt2', device='cpu').model, n_seqs=2, seq_len=16, shard_sequences=1); "
            "print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


@needs_ray
def test_cli_atlas_over_ray_equals_one_process_and_refuses_bad_inputs(cluster, corpus, tmp_path, capsys):
    base = ["atlas", "--model", "tiny-gpt2", "--corpus", str(corpus), "--n-seqs", "8", "--seq-len", "32",
            "--batch-size", "2", "--shard-seqs", "2", "--no-cache"]
    assert cli_main(base + ["--out", str(tmp_path / "one.csv")]) == 0
    assert cli_main(base + ["--out", str(tmp_path / "ray.csv"), "--ray", "auto", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 shards on 2 Ray workers" in out
    one, sharded = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "ray.csv")
    assert one.equals(sharded)
    # the default shard size makes this probe one shard: one worker starts, and says why
    at = base.index("--shard-seqs")
    one_shard = base[:at] + base[at + 2:]
    assert cli_main(one_shard + ["--out", str(tmp_path / "ray1.csv"), "--ray", "auto", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "note: 2 workers asked, 1 started: the real text is 1 shard(s)" in out
    assert "1 shards on 1 Ray workers" in out
    for bad, message in ((["--workers", "0"], "--workers"), (["--shard-seqs", "0"], "--shard-seqs"),
                         (["--stall-seconds", "0"], "--stall-seconds"),
                         (["--ray", "nowhere"], "not a Ray cluster address")):
        assert cli_main(base + ["--out", str(tmp_path / "bad.csv"), "--ray", "auto", *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "bad.csv").exists()
