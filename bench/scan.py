"""Benchmark: dataset-scan throughput against a plain forward pass, and scan memory at two corpus sizes.

Throughput: SmolLM2 on the first ``--windows`` windows of ``../shared/corpus``
(gutenberg). Timed in the same run on the same tokenized batches: the plain
forward pass (``hooks.forward``, logits included) and the scan's per-batch
work (``scan_batch``: the hooked pass, which stops at the last layer's
pattern, so no last MLP, final norm or unembedding, every layer's pattern
reduced in its hook, merging into the state); and the scan end to end (``run_scan``:
tokenizing, the fixed-size state, the final bucketing and the atomic write).
They alternate ``--repeats`` times and the fastest of each is kept, since the
cores are shared.

Memory: two child processes scan ``--memory-windows`` and ten times as many
windows. Each resets its peak resident set (``/proc/self/clear_refs``) after
loading the model, so the figure is the scan's own peak (model included, load
transient excluded), and prints the scan state's fixed size.

    .venv/bin/python bench/scan.py [--windows 32] [--window-len 64] [--memory-windows 8]

Defaults fit about five minutes on two busy cores: 32 x 64 tokens for
throughput, 8 and 80 windows of 32 tokens for memory. OpenMP threads that
spin while waiting are much slower on busy cores, so passive waiting is
asked for unless OMP_WAIT_POLICY is already set.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import torch

from headvis_core.data.corpus import iter_window_batches, open_corpus
from headvis_core.hooks import forward
from headvis_core.models.loader import load_model
from headvis_core.scan import ScanParams, run_scan
from headvis_core.scan.run import new_state, scan_batch

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "gutenberg"


def rss_peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def rss_now_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_batches(loaded, corpus, params, batch_size: int) -> list[tuple[torch.Tensor, object]]:
    """The scan's batches ``[batch, 1 + window_len]`` (BOS first) and their window indices, tokenized once."""
    model = loaded.model
    bos = model.tokenizer.bos_token_id
    batches = []
    for batch in iter_window_batches(corpus, model.tokenizer, params.window_len, batch_size, params.max_windows):
        seq = torch.from_numpy(batch.tokens)
        batches.append((torch.cat([torch.full((seq.shape[0], 1), bos, dtype=seq.dtype), seq], dim=1), batch.indices))
    return batches


def forward_only(loaded, batches) -> float:
    started, cpu = time.perf_counter(), time.process_time()
    for seq, _ in batches:
        forward(loaded.model, seq)
    return time.perf_counter() - started, time.process_time() - cpu


def scan_batches_only(loaded, batches, params) -> float:
    """The scan's per-batch work alone (hooked pass, reductions, merging) on the same tensors as forward_only."""
    state = new_state(loaded, params)
    started, cpu = time.perf_counter(), time.process_time()
    for seq, indices in batches:
        scan_batch(loaded.model, state, seq, indices)
    return time.perf_counter() - started, time.process_time() - cpu


def scan_once(loaded, corpus, params, batch_size: int) -> tuple[tuple[float, float], object]:
    with tempfile.TemporaryDirectory() as out:
        started, cpu = time.perf_counter(), time.process_time()
        result = run_scan(loaded, corpus, params, out_dir=Path(out), batch_size=batch_size, checkpoint_seconds=1e9)
        return (time.perf_counter() - started, time.process_time() - cpu), result


def memory_child(windows: int, window_len: int, batch_size: int) -> None:
    loaded = load_model("smollm2-135m", device="cpu")
    corpus = open_corpus(str(CORPUS))
    params = ScanParams(window_len=window_len, max_windows=windows)
    baseline = rss_now_kib()
    reset = reset_peak()
    seconds, result = scan_once(loaded, corpus, params, batch_size)
    print(json.dumps({"windows": result.n_windows, "seconds": seconds[0], "peak_mib": rss_peak_kib() / 1024,
                      "baseline_mib": baseline / 1024, "peak_reset": reset,
                      "state_mib": result.meta["state_bytes"] / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32, help="windows for the throughput comparison")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--window-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--memory-windows", type=int, default=8, help="small corpus size; the large is 10x")
    parser.add_argument("--memory-window-len", type=int, default=32)
    parser.add_argument("--skip-memory", action="store_true", help="throughput only")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.memory_window_len, args.batch_size)
        return
    if not CORPUS.is_dir():
        sys.exit(f"{CORPUS} is not here")


    print(f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    loaded = load_model("smollm2-135m", device="cpu")
    corpus = open_corpus(str(CORPUS))
    params = ScanParams(window_len=args.window_len, max_windows=args.windows)
    n_tokens = args.windows * (args.window_len + 1)
    batches = window_batches(loaded, corpus, params, args.batch_size)
    forward_only(loaded, batches[:1])  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"forward": [], "batches": [], "scan": []}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits all three alike
        times["forward"].append(forward_only(loaded, batches))
        times["batches"].append(scan_batches_only(loaded, batches, params))
        times["scan"].append(scan_once(loaded, corpus, params, args.batch_size)[0])
    print(f"\nthroughput on {args.windows} windows x {args.window_len} tokens (+BOS), batch {args.batch_size}, "
          f"SmolLM2 on CPU, best of {args.repeats}; wall clock and this process's CPU time (which other "
          "processes on busy cores disturb less)")
    best = {}
    for label, name in [("forward only (logits)", "forward"), ("scan, batches only", "batches"),
                        ("scan, end to end", "scan")]:
        wall, cpu = min(t[0] for t in times[name]), min(t[1] for t in times[name])
        best[name] = (wall, cpu)
        runs = ", ".join(f"{t[0]:.2f}" for t in times[name])
        print(f"  {label:<22}: wall {wall:6.2f} s {n_tokens / wall:6.0f} tokens/s | CPU {cpu:6.2f} s "
              f"{n_tokens / cpu:6.0f} tokens/CPU-s   (wall runs: {runs})")
    for i, kind in enumerate(["wall", "CPU"]):
        print(f"  scan / forward throughput ({kind}): {best['forward'][i] / best['batches'][i]:.2f} per batch, "
              f"{best['forward'][i] / best['scan'][i]:.2f} end to end (goal >= 1.0 per batch)")
    print("  (end to end adds tokenizing, the fixed-size state, the final bucketing and the atomic write)")
    del loaded
    if args.skip_memory:
        return

    print(f"\npeak memory, windows of {args.memory_window_len} tokens, batch {args.batch_size} (child processes):")
    rows = []
    for windows in (args.memory_windows, 10 * args.memory_windows):
        run = subprocess.run([sys.executable, __file__, "--memory-child", str(windows), "--memory-window-len",
                              str(args.memory_window_len), "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, cwd=ROOT)
        if run.returncode != 0:
            sys.exit(run.stderr[-2000:])
        row = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {row['windows']:5d} windows: peak RSS {row['peak_mib']:7.0f} MiB (after model load "
              f"{row['baseline_mib']:.0f} MiB; scan state {row['state_mib']:.0f} MiB; {row['seconds']:.1f} s)"
              + ("" if row["peak_reset"] else "  [peak not reset: includes the model load]"))
    small, large = rows
    print(f"  peak ratio 10x corpus / 1x: {large['peak_mib'] / small['peak_mib']:.3f}  (goal within 1.2); "
          f"growth above the loaded model: {small['peak_mib'] - small['baseline_mib']:.0f} -> "
          f"{large['peak_mib'] - large['baseline_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
