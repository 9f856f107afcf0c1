"""Benchmark: each IOI tour step's first-visit time on SmolLM2-135M, and the atlas work steps 2 and 4 no
longer do, measured in the same run.

Steps run in order with the result store off (``run_step(..., use_store=False)``), each after the one before
(so the model is warm for all but step 1). Steps 2 and 4 used to read their head scores from the whole head
atlas (``compute_atlas``, 16 built-in prompts of 64 tokens, through the store, so step 2 paid for it);
now step 2 computes only the OV copying score (``copying_scores``) and step 4 only the induction and
duplicate-token scores of the layers below its receivers (``atlas_role_metrics``), both exactly the
atlas's values. The previous way's step time is this run's step time minus the new part plus the whole
atlas, both timed here.

    .venv/bin/python bench/tours.py [--model smollm2-135m]
"""

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

from headvis_core.atlas.copying import copying_scores
from headvis_core.atlas.run import compute_atlas
from headvis_core.heads import HeadRef
from headvis_core.models.loader import load_model
from headvis_core.tours.base import run_step
from headvis_core.tours.catalog import TOURS
from headvis_core.tours.ioi import atlas_role_metrics


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    model = load_model(args.model).model
    tour = TOURS["ioi"]
    found: dict = {}
    seconds = []
    for index, step in enumerate(tour.steps):
        result, took = timed(run_step, model, tour, index, found, model_name=args.model, use_store=False)
        found.update(result.found)
        seconds.append(took)
        print(f"step {index + 1} ({step.key}): {took:.1f} s", flush=True)
    settings = tour.steps[3].settings
    receivers = found.get("s_inhibition", []) or found.get("name_movers", []) + found.get("direct_heads", [])
    top_layer = max(HeadRef.from_label(h).layer for h in receivers)
    _, atlas_s = timed(compute_atlas, model, n_seqs=settings["atlas_seqs"], seq_len=settings["atlas_len"])
    _, copying_s = timed(copying_scores, model)
    _, roles_s = timed(atlas_role_metrics, model, settings["atlas_seqs"], settings["atlas_len"], top_layer)
    print(f"whole atlas {atlas_s:.1f} s; copying score alone {copying_s:.1f} s; induction and duplicate-token "
          f"scores of layers < {top_layer} alone {roles_s:.1f} s")
    # First visit the previous way: step 2 built the atlas (stored), step 4 read it from the store.
    before = {2: seconds[1] - copying_s + atlas_s, 4: seconds[3] - roles_s}
    for number, old in before.items():
        print(f"step {number}: {seconds[number - 1]:.1f} s now, {old:.1f} s the previous way "
              f"({old / seconds[number - 1]:.1f}x)")
    print(f"steps 2 and 4 together: {seconds[1] + seconds[3]:.1f} s now, {sum(before.values()):.1f} s before "
          f"({sum(before.values()) / (seconds[1] + seconds[3]):.1f}x); slowest step now {max(seconds):.1f} s")


if __name__ == "__main__":
    main()
