"""The atlas over a corpus with its real text on 1 and 2 Ray workers, against the one-process atlas, same run.

Each configuration runs in its own child process (so its peak memory is its own):

* ``single-1t`` / ``single-2t``: :func:`compute_atlas` in one process with 1 / 2 torch threads (its own
  loop over the shards, timed from its "real text" progress reports);
* ``ray-1`` / ``ray-2``: the same with ``text_shards=RayTextShards(loaded, workers)``, 1 CPU (1 thread) per
  worker, on a local cluster started by the run.

All four use the same shard plan, so the columns of the real text must be equal bit for bit (checked
here). What the driver computes itself (induction probe, retrieval, copying scores) may differ in its
last bits between one and two driver threads (single-2t: retrieval did), as any torch computation may.

Ray's overhead is ``ray-1``'s real-text time (shards sent, run and merged; workers already started) over
``single-1t``'s (the same shards on one thread); worker start (process, imports, model load) is printed
apart, and the atlas's total time (probe, text, induction, retrieval, copying scores, examples) too.
``interleaved`` runs each shard here and on one worker in turn, so both see the same load from anything
else on the machine: the cost of moving a shard's work onto a worker, apart from a shared machine's noise.

    .venv/bin/python bench/atlas_ray.py [--n-seqs 16] [--seq-len 64] [--shard-seqs 4] [--batch 4] [--repeats 2]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "gutenberg"


class RealTextClock:
    """A progress callback that times the one-process atlas's real text from its own reports: from the
    first "real text" report (just before the first shard) to the first report after the last one."""

    def __init__(self):
        self.started = self.ended = None

    def __call__(self, fraction, message):
        if message.startswith("real text"):
            self.started = self.started or time.perf_counter()
        elif self.started is not None and self.ended is None:
            self.ended = time.perf_counter()

    def stats(self) -> dict:
        return {"text_seconds": self.ended - self.started, "worker_start_seconds": 0.0,
                "merge_seconds_per_shard": 0.0}


class WorkerMemory:
    """The largest summed resident memory of the Ray shard workers, sampled every 0.1 s in a thread."""

    def __init__(self):
        self.peak_mb, self.stop = 0.0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self):
        while not self.stop.is_set():
            total = 0
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                if "ray::AtlasShardWorker" in " ".join(proc.info["cmdline"] or []) and proc.info["memory_info"]:
                    total += proc.info["memory_info"].rss
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self.stop.wait(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def child(mode: str, workers: int, threads: int, args: argparse.Namespace) -> dict:
    """One configuration, in this (child) process: times, the table and peak memory as a dict."""
    import torch

    torch.set_num_threads(threads)
    from headvis_core.atlas.distributed import RayTextShards
    from headvis_core.atlas.run import compute_atlas
    from headvis_core.models.loader import load_model

    loaded = load_model(args.model, device="cpu")
    best: dict = {}
    workers_peak = 0.0
    for _ in range(args.repeats):  # the fastest of the repeats: the cores are shared with other work
        # the real paths: compute_atlas's own one-process loop (timed by its progress reports), or Ray
        runner = None if mode == "single" else RayTextShards(loaded, workers=workers)
        clock = RealTextClock()
        started = time.perf_counter()
        with WorkerMemory() as memory:
            result = compute_atlas(loaded.model, folder=args.corpus, n_seqs=args.n_seqs, seq_len=args.seq_len,
                                   batch_size=args.batch, shard_sequences=args.shard_seqs, text_shards=runner,
                                   model_name=args.model, progress=clock)
        workers_peak = max(workers_peak, memory.peak_mb)
        stats = clock.stats() if runner is None else runner.stats
        timings = {"wall": time.perf_counter() - started, **stats}
        best = {key: min(value, best.get(key, value)) for key, value in timings.items()}
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as handle:
        table_path = handle.name
    result.table.to_pickle(table_path)  # exact floats, for the comparison across runs
    return {"mode": mode, "workers": workers, "threads": threads, **best, "table": table_path,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "workers_peak_mb": workers_peak}


def interleaved(args: argparse.Namespace) -> dict:
    """Each shard run here and on one Ray worker in turn (1 thread each): the cost of a shard on a worker,
    sending its batches and returning its partial sums included, with the machine's load shared alike."""
    import torch

    torch.set_num_threads(1)
    from headvis_core.atlas.distributed import AtlasShardWorker
    from headvis_core.atlas.metrics import MetricSums, plan_text_shards, text_shard_partial
    from headvis_core.atlas.run import folder_probe_set
    from headvis_core.models.loader import load_model
    from headvis_core.ray_jobs import worker_pool

    loaded = load_model(args.model, device="cpu")
    probe = folder_probe_set(loaded.model, args.corpus, n_seqs=args.n_seqs, seq_len=args.seq_len)
    plan = plan_text_shards(probe.sequences, args.batch, args.shard_seqs)
    sums = MetricSums(loaded.model, plan.seen_ids)
    here = ray = 0.0
    with worker_pool(AtlasShardWorker, loaded, 1, args=(plan.seen_ids, True)) as pool:
        import ray as ray_module

        for _ in range(args.repeats):
            for index in range(plan.n_shards):
                started = time.perf_counter()
                text_shard_partial(loaded.model, sums, plan.shard_batches(index))
                here += time.perf_counter() - started
                started = time.perf_counter()
                ray_module.get(pool.actors[0].text_shard.remote(index, plan.shard_batches(index)))
                ray += time.perf_counter() - started
    return {"here": here, "ray": ray, "shard_runs": args.repeats * plan.n_shards}


