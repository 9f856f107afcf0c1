"""Sharded scans over Ray against the one-process scan, in the same run; state sizes; a cost model.

Each configuration runs in its own child process (so its peak memory is its own):

* ``single-1t`` / ``single-2t``: :func:`run_scan` with 1 / 2 torch threads;
* ``ray-1`` / ``ray-2``: :func:`run_sharded_scan` with 1 / 2 Ray workers of 1 CPU (1 thread) each, on a
  local cluster started by the run.

Ray's overhead is ``ray-1``'s scanning time (workers started, model loaded) over ``single-1t``'s:
the same windows on one thread, from the first batch to the last merge, the result not yet written.
Worker start (process, imports, model load) is printed apart.
The scan state's size is computed from the state's own arrays for SmolLM2, Gemma 3 270M
(262k vocabulary) and Gemma 3 27B, with the per-vocabulary float64 sums it replaced ("before").

    .venv/bin/python bench/scan_ray.py [--windows 48] [--window 32] [--shard 16]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "gutenberg"
# (name, layers, heads, vocabulary): SmolLM2-135M, Gemma 3 270M, Gemma 3 27B
MODELS = [("SmolLM2-135M", 30, 9, 49152), ("Gemma 3 270M", 18, 4, 262144), ("Gemma 3 27B", 62, 32, 262144)]


def child(mode: str, workers: int, threads: int, args: argparse.Namespace) -> dict:
    """One configuration, in this (child) process: times, windows and peak memory as a dict."""
    import torch

    torch.set_num_threads(threads)
    from headvis_core.data.corpus import open_corpus
    from headvis_core.models.loader import load_model
    from headvis_core.scan import ScanParams, run_scan
    from headvis_core.scan.distributed import run_sharded_scan

    loaded = load_model(args.model, device="cpu")
    corpus = open_corpus(str(args.corpus))
    params = ScanParams(window_len=args.window, max_windows=args.windows, shard_windows=args.shard)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        if mode == "single":
            result = run_scan(loaded, corpus, params, out_dir=Path(out), batch_size=args.batch, force=True)
        else:
            result = run_sharded_scan(loaded, corpus, params, workers=workers, out_dir=Path(out),
                                      batch_size=args.batch, force=True, checkpoint_seconds=1e9)
        wall = time.perf_counter() - started
        shard_bytes = 0
        if mode == "single":
            from headvis_core.scan.shards import scan_shard
            from headvis_core.scan.store import pack_arrays

            part = scan_shard(loaded, corpus, params, 0, args.batch)
            started_merge = time.perf_counter()
            shard_bytes = len(pack_arrays(part.to_arrays(), {}))
            pack_seconds = time.perf_counter() - started_merge
        else:
            pack_seconds = 0.0
    return {"mode": mode, "workers": workers, "threads": threads, "wall": wall, "windows": result.n_windows,
            # scanning only, both ways: from the first batch to the last merge (no model or worker start, no
            # result written)
            "scan_seconds": result.meta["sharded_scan_seconds" if mode == "ray" else "seconds"],
            "worker_start": result.meta.get("worker_start_seconds", 0.0),
            "merge_per_shard": result.meta.get("merge_seconds_per_shard", 0.0), "shard_bytes": shard_bytes,
            "pack_seconds": pack_seconds, "state_bytes": result.meta["state_bytes"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def state_sizes() -> list[tuple[str, float, float]]:
    """(model, MiB before, MiB after) of the scan state with default parameters and 64-token windows."""
    from headvis_core.scan import ScanParams
    from headvis_core.scan.state import ScanState

    rows = []
    for name, layers, heads, vocab in MODELS:
        state = ScanState(layers, heads, 65, vocab, ScanParams())
        after = state.nbytes()
        summaries = state.tokens.nbytes() + state.shard_tokens.nbytes(with_buffer=True)
        before = after - summaries + 2 * layers * heads * vocab * 8  # paid and received, float64 per vocabulary
        rows.append((name, before / 2**20, after / 2**20))
        del state
    return rows


def flush_seconds(rows: int, capacity: int = 1024) -> float:
    """Seconds of one token-summary fold of a full buffer (2 x capacity new tokens) on this CPU, 1 thread."""
    import torch

    from headvis_core.scan.heavy_hitters import HeavyHitters

    torch.set_num_threads(1)
    summary = HeavyHitters.empty(rows, capacity)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(3):
        ids = torch.arange(2 * capacity) + step * capacity  # half new, half already counted
        summary.add(ids, torch.rand(rows, len(ids), generator=generator))
        started = time.perf_counter()
        summary.flush()
        times.append(time.perf_counter() - started)
    return min(times[1:])


def cost_model(per_worker: float, merge_s_per_mib: float, driver_mib: float) -> None:
    """100M tokens of Gemma 3 27B on 8 GPUs x 4 nodes, from this run's measurements and stated assumptions."""
    from headvis_core.scan import ScanParams
    from headvis_core.scan.state import ScanState

    tokens, workers, window = 100e6, 32, 64
    gpu_rate = 0.4 * 989e12 / (2 * 27e9)  # H100 bf16 dense at 40% utilisation, 2 x params FLOPs per token
    state = ScanState(62, 32, window + 1, 262144, ScanParams(window_len=window))
    partial_mib = (state.nbytes() - state.shard_tokens.nbytes(with_buffer=True)) / 2**20  # full reservoir
    flush = flush_seconds(62 * 32 * 2)
    del state
    batch_tokens = 64 * window  # 64 windows per batch; about 1,500 new buffer columns per batch -> ~0.7 flush
    cpu_fold = 0.7 * flush / batch_tokens  # seconds per token when the summaries run on the worker's CPU
    print("cost model: 100M tokens, Gemma 3 27B (62 x 32 heads, 262k vocabulary), 32 workers (8 GPUs x 4 nodes)")
    print(f"  assumed GPU forward: {gpu_rate:.0f} tokens/s per GPU (H100, bf16, 40% of 989 TFLOP/s, 54 GFLOP/token)")
    print(f"  measured here: {per_worker:.0f} tokens/s per CPU worker (SmolLM2); token-summary fold "
          f"{flush:.1f} s per full buffer for 3,968 rows on 1 CPU thread; merge {merge_s_per_mib * 1e3:.1f} ms "
          f"per MiB of partial state; driver peak {driver_mib:.0f} MiB (holds the model)")
    print(f"  partial state of a 27B shard with a full reservoir: {partial_mib:.0f} MiB")
    for label, fold in (("summaries on the worker CPU (as built)", cpu_fold),
                        ("summaries on the GPU (not built; fold taken as free)", 0.0)):
        rate = 1 / (1 / gpu_rate + fold)
        compute_h = tokens / (workers * rate) / 3600
        for shard_windows in (256, 16384):
            shards = tokens / (shard_windows * window)
            driver_h = shards * partial_mib * merge_s_per_mib / 3600
            print(f"  {label}, shards of {shard_windows} windows: {rate:.0f} tokens/s per worker, compute "
                  f"{compute_h:.2f} h, driver merges {shards:.0f} x {partial_mib:.0f} MiB = {driver_h:.2f} h "
                  f"-> {max(compute_h, driver_h):.2f} h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--shard", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "WORKERS", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, workers, threads = args.child
        print(json.dumps(child(mode, int(workers), int(threads), args)))
        return
    if not args.corpus.is_dir():
        sys.exit(f"{args.corpus} is not here (../shared/corpus); give --corpus")
    base = [sys.executable, __file__, "--model", args.model, "--corpus", str(args.corpus), "--windows",
            str(args.windows), "--window", str(args.window), "--shard", str(args.shard), "--batch", str(args.batch)]
    runs = {}
    for label, child_args in (("single-1t", ["single", "0", "1"]), ("ray-1", ["ray", "1", "1"]),
                              ("single-2t", ["single", "0", "2"]), ("ray-2", ["ray", "2", "1"])):
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "disabled"}
        out = subprocess.run(base + ["--child", *child_args], capture_output=True, text=True, env=env, check=True)
        runs[label] = json.loads(out.stdout.strip().splitlines()[-1])
    tokens = runs["single-1t"]["windows"] * args.window
    print(f"{args.model}: {runs['single-1t']['windows']} windows x {args.window} tokens, shards of {args.shard}, "
          f"batch {args.batch}, {os.cpu_count()} cores")
    print(f"{'run':<10} {'scan s':>7} {'tokens/s':>9} {'worker start s':>15} {'merge/shard s':>14} "
          f"{'driver peak MiB':>16}")
    for label, run in runs.items():
        print(f"{label:<10} {run['scan_seconds']:>7.1f} {tokens / run['scan_seconds']:>9.0f} "
              f"{run['worker_start']:>15.1f} {run['merge_per_shard']:>14.3f} {run['peak_rss_mb']:>16.0f}")
    overhead = runs["ray-1"]["scan_seconds"] / runs["single-1t"]["scan_seconds"] - 1
    speedup = runs["single-2t"]["scan_seconds"] / runs["ray-2"]["scan_seconds"]
    print(f"Ray overhead, 1 worker vs one process on 1 thread: {100 * overhead:+.1f}% (goal <= 10%)")
    print(f"2 Ray workers vs one process on 2 threads: {speedup:.2f}x")
    single = runs["single-1t"]
    print(f"partial state of one shard: {single['shard_bytes'] / 2**20:.1f} MiB packed "
          f"({single['pack_seconds']:.3f} s to pack); full state {single['state_bytes'] / 2**20:.1f} MiB")
    print("scan state (64-token windows, default parameters), MiB: before (per-vocabulary sums) -> after")
    for name, before, after in state_sizes():
        print(f"  {name:<14} {before:>9.1f} -> {after:>7.1f}")
    per_worker = tokens / runs["ray-1"]["scan_seconds"]
    merge = runs["ray-2"]["merge_per_shard"]
    merge_s_per_mib = merge / max(single["shard_bytes"] / 2**20, 1e-9)
    cost_model(per_worker, merge_s_per_mib, runs["ray-2"]["peak_rss_mb"])
    print(json.dumps({"tokens_per_s_per_worker": round(per_worker, 1), "merge_seconds_per_shard": round(merge, 4),
                      "shard_mib": round(single["shard_bytes"] / 2**20, 2),
                      "driver_peak_mib": round(runs["ray-2"]["peak_rss_mb"]), "overhead": round(overhead, 4)}))


if __name__ == "__main__":
    main()
