"""Benchmark: the head atlas against TransformerLens ``detect_head`` and a naive full-cache loop.

For each model, on the same 64 sequences x 128 tokens of real text (windows
of ``../shared/corpus/gutenberg``, or the built-in prompts where it is
absent):

* atlas: ``run_atlas`` — every metric of every head (attention metrics and
  HeadVis's pre-softmax score metrics, token entropies and q-k distances on
  the text, the direct copying score, induction on 16 x (BOS + 2 x 63)
  repeated random tokens, OV copying from the weights, retrieval on the 24
  curated factual prompts, passport examples), batched; the detect_head and
  naive columns compute only the first ten of them, so the ratios understate
  the atlas's lead.
* detect_head: ``transformer_lens.head_detector.detect_head`` on the same
  texts, once for each of its three head types (previous-token,
  duplicate-token, induction); it runs one full ``run_with_cache`` per
  prompt and type.
* naive: ``run_with_cache`` (all hooks) on batches of 8 sequences, then a
  Python loop over layers and heads computing the same attention metrics.

Each method runs in its own process, so its peak memory (resident set size
above the loaded model, sampled every 5 ms) is its own. Prints seconds (wall
and CPU), the ratios, and peak memory against the model's parameter bytes.

    .venv/bin/python bench/atlas.py [--models smollm2-135m gpt2-small-random] [--n-seqs 64] [--seq-len 128]
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from headvis_core.atlas.run import build_probe_set, run_atlas
from headvis_core.data.probes import induction_probe
from headvis_core.models.loader import load_model

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "gutenberg"
METHODS = ("atlas", "detect_head", "naive")


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak - baseline`` is the method's own memory."""

    def __init__(self, interval: float = 0.005):
        self.process, self.interval = psutil.Process(), interval
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


def probe_for(model, n_seqs: int, seq_len: int):
    folder = CORPUS if CORPUS.is_dir() else None
    return build_probe_set(model, folder, n_seqs=n_seqs, seq_len=seq_len)


