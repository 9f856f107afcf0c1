"""Benchmark: a 1000-year prompt sweep on SmolLM2, batched against one prompt at a time.

The year-range preset (``The war lasted from the year {year} to the year``,
year = 1000..1999) with three heads and the model's top prediction for every
value. The batched sweep (equal-length prompts stacked, the shared start of the
prompts run once and its KV cache reused, only the needed ``hook_pattern``
layers captured, logits for the last position only) is timed against the naive
loop (one full forward pass per prompt) in the same run, and the largest
difference between their numbers is printed. The batched sweep without the
shared prefix and the attention-only sweep (the pass stops after the last
head's layer) are timed too.

    .venv/bin/python bench/sweep.py [--values 1000] [--loop-values 1000]

``--loop-values N`` times the loop on the first N values and scales its time
to all values (default 100, to stay within a few minutes on two busy cores);
``--loop-values 1000`` loops over every value.

OpenMP threads that spin while waiting make a one-prompt pass many times
slower on a machine whose cores are busy with other work (measured: 4.9 s
instead of 0.4 s per SmolLM2 pass), which would flatter the batched sweep; so
this script asks for passive waiting unless OMP_WAIT_POLICY is already set.
"""

import argparse
import os
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import numpy as np
import torch

from headvis_core.heads import parse_heads
from headvis_core.models.loader import load_model
from headvis_core.sweeps.plan import SweepSpec, build_plan
from headvis_core.sweeps.presets import preset
from headvis_core.sweeps.run import run_sweep, run_sweep_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--values", type=int, default=1000, help="years from 1000 on")
    parser.add_argument("--loop-values", type=int, default=100, help="loop over this many values (time scaled)")
    parser.add_argument("--heads", default="2.3,2.8,4.4")
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu")
    model, info = loaded.model, loaded.info
    year_preset = preset("year_range")
    spec = SweepSpec(template=year_preset.spec.template, slots=(f"year=1000..{999 + args.values}",),
                     query=year_preset.spec.query, key=year_preset.spec.key)
    heads = parse_heads(args.heads, info.n_layers, info.n_heads)
    print(f"model {info.name} on cpu, torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; template {spec.template!r}; "
          f"{args.values} years; heads {', '.join(map(str, heads))}")

    started = time.perf_counter()
    plan = build_plan(model, spec)
    plan_seconds = time.perf_counter() - started
    print(f"plan (expand + tokenize + resolve positions): {plan_seconds:.2f} s for {plan.n_values} prompts of "
          f"{plan.majority_length} tokens")

    run_sweep(model, build_plan(model, SweepSpec(spec.template, ("year=1000..1015",), spec.query, spec.key)), heads)
    started = time.perf_counter()
    batched = run_sweep(model, plan, heads)
    batched_seconds = time.perf_counter() - started

    started = time.perf_counter()
    unshared = run_sweep(model, plan, heads, share_prefix=False)
    unshared_seconds = time.perf_counter() - started

    started = time.perf_counter()
    attention_only = run_sweep(model, plan, heads, predictions=False)
    attention_seconds = time.perf_counter() - started

    n_loop = min(args.loop_values or plan.n_values, plan.n_values)
    loop_plan = plan if n_loop == plan.n_values else build_plan(
        model, SweepSpec(spec.template, (f"year=1000..{999 + n_loop}",), spec.query, spec.key))
    started = time.perf_counter()
    loop = run_sweep_loop(model, loop_plan, heads)
    loop_measured = time.perf_counter() - started
    loop_seconds = loop_measured * plan.n_values / n_loop

    diffs = {}
    for column in loop.curves:
        diffs[column] = float(np.max(np.abs(batched.table[column].to_numpy()[:n_loop] - loop.table[column].to_numpy())))
    unshared_diff = max(float(np.max(np.abs(unshared.table[c].to_numpy()[:n_loop] - loop.table[c].to_numpy())))
                        for c in loop.curves)
    attention_diff = max(float(np.max(np.abs(attention_only.table[c].to_numpy()[:n_loop] - loop.table[c].to_numpy())))
                         for c in loop.curves if c.startswith("attn "))
    same_top = bool((batched.table["top_token"].to_numpy()[:n_loop] == loop.table["top_token"].to_numpy()).all())

    scaled = "" if n_loop == plan.n_values else f" (measured {loop_measured:.1f} s on {n_loop} values, scaled)"
    print(f"loop, one prompt at a time (full pass):  {loop_seconds:8.2f} s{scaled}")
    print(f"batched sweep (answers + attention):     {batched_seconds:8.2f} s   {loop_seconds / batched_seconds:6.1f}x")
    print(f"  the same without the shared prefix:    {unshared_seconds:8.2f} s   "
          f"{loop_seconds / unshared_seconds:6.1f}x")
    print(f"batched, attention only (stops early):   {attention_seconds:8.2f} s   "
          f"{loop_seconds / attention_seconds:6.1f}x")
    print("max abs diff batched vs loop: " + ", ".join(f"{c} {d:.2e}" for c, d in diffs.items())
          + f"; without shared prefix {unshared_diff:.2e}; attention-only {attention_diff:.2e}; "
          f"same top token: {same_top}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
