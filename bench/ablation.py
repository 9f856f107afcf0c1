"""Benchmark: KL ranking of all 270 SmolLM2 heads, batched against one forward pass per head; targeted search.

Three measurements on SmolLM2-135M (30 layers x 9 query heads), zero ablation at ``hook_z``:

1. KL ranking on one IOI prompt: the batched runner (each head's copy starts from
   the clean residual stream at its own layer; copies of all start layers share one
   pass; logits only at the last position) against the one-forward-per-head loop
   (``run_with_hooks`` on the prompt with one head zeroed, which is also what
   ``transformer_lens.patching`` does per index); with ``--forward-engine`` also the
   batched full-forward engine (same batching, no layer skipping).
2. The same for a batch of 16 IOI prompts (one template, so one length): KL averaged
   over the prompts; the loop runs the 16 prompts as one batch per head.
3. The targeted search that makes " John" the top prediction on the IOI prompt.

The loop is timed on every ``--loop-every``-th head (covering all layers) and its time
scaled to 270 heads, to stay within a few minutes on two busy cores; ``--loop-every 1``
loops over every head. The largest difference between the batched and loop KL values
is printed. OpenMP threads that spin while waiting make small passes many times slower
on a machine whose cores are busy, which would flatter the batched runner, so this
script asks for passive waiting unless OMP_WAIT_POLICY is already set.

    .venv/bin/python bench/ablation.py [--loop-every 5] [--batch-loop-every 15]
"""

import argparse
import os
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import numpy as np
import torch

from headvis_core.ablation.ranking import rank_heads_by_ablation
from headvis_core.ablation.targeted import targeted_search
from headvis_core.data.ioi import load_templates
from headvis_core.data.prompt_pairs import ioi_prompts, prompts_from_texts
from headvis_core.heads import all_heads
from headvis_core.models.loader import load_model

IOI = "When Mary and John went to the store, John gave a drink to"


def arithmetic_share(model, n_tokens: int, n_answer: int) -> float:
    """Multiply-adds of the batched ranking as a share of the loop's (weights only, attention scores ignored).

    The loop runs all blocks and unembeds every position for each head; the
    batched runner runs blocks ``l..L-1`` for a head in layer ``l`` and
    unembeds only the answer position.
    """
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    block = sum(p.numel() for p in model.blocks[0].parameters() if p.ndim == 2)
    unembed = int(model.cfg.d_model) * int(model.cfg.d_vocab)
    loop = n_layers * n_heads * n_tokens * (n_layers * block + unembed)
    batched = sum(n_heads * (n_tokens * (n_layers - l) * block + n_answer * unembed) for l in range(n_layers))
    return batched / loop


def compare(model, prompts, label, loop_every, forward_engine):
    heads = all_heads(int(model.cfg.n_layers), int(model.cfg.n_heads))
    started = time.perf_counter()
    batched = rank_heads_by_ablation(model, prompts, top_n=5)
    batched_s = time.perf_counter() - started
    sample = heads[::loop_every]
    started = time.perf_counter()
    loop = rank_heads_by_ablation(model, prompts, heads=sample, engine="loop", top_n=0)
    loop_sample_s = time.perf_counter() - started
    loop_s = loop_sample_s * len(heads) / len(sample)
    fast = batched.table.set_index("label")["kl"]
    slow = loop.table.set_index("label")["kl"]
    diff = float(np.max(np.abs(fast.loc[slow.index].values - slow.values)))
    print(f"\n[{label}] {len(prompts)} prompt(s) of {prompts.lengths[0]} tokens, {len(heads)} heads")
    note = f", {batched.engine_note}" if batched.engine_note else ""
    print(f"  batched (replay engine)      {batched_s:8.2f} s   ({batched.engine}{note})")
    if forward_engine:
        started = time.perf_counter()
        rank_heads_by_ablation(model, prompts, engine="forward", top_n=0)
        forward_s = time.perf_counter() - started
        print(f"  batched, full forward passes {forward_s:8.2f} s   "
              f"(no layer skipping: x{forward_s / batched_s:.2f} the replay)")
    scaled = "" if len(sample) == len(heads) else f", measured on {len(sample)} heads and scaled"
    print(f"  one forward per head (loop)  {loop_s:8.2f} s   ({loop_sample_s / len(sample):.3f} s per head{scaled})")
    print(f"  speed-up over the loop       x{loop_s / batched_s:.1f}")
    print(f"  max |KL batched - KL loop|   {diff:.2e} over {len(sample)} heads (KL values up to {fast.max():.3f})")
    share = arithmetic_share(model, prompts.lengths[0], 1)
    print(f"  arithmetic of batched/loop   {share:.0%} (so x{1 / share:.1f} where both are compute-bound)")
    return batched, batched_s, loop_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop-every", type=int, default=5, help="one-prompt loop: time every n-th head")
    parser.add_argument("--batch-loop-every", type=int, default=15, help="16-prompt loop: time every n-th head")
    parser.add_argument("--batch", type=int, default=16, help="IOI prompts in the batch")
    parser.add_argument("--budget", type=int, default=10, help="targeted search budget")
    parser.add_argument("--forward-engine", action="store_true", help="also time batched full forward passes")
    args = parser.parse_args()

    loaded = load_model("smollm2-135m", device="cpu")
    model, info = loaded.model, loaded.info
    print(f"model {info.name} on cpu ({info.n_layers} layers x {info.n_heads} heads, {info.n_kv_heads} KV heads), "
          f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    one = prompts_from_texts(model, [IOI], targets=[" Mary"], alternatives=[" John"])
    ranking, one_s, one_loop_s = compare(model, one, "one IOI prompt", args.loop_every, args.forward_engine)
    print("\n  SmolLM2's top KL heads on the IOI prompt (zero ablation):")
    columns = ["rank", "label", "kl", "logit_diff", "target_prob", "alternative_prob", "top_prob"]
    print(ranking.table[columns].head(10).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    top = ranking.table["label"].iloc[0]
    shift = ranking.shifts[top].head(3)
    print(f"  ablating {top}: " + "; ".join(f"{r.token!r} {r.prob_before:.3f} -> {r.prob_after:.3f}"
                                            for r in shift.itertuples()))

    template = load_templates()["templates"][0]
    batch = ioi_prompts(model, args.batch, seed=0, template=template)
    _, batch_s, batch_loop_s = compare(model, batch, f"batch of {args.batch} IOI prompts", args.batch_loop_every,
                                       False)

    started = time.perf_counter()
    search = targeted_search(model, one, " John", budget=args.budget)
    search_s = time.perf_counter() - started
    print(f"\n[targeted search] {search.summary}")
    order = ", ".join(map(str, search.greedy_heads))
    print(f"  {search_s:.2f} s, {search.passes} batched passes; greedy order {order}")
    print(search.trajectory[["step", "action", "head", "alternative_prob", "original_prob", "margin", "top_token"]]
          .to_string(index=False, float_format=lambda x: f"{x:.4f}"))

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nsummary: one prompt {one_s:.1f} s vs loop {one_loop_s:.1f} s (x{one_loop_s / one_s:.1f}); "
          f"{args.batch} prompts {batch_s:.1f} s vs loop {batch_loop_s:.1f} s (x{batch_loop_s / batch_s:.1f}); "
          f"targeted search {search_s:.1f} s; peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