def differing_columns(paths: dict[str, str], reference: str) -> dict[str, list[str]]:
    """Per run, the table columns that are not bit for bit those of the ``reference`` run (NaN where NaN)."""
    import pandas as pd

    tables = {label: pd.read_pickle(path) for label, path in paths.items()}
    return {label: [column for column in table.columns if not table[column].equals(tables[reference][column])]
            for label, table in tables.items() if label != reference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--n-seqs", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--shard-seqs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="atlases per run; the fastest counts")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "WORKERS", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, workers, threads = args.child
        result = interleaved(args) if mode == "interleaved" else child(mode, int(workers), int(threads), args)
        print(json.dumps(result))
        return
    if not args.corpus.is_dir():
        sys.exit(f"{args.corpus} is not here (../shared/corpus); give --corpus")
    base = [sys.executable, __file__, "--model", args.model, "--corpus", str(args.corpus), "--n-seqs",
            str(args.n_seqs), "--seq-len", str(args.seq_len), "--shard-seqs", str(args.shard_seqs), "--batch",
            str(args.batch), "--repeats", str(args.repeats)]
    runs = {}
    for label, child_args in (("single-1t", ["single", "0", "1"]), ("ray-1", ["ray", "1", "1"]),
                              ("single-2t", ["single", "0", "2"]), ("ray-2", ["ray", "2", "1"]),
                              ("interleaved", ["interleaved", "1", "1"])):
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "disabled"}
        out = subprocess.run(base + ["--child", *child_args], capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"{label} failed:\n{out.stderr[-3000:]}")
        runs[label] = json.loads(out.stdout.strip().splitlines()[-1])
    turns = runs.pop("interleaved")
    differing = differing_columns({label: run["table"] for label, run in runs.items()}, "single-1t")
    same = not any(differing.values())
    driver_side = {"induction", "retrieval", "copying", "behaviour", "confidence", "behaviours"}
    text_same = not any(set(columns) - driver_side for columns in differing.values())
    for run in runs.values():
        os.unlink(run["table"])
    tokens = args.n_seqs * args.seq_len
    print(f"{args.model}: atlas over {args.corpus.name}, {args.n_seqs} x {args.seq_len} tokens, "
          f"shards of {args.shard_seqs} sequences ({runs['ray-1']['shards']} shards), batch {args.batch}, "
          f"{os.cpu_count()} cores")
    print(f"{'run':<10} {'text s':>7} {'tokens/s':>9} {'worker start s':>15} {'merge/shard s':>14} "
          f"{'atlas s':>8} {'driver MiB':>11} {'workers MiB':>12}")
    for label, run in runs.items():
        print(f"{label:<10} {run['text_seconds']:>7.2f} {tokens / run['text_seconds']:>9.0f} "
              f"{run['worker_start_seconds']:>15.1f} {run['merge_seconds_per_shard']:>14.4f} {run['wall']:>8.1f} "
              f"{run['peak_rss_mb']:>11.0f} {run['workers_peak_mb']:>12.0f}")
    print("driver MiB: the driver's peak RSS (workers excluded); workers MiB: the Ray shard workers' summed RSS, "
          "largest sample (0.1 s)")
    overhead = runs["ray-1"]["text_seconds"] / runs["single-1t"]["text_seconds"] - 1
    speedup = runs["single-2t"]["text_seconds"] / runs["ray-2"]["text_seconds"]
    print(f"Ray overhead on the real text, 1 worker vs one process on 1 thread: {100 * overhead:+.1f}% "
          f"(goal: at most +10%: {'met' if overhead <= 0.10 else 'NOT met'})")
    print(f"2 Ray workers vs one process on 2 threads (real text): {speedup:.2f}x")
    shard_overhead = turns["ray"] / turns["here"] - 1
    print(f"a shard on a Ray worker vs here, {turns['shard_runs']} shard runs in turn: {turns['ray']:.2f} s vs "
          f"{turns['here']:.2f} s ({100 * shard_overhead:+.1f}%)")
    print(f"real-text columns equal bit for bit across the four runs: {text_same}; whole tables: {same}")
    for label, columns in differing.items():
        if columns:
            print(f"  {label} differs from single-1t in: {', '.join(columns)}")
    print(json.dumps({"overhead": round(overhead, 4), "goal_met": overhead <= 0.10,
                      "shard_overhead": round(shard_overhead, 4),
                      "speedup_2": round(speedup, 3),
                      "text_columns_equal": text_same, "tables_equal": same,
                      "text_s": {label: round(run["text_seconds"], 2) for label, run in runs.items()}}))


if __name__ == "__main__":
    main()