def naive_metrics(model, sequences, induction, chunk: int = 8):
    """Full run_with_cache per batch, then per-layer, per-head loops (the way a notebook would do it)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = ("previous_token", "duplicate_token", "attention_sink", "self_attention", "entropy", "mean_distance",
             "max_attention_no_bos", "local_attention", "induction")
    sums = {name: torch.zeros(n_layers, n_heads, dtype=torch.float64) for name in names}
    counts = dict.fromkeys(names, 0.0)
    tokens = torch.cat(sequences)
    for start in range(0, tokens.shape[0], chunk):
        batch = tokens[start:start + chunk]
        b, n = batch.shape
        with torch.no_grad():
            _, cache = model.run_with_cache(batch)
        q = torch.arange(n)
        distance = (q[:, None] - q[None, :]).clamp(min=0).float()
        local = ((q[:, None] - q[None, :] >= 0) & (q[:, None] - q[None, :] < 4) & (q[None, :] >= 1)).float()
        same = ((batch[:, :, None] == batch[:, None, :]) & (q[:, None] > q[None, :])).float()
        for layer in range(n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
            for head in range(n_heads):
                A = pattern[:, head].float()
                rows = A[:, 1:]
                sums["previous_token"][layer, head] += A.diagonal(-1, -2, -1).sum().item()
                sums["self_attention"][layer, head] += A.diagonal(0, -2, -1)[:, 1:].sum().item()
                sums["attention_sink"][layer, head] += rows[..., 0].sum().item()
                entropy = -torch.special.xlogy(rows, rows).sum(-1) / torch.log(q[1:].float() + 1)
                sums["entropy"][layer, head] += entropy.sum().item()
                sums["mean_distance"][layer, head] += (rows * distance[1:]).sum().item()
                sums["max_attention_no_bos"][layer, head] += rows[..., 1:].amax(-1).sum().item()
                sums["local_attention"][layer, head] += (rows * local[1:]).sum().item()
                sums["duplicate_token"][layer, head] += (A * same).sum().item()
        del cache
        for name in names[:-1]:
            counts[name] += float((same.sum(-1) > 0).sum()) if name == "duplicate_token" else b * (n - 1)
    L, p = induction.half_len, induction.prefix_len
    for start in range(0, induction.tokens.shape[0], chunk):
        batch = induction.tokens[start:start + chunk]
        with torch.no_grad():
            _, cache = model.run_with_cache(batch)
        for layer in range(n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
            for head in range(n_heads):
                stripe = pattern[:, head].diagonal(-(L - 1), -2, -1)[:, p + 1:]
                sums["induction"][layer, head] += stripe.sum().item()
        counts["induction"] += batch.shape[0] * L
        del cache
    return {name: (sums[name] / max(counts[name], 1)).numpy() for name in names}


def worker(method: str, model_name: str, n_seqs: int, seq_len: int, n_induction: int, threads: int) -> dict:
    if threads:
        torch.set_num_threads(threads)

    loaded = load_model(model_name, device="cpu")
    model = loaded.model
    probe = probe_for(model, n_seqs, seq_len)
    n_params = sum(p.numel() for p in model.original_model.parameters())
    model_bytes = n_params * model.W_E.element_size()
    # warm up kernels and lazy initialisation outside the measurement
    with torch.no_grad():
        model(probe.sequences[0][:, :16])
    out = {"method": method, "model": model_name, "model_bytes": model_bytes, "probe": probe.describe()}
    with PeakRSS() as memory:
        started, cpu_started = time.perf_counter(), time.process_time()
        if method == "atlas":
            result = run_atlas(model, probe, n_induction_seqs=n_induction, batch_size=16, model_name=model_name)
            table = result.table
            out["top"] = {metric: [[int(r.layer), int(r["head"]), round(float(r[metric]), 4)]
                                   for _, r in table.nlargest(5, metric).iterrows()]
                          for metric in ("induction", "previous_token", "duplicate_token", "copying")}
        elif method == "detect_head":
            from transformer_lens.head_detector import HEAD_NAMES, detect_head

            texts = [model.tokenizer.decode(seq[0, 1:]) for seq in probe.sequences]
            scores = {name: detect_head(model, texts, name) for name in HEAD_NAMES}
            out["top"] = {name: [[int(i // s.shape[1]), int(i % s.shape[1]), round(float(s.flatten()[i]), 4)]
                                 for i in s.flatten().argsort(descending=True)[:5]] for name, s in scores.items()}
        elif method == "naive":
            bos = 1 if model.tokenizer.bos_token_id is not None else 0
            half = max(2, (probe.seq_len - bos) // 2)
            equal = [s for s in probe.sequences if s.shape[1] == probe.seq_len]
            values = naive_metrics(model, equal, induction_probe(model, n_induction, half, seed=0))
            out["top"] = {name: [[int(i // v.shape[1]), int(i % v.shape[1]), round(float(v.flat[i]), 4)]
                                 for i in np.argsort(-v.ravel())[:5]]
                          for name, v in values.items() if name in ("induction", "previous_token")}
        out["seconds"] = time.perf_counter() - started
        out["cpu_seconds"] = time.process_time() - cpu_started
    out["peak_bytes"] = memory.delta
    return out


def run_worker(method: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--models", args.models[0],
               "--n-seqs", str(args.n_seqs), "--seq-len", str(args.seq_len), "--n-induction", str(args.n_induction),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{method} on {args.models[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gpt2-small-random"])
    parser.add_argument("--n-seqs", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--n-induction", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every method (0: torch's default). On a shared, oversubscribed "
                             "machine 1 avoids OpenMP spin-waiting")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.models[0], args.n_seqs, args.seq_len, args.n_induction,
                                args.threads)))
        return

    print(f"torch threads: {args.threads or torch.get_num_threads()}; cpu count: {os.cpu_count()}; "
          f"load average at start: {os.getloadavg()[0]:.1f}")
    for model_name in args.models:
        sub = argparse.Namespace(**{**vars(args), "models": [model_name]})
        results = {method: run_worker(method, sub) for method in args.methods}
        first = next(iter(results.values()))
        print(f"\n== {model_name}: {first['probe']}; model parameters {first['model_bytes'] / 2**20:.0f} MiB")
        for method, r in results.items():
            print(f"{method:>12}: {r['seconds']:8.1f} s wall, {r['cpu_seconds']:8.1f} s CPU, peak memory "
                  f"+{r['peak_bytes'] / 2**20:7.0f} MiB = {r['peak_bytes'] / r['model_bytes']:.2f} x model size")
        if "atlas" in results:
            atlas = results["atlas"]
            for method in ("detect_head", "naive"):
                if method in results:
                    r = results[method]
                    print(f"  atlas is {r['seconds'] / atlas['seconds']:.1f}x faster than {method} (wall), "
                          f"{r['cpu_seconds'] / atlas['cpu_seconds']:.1f}x (CPU)")
            for metric, heads in atlas["top"].items():
                print(f"  top {metric}: " + ", ".join(f"{l}.{h} ({v:.3f})" for l, h, v in heads))
        for method in ("detect_head", "naive"):
            for name, heads in results.get(method, {}).get("top", {}).items():
                print(f"  {method} {name}: " + ", ".join(f"{l}.{h} ({v:.3f})" for l, h, v in heads))


if __name__ == "__main__":
    main()
