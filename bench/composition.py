"""Benchmark: all Q/K/V composition scores, ours against TransformerLens's, and the circuit graph.

    .venv/bin/python bench/composition.py              # SmolLM2 and gpt2-small-random, TL for the K kind
    .venv/bin/python bench/composition.py --all-kinds  # TL for Q, K and V (about three times longer)

For each model, in one run: our Gram-matrix scores (``headvis_core.circuits.composition``) and
``TransformerBridge.all_composition_scores`` on the same raw weights, their largest difference, the
seconds of each and the ratio, and the peak extra resident memory of each. TL's version multiplies
the factored matrices of every (sender, receiver) pair in one broadcast, which materialises
``n_pairs * d_head * d_model`` floats per side; where that does not fit in the free memory
(SmolLM2: about 21 GB) the same TL function (``transformer_lens.utilities.composition_scores``
on the same ``FactoredMatrix`` pair) is run one sender layer at a time, and the report says so.
Then: building and rendering the circuit graph of the top 200 edges (networkx + pyvis).
"""

import argparse
import os
import threading
import time

import psutil
import torch

from headvis_core.circuits.composition import (
    all_composition_scores,
    composition_scores_from_weights,
    compute_composition,
    head_weights,
    random_baseline,
)
from headvis_core.circuits.graph import GraphFilter, all_edges, build_graph, to_graphml, to_json
from headvis_core.models.loader import load_model
from headvis_core.viz.circuit_graph import to_html


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        self.process = psutil.Process(os.getpid())
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra_gb(self) -> float:
        return (self.peak - self.start) / 2**30


def timed(fn):
    with PeakMemory() as memory:
        started = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - started
    return value, seconds, memory.extra_gb


def tl_scores(model, kind: str, chunked: bool) -> torch.Tensor:
    """TransformerLens's scores; ``chunked`` runs its composition_scores one sender layer at a time."""
    if not chunked:
        return model.all_composition_scores(kind.upper()).scores
    from transformer_lens.FactoredMatrix import FactoredMatrix
    from transformer_lens.utilities import composition_scores

    W_V, W_O = model._expand_kv_heads(model.W_V), model.W_O
    W_Q, W_K = model.W_Q, model._expand_kv_heads(model.W_K)
    right = {"q": FactoredMatrix(W_Q, W_K.transpose(-2, -1)), "k": FactoredMatrix(W_Q, W_K.transpose(-2, -1)).T,
             "v": FactoredMatrix(W_V, W_O)}[kind]
    rows = [composition_scores(FactoredMatrix(W_V[l:l + 1], W_O[l:l + 1]), right, broadcast_dims=True)
            for l in range(model.cfg.n_layers)]
    scores = torch.cat(rows, dim=0)
    index = torch.arange(model.cfg.n_layers)
    mask = index[:, None, None, None] < index[None, None, :, None]
    return torch.where(mask, scores, torch.zeros_like(scores))


def bench_model(name: str, tl_kinds: list[str]) -> None:
    loaded = load_model(name, device="cpu")
    model, info = loaded.model, loaded.info
    print(f"\n== {name}: {info.n_layers} layers x {info.n_heads} heads ({info.n_kv_heads} KV), d_model {info.d_model}, "
          f"d_head {info.d_head}; {torch.get_num_threads()} threads ==")
    weights = head_weights(model, fold_ln=False)
    ours, seconds, extra = timed(lambda: all_composition_scores(weights, ("q", "k", "v")))
    print(f"ours, all three kinds in one call (writing Grams shared): {seconds:.2f} s, peak +{extra:.2f} GB")
    for kind in "qkv":
        _, seconds, extra = timed(lambda kind=kind: composition_scores_from_weights(weights, kind))
        print(f"ours {kind.upper()} alone: {seconds:6.2f} s, peak +{extra:.2f} GB")
    _, seconds, _ = timed(lambda: random_baseline(info.d_model, info.d_head, "k"))
    print(f"random baseline (48 x 48 Gaussian pairs, shared by the kinds): {seconds:.2f} s")
    n_pairs = (info.n_layers * info.n_heads) ** 2
    need_gb = 2 * n_pairs * info.d_head * info.d_model * 4 / 2**30
    free_gb = psutil.virtual_memory().available / 2**30
    chunked = need_gb > 0.6 * free_gb
    how = (f"chunked by sender layer (the one-shot call needs ~{need_gb:.0f} GB for its broadcast, "
           f"{free_gb:.0f} GB free)" if chunked else f"all_composition_scores (broadcast ~{need_gb:.1f} GB)")
    print(f"TransformerLens: {how}")
    for kind in tl_kinds:
        # ours just before and just after TL: the machine's load drifts, so compare with their mean
        before = timed(lambda kind=kind: composition_scores_from_weights(weights, kind))[1]
        theirs, seconds, extra = timed(lambda kind=kind: tl_scores(model, kind, chunked))
        after = timed(lambda kind=kind: composition_scores_from_weights(weights, kind))[1]
        ours_seconds = (before + after) / 2
        diff = (theirs.float() - ours[kind]).abs().max().item()
        print(f"TL {kind.upper()}: {seconds:7.2f} s, peak +{extra:.2f} GB; ours {before:.2f} s before and "
              f"{after:.2f} s after -> TL / ours = {seconds / ours_seconds:.1f}x; max |difference| {diff:.1e}")
        del theirs
    if name == "smollm2-135m":
        bench_graph(model)


def bench_graph(model) -> None:
    result, seconds, _ = timed(lambda: compute_composition(model))
    print(f"\ncompute_composition (3 kinds, folded, with baselines): {seconds:.2f} s")
    flt = GraphFilter(top_k=None, threshold=None, max_edges=200)
    edges, t_edges, _ = timed(lambda: all_edges(result))
    graph, t_build, _ = timed(lambda: build_graph(result, flt, edges=edges, model_name="smollm2-135m"))
    page, t_html, _ = timed(lambda: to_html(graph))
    _, t_export, _ = timed(lambda: (to_graphml(graph), to_json(graph)))
    print(f"graph of the top {graph.number_of_edges()} edges ({graph.number_of_nodes()} nodes): edge table "
          f"{t_edges:.2f} s ({len(edges)} candidate edges), build {t_build:.3f} s, pyvis HTML {t_html:.3f} s "
          f"({len(page) / 1e6:.1f} MB, vis-network inlined), GraphML + JSON {t_export:.3f} s; "
          f"total {t_edges + t_build + t_html:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-kinds", action="store_true", help="time TransformerLens for Q, K and V (not only K)")
    parser.add_argument("--models", default="gpt2-small-random,smollm2-135m")
    args = parser.parse_args()
    tl_kinds = ["q", "k", "v"] if args.all_kinds else ["k"]
    for name in args.models.split(","):
        bench_model(name.strip(), tl_kinds)


if __name__ == "__main__":
    main()
