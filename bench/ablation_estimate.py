"""Benchmark: attribution patching (the estimate) against the exact ablation of every head, same run.

On SmolLM2-135M (30 layers x 9 query heads = 270 heads), for 1 and 16 IOI prompts
(``ioi_prompts``, seed 0), zero ablation at ``hook_z`` unless ``--kind`` says otherwise:

- the estimate (``headvis_core.ablation.estimate.estimate_heads``) of the logit-difference
  drop (first order: one forward and one backward pass) and of the KL (second order over the
  ``--fisher-tokens`` most likely tokens: one forward, that many backward passes);
- the exact ranking (``rank_heads_by_ablation``, the batched replay engine) of all 270 heads, which gives
  both metrics in one run;
- agreement over all heads: Spearman correlation and the overlap of the top 10;
- the "estimate, then refine the top N exactly" flow (``--refine``): the time of the exact
  ablation of the estimate's top N alone, and how many of the exact top 10 (over all heads)
  it contains.

    .venv/bin/python bench/ablation_estimate.py [--prompts 1 16] [--refine 30]
"""

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import numpy as np

from headvis_core.ablation.estimate import agreement, estimate_heads
from headvis_core.ablation.ranking import rank_heads_by_ablation
from headvis_core.ablation.values import make_ablation
from headvis_core.data.prompt_pairs import ioi_prompts
from headvis_core.models.loader import load_model


def matrix(ranking, column):
    n_layers, n_heads = ranking.importance.shape
    out = np.full((n_layers, n_heads), np.nan)
    for row in ranking.table.itertuples():
        out[row.layer, row.head] = getattr(row, column)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--kind", default="zero", choices=["zero", "mean"])
    parser.add_argument("--fisher-tokens", type=int, default=16)
    parser.add_argument("--refine", type=int, default=30)
    args = parser.parse_args()
    model = load_model(args.model, device="cpu").model
    print(f"model {args.model}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, {args.kind} ablation")
    for n in args.prompts:
        prompts = ioi_prompts(model, n_prompts=n, seed=0)
        if args.kind == "mean" and n < 2:
            print(f"\n[{n} prompt(s)] skipped: mean ablation needs at least two prompts")
            continue
        ablation = make_ablation(model, args.kind, prompts)
        started = time.perf_counter()
        exact = rank_heads_by_ablation(model, prompts, ablation, metric="logit_diff", top_n=0)
        exact_s = time.perf_counter() - started
        print(f"\n[{n} IOI prompt(s) of {prompts.lengths[0]} tokens]  exact ranking of all heads: {exact_s:7.1f} s "
              f"({exact.engine})")
        for metric, column in (("logit_diff", "logit_diff_drop"), ("kl", "kl")):
            started = time.perf_counter()
            estimate = estimate_heads(model, prompts, ablation, metric=metric, fisher_tokens=args.fisher_tokens)
            estimate_s = time.perf_counter() - started
            exact_matrix = matrix(exact, column)
            result = agreement(estimate.importance, exact_matrix, top_k=10)
            top_n = estimate.top_heads(args.refine)
            started = time.perf_counter()
            rank_heads_by_ablation(model, prompts, ablation, metric=metric, heads=top_n, top_n=0)
            refine_s = time.perf_counter() - started
            exact_top = set(np.argsort(-exact_matrix.ravel())[:10].tolist())
            n_heads = int(model.cfg.n_heads)
            found = len(exact_top & {h.layer * n_heads + h.head for h in top_n})
            print(f"  {metric:10s} estimate {estimate_s:6.1f} s ({estimate.passes}) = "
                  f"{exact_s / estimate_s:5.1f}x faster than exact;  Spearman {result.spearman:5.2f}, "
                  f"top-10 overlap {result.top_k_overlap}/10;  "
                  f"refining its top {args.refine} exactly: {refine_s:6.1f} s, holds {found}/10 of the exact top 10")


if __name__ == "__main__":
    main()
