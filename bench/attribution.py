"""Benchmark: edge attribution on SmolLM2, a table of edges from one pass against one pass per edge.

    .venv/bin/python bench/attribution.py                 # 41 and 121 tokens, 1 and 20 edges
    .venv/bin/python bench/attribution.py --model tiny-llama

For each prompt length, in one run: the seconds of a plain forward pass (reference), of one edge
(:func:`attribute_edge`: one hooked pass plus the algebra), of 20 edges on the same prompt through
:func:`attribute_edges` (one pass), and of the naive way, the same 20 edges one call (one pass)
each; the ratio naive / batched; and the largest difference between the two ways' QK terms
(they must agree exactly). Edges: induction (18.6) and previous-token (16.0) edges of repeated
random tokens, and random (head, query, key) triples. As the other benchmarks, the script asks
for passive OpenMP waiting unless OMP_WAIT_POLICY is already set: the attribution is many small
tensor operations, which spinning worker threads slow down a hundredfold on a shared machine.
"""

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning workers on shared cores

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from headvis_core.attribution import EdgeSpec, attribute_edges  # noqa: E402
from headvis_core.data.probes import random_token_range, repeated_random_tokens  # noqa: E402
from headvis_core.heads import HeadRef  # noqa: E402
from headvis_core.hooks import forward  # noqa: E402
from headvis_core.models.loader import load_model  # noqa: E402
from headvis_core.tokens import bos_token_id  # noqa: E402


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    """Best of ``repeats`` wall-clock seconds (the shared machine is noisy) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def edges_for(model, n_tokens: int, half: int, count: int, seed: int = 0) -> list[EdgeSpec]:
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    start = 1 if bos_token_id(model) is not None else 0
    induction, previous = (HeadRef(18, 6), HeadRef(16, 0)) if n_layers > 18 else (HeadRef(n_layers - 1, 0),) * 2
    edges = [EdgeSpec(induction, start + half + 5, start + 6), EdgeSpec(previous, start + half + 5, start + half + 4)]
    rng = random.Random(seed)
    while len(edges) < count:
        query = rng.randrange(1, n_tokens)
        head = HeadRef(rng.randrange(n_layers), rng.randrange(n_heads))
        edges.append(EdgeSpec(head, query, rng.randrange(query + 1)))
    return edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--halves", default="20,60", help="lengths of each repeated half (prompt = 2 * half + 1)")
    parser.add_argument("--edges", type=int, default=20)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model, device="cpu").model
    low, high = random_token_range(model)
    print(f"model {args.model}, {torch.get_num_threads()} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"{'tokens':>6} {'forward':>8} {'1 edge':>8} {f'{args.edges} batched':>12} {f'{args.edges} naive':>10} "
          f"{'per edge':>9} {'naive/batched':>13} {'max |diff|':>10}")
    for half in (int(h) for h in args.halves.split(",")):
        tokens = repeated_random_tokens(1, half, high, bos_token_id(model), seed=0, low=low)
        measure(model, tokens, edges_for(model, int(tokens.shape[1]), half, args.edges))


def measure(model, tokens: torch.Tensor, edges: list[EdgeSpec]) -> None:
    """One row of the table: a plain pass, one edge, all edges batched, all edges one pass each."""
    plain, _ = timed(lambda: forward(model, tokens))
    single, _ = timed(lambda: attribute_edges(model, tokens, edges[:1]))
    batched, together = timed(lambda: attribute_edges(model, tokens, edges))
    naive, alone = timed(lambda: [attribute_edges(model, tokens, [edge])[0] for edge in edges], repeats=1)
    diff = max(float((a.qk.terms - b.qk.terms).abs().max()) for a, b in zip(alone, together))
    print(f"{int(tokens.shape[1]):>6} {plain:>7.3f}s {single:>7.3f}s {batched:>11.3f}s {naive:>9.3f}s "
          f"{batched / len(edges):>8.3f}s {naive / batched:>12.1f}x {diff:>10.1e}")

if __name__ == "__main__":
    main()
