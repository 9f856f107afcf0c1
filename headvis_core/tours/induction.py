"""The induction tour (Olsson et al. 2022; Elhage et al. 2021), step by step on the loaded model.

Each function is one step: ``(model, found, model_name, **settings) -> StepResult``
(see :mod:`headvis_core.tours.base`). They call the workbench's own analyses:
the atlas metrics, composition scores with their random baseline, path
patching, ablation, and the score attribution of :mod:`headvis_core.attribution`.
"""

from typing import Any

import numpy as np
import pandas as pd
import torch

from headvis_core import hooks
from headvis_core.ablation.metrics import AnswerMetrics, clean_metrics, prompt_mean
from headvis_core.ablation.runner import AblationRunner
from headvis_core.ablation.values import zero_ablation
from headvis_core.atlas.classes import RULES
from headvis_core.atlas.run import compute_atlas
from headvis_core.circuits.composition import compute_composition
from headvis_core.circuits.path_patching import Edge, path_patch
from headvis_core.data.prompt_pairs import induction_prompt_pairs, induction_prompts
from headvis_core.heads import HeadRef
from headvis_core.store import kinds as store_kinds
from headvis_core.store.results import cached
from headvis_core.tours.base import StepResult, heads_text, page_link
from headvis_core.viz.atlas import layer_heatmap
from headvis_core.viz.tours import bar_figure, loss_by_position

MIN_LOSS_DROP = 1.0  # nats: below this the second copy is not predicted from the first in any useful way
MAX_HEADS = 4  # heads carried to later steps per role
MIN_RATIO = 2.0  # composition: times the random baseline's mean score
MIN_PERCENTILE = 90.0  # composition: share of the K edges into the same receiver that an edge must beat
MIN_PATCHED_SHARE = 0.05  # path patching: share of the clean-corrupted gap an edge must carry


def threshold(behaviour: str) -> float:
    return next(rule.threshold for rule in RULES if rule.behaviour == behaviour)


def atlas_table(model: Any, n_seqs: int, seq_len: int) -> pd.DataFrame:
    """The head atlas on the built-in prompts, through the result store (shared with the atlas page)."""
    inputs = store_kinds.atlas_inputs(None, n_seqs, seq_len, None, 0)
    stored = cached(store_kinds.ATLAS, model, inputs,
                    lambda: compute_atlas(model, n_seqs=n_seqs, seq_len=seq_len))
    return stored.value.table


def _top_heads(table: pd.DataFrame, metric: str, behaviour: str) -> tuple[pd.DataFrame, list[str], bool]:
    """The strongest heads on ``metric``: those past the behaviour's threshold (at most MAX_HEADS), else the top 2."""
    ranked = table.nlargest(10, metric)[["layer", "head", metric, "behaviour"]].reset_index(drop=True)
    ranked.insert(0, "label", ranked.layer.astype(str) + "." + ranked["head"].astype(str))
    past = ranked[ranked[metric] >= threshold(behaviour)]
    convincing = not past.empty
    chosen = (past if convincing else ranked).head(MAX_HEADS if convincing else 2)
    return ranked, list(chosen.label), convincing


def second_copy_loss(model: Any, found: dict, model_name: str = "", n_seqs: int = 8, half_len: int = 20,
                     seed: int = 0) -> StepResult:
    prompts = induction_prompts(model, n_seqs=n_seqs, half_len=half_len, seed=seed)
    tokens = torch.stack(prompts.tokens).to(model.cfg.device)
    logits = hooks.forward(model, tokens).float()
    losses = -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]  # [seq, pos - 1]
    per_position = losses.mean(0).cpu().numpy()
    second = list(prompts.answer_positions[0])
    start = second[0] - half_len + 1  # the first copy's second token is predicted from here
    first = list(range(start, start + half_len - 1))
    first_loss, second_loss = float(per_position[first].mean()), float(per_position[second].mean())
    drop = first_loss - second_loss
    convincing = drop >= MIN_LOSS_DROP
    sentence = (f"On this model the loss is {first_loss:.2f} nats per token on the first copy of {half_len} random "
                f"tokens and {second_loss:.2f} on the second: a drop of {drop:.2f} nats")
    sentence += (", so it copies from earlier in the context." if convincing else
                 f", less than {MIN_LOSS_DROP:.0f} nat: no clear sign of in-context copying.")
    table = pd.DataFrame({"part": ["first copy", "second copy"], "mean loss (nats)": [first_loss, second_loss]})
    return StepResult(sentence=sentence, figure=loss_by_position(per_position, second[0]), table=table,
                      found={"first_copy_loss": first_loss, "second_copy_loss": second_loss},
                      convincing=convincing,
                      link=page_link("Ablation", model_name, source="induction", metric="loss", n=n_seqs))


def _head_step(model: Any, model_name: str, n_seqs: int, seq_len: int, metric: str, behaviour: str,
               what: str, found_key: str) -> StepResult:
    table = atlas_table(model, n_seqs, seq_len)
    ranked, chosen, convincing = _top_heads(table, metric, behaviour)
    best = ranked.iloc[0]
    count = int((table[metric] >= threshold(behaviour)).sum())
    if convincing:
        sentence = (f"On this model the strongest {what} head is {best.label}, score {best[metric]:.2f}; "
                    f"{count} head(s) pass the threshold of {threshold(behaviour)}. Carried on: {heads_text(chosen)}.")
    else:
        sentence = (f"No head of this model passes the {what} threshold of {threshold(behaviour)}: the strongest is "
                    f"{best.label} at {best[metric]:.2f}. The next steps use the top two anyway: "
                    f"{heads_text(chosen)}.")
    found = {found_key: chosen, f"{found_key}_top3": list(ranked.label[:3])}
    return StepResult(sentence=sentence, figure=layer_heatmap(table, metric), table=ranked, found=found,
                      convincing=convincing,
                      link=page_link("Head_atlas", model_name, n=n_seqs, len=seq_len, x="previous_token",
                                     y="induction", layer=int(best.layer), head=int(best["head"])))


def previous_token_heads(model: Any, found: dict, model_name: str = "", n_seqs: int = 32,
                         seq_len: int = 64) -> StepResult:
    return _head_step(model, model_name, n_seqs, seq_len, "previous_token", "previous-token", "previous-token",
                      "previous_token_heads")


def induction_heads(model: Any, found: dict, model_name: str = "", n_seqs: int = 32, seq_len: int = 64
                    ) -> StepResult:
    return _head_step(model, model_name, n_seqs, seq_len, "induction", "induction", "induction",
                      "induction_heads")


def _later_pairs(senders: list[str], receivers: list[str]) -> list[tuple[HeadRef, HeadRef]]:
    pairs = [(HeadRef.from_label(s), HeadRef.from_label(r)) for s in senders for r in receivers]
    return [(s, r) for s, r in pairs if r.layer > s.layer]


def k_composition(model: Any, found: dict, model_name: str = "", max_edges: int = 6) -> StepResult:
    senders, receivers = found.get("previous_token_heads", []), found.get("induction_heads", [])
    pairs = _later_pairs(senders, receivers)
    link = page_link("Circuit_graph", model_name, kinds="k", measure="z", heads=",".join(senders + receivers))
    if not pairs:
        return StepResult(sentence="No previous-token head sits in an earlier layer than an induction head here, "
                                   "so there is no K-composition edge to look at.", convincing=False, link=link)
    stored = cached(store_kinds.COMPOSITION, model, store_kinds.composition_inputs(["k"], True),
                    lambda: compute_composition(model, kinds=("k",), fold_ln=True))
    result = stored.value
    edges = result.edges_table(["k"])
    wanted = {(str(s), str(r)) for s, r in pairs}
    chosen = edges[[(s, r) in wanted for s, r in zip(edges.sender, edges.receiver)]]
    # Where each edge stands among all K edges into the same receiver: 100 = the strongest.
    percentile = []
    for row in chosen.itertuples():
        into = edges[edges.receiver == row.receiver]
        percentile.append(float((into.z < row.z).mean() * 100))
    chosen["percentile_into_receiver"] = percentile
    chosen = chosen.sort_values("ratio", ascending=False).reset_index(drop=True)
    top = chosen.head(max_edges)
    best = top.iloc[0]
    strong = (chosen.ratio >= MIN_RATIO) & (chosen.percentile_into_receiver >= MIN_PERCENTILE)
    convincing = bool(strong.iloc[0])
    # The random baseline's spread is tiny for large matrices, so z is huge for almost any edge: the
    # ratio and the edge's rank among the receiver's K inputs are the readable measures.
    sentence = (f"The strongest K-composition edge from a previous-token head to an induction head is "
                f"{best.sender} -> {best.receiver}: {best.ratio:.1f} times the random baseline's mean score, "
                f"stronger than {best.percentile_into_receiver:.0f}% of the K edges into {best.receiver}. "
                f"{int(strong.sum())} of {len(chosen)} such edges are at least {MIN_RATIO:.0f} times the baseline "
                f"and in the top {100 - MIN_PERCENTILE:.0f}% of their receiver's.")
    if not convincing:
        sentence += " None clears the bar: in the weights alone these heads do not look K-composed."
    figure = bar_figure([f"{r.sender} -> {r.receiver}" for r in top.itertuples()], list(top.ratio),
                        "K-composition of previous-token -> induction heads", "times the random baseline",
                        reference=1.0, reference_label="random")
    columns = ["sender", "receiver", "score", "ratio", "z", "percentile_into_receiver"]
    return StepResult(sentence=sentence, figure=figure, table=top[columns], convincing=convincing, link=link,
                      found={"k_edges": [[r.sender, r.receiver] for r in top.itertuples()]})


def path_patch_edges(model: Any, found: dict, model_name: str = "", n_prompts: int = 4, half_len: int = 15,
                     seed: int = 0) -> StepResult:
    edges = [Edge(HeadRef.from_label(s), HeadRef.from_label(r), "k") for s, r in found.get("k_edges", [])]
    link = page_link("Circuit_graph", model_name, kinds="k", measure="z")
    if not edges:
        return StepResult(sentence="There are no candidate edges from the previous step to patch.",
                          convincing=False, link=link)
    pairs = induction_prompt_pairs(model, n_prompts=n_prompts, half_len=half_len, seed=seed)
    result = path_patch(model, pairs, edges, direction="noising")
    table = result.table.sort_values("normalized", kind="stable").reset_index(drop=True)
    best = table.iloc[0]
    convincing = bool(-best.normalized >= MIN_PATCHED_SHARE)
    confirmed = [f"{r.sender} -> {r.receiver}" for r in table.itertuples() if -r.normalized >= MIN_PATCHED_SHARE]
    sentence = (f"On repeated random tokens the logit difference (answer vs. the corrupted prompt's token) is "
                f"{result.clean_metric:.2f} clean and {result.corrupted_metric:.2f} corrupted. Patching "
                f"{best.sender} -> {best.receiver} (K) alone from the corrupted run moves it by {best.effect:.2f}, "
                f"{-100 * best.normalized:.0f}% of the gap. ")
    sentence += (f"Edges carrying at least {100 * MIN_PATCHED_SHARE:.0f}%: {heads_text(confirmed)}." if convincing
                 else f"No edge alone carries {100 * MIN_PATCHED_SHARE:.0f}% of the gap: the weights' edges are "
                      "not confirmed on prompts (the heads may work in parallel, each carrying a little).")
    figure = bar_figure([f"{r.sender} -> {r.receiver}" for r in table.itertuples()], list(-table.normalized),
                        "Share of the logit difference each edge carries (path patching, noising)",
                        "share of the clean - corrupted gap removed")
    return StepResult(sentence=sentence, figure=figure, table=table, convincing=convincing, link=link,
                      found={"confirmed_edges": confirmed})


def ablate_induction_heads(model: Any, found: dict, model_name: str = "", n_seqs: int = 8, half_len: int = 20,
                           seed: int = 0) -> StepResult:
    heads = [HeadRef.from_label(h) for h in found.get("induction_heads", [])]
    link = page_link("Ablation", model_name, source="induction", metric="loss", n=n_seqs)
    if not heads:
        return StepResult(sentence="No induction heads were found to ablate.", convincing=False, link=link)
    prompts = induction_prompts(model, n_seqs=n_seqs, half_len=half_len, seed=seed)
    runner = AblationRunner(model, prompts, zero_ablation(model))
    metrics = AnswerMetrics.for_prompts(prompts)
    clean = float(clean_metrics(runner, metrics)["loss"].mean())
    variants = [(h,) for h in heads] + ([tuple(heads)] if len(heads) > 1 else [])
    losses = prompt_mean(runner.evaluate(variants, metrics))["loss"].numpy()
    labels = [str(h) for h in heads] + ([f"all {len(heads)} together"] if len(heads) > 1 else [])
    table = pd.DataFrame({"ablated": labels, "second-copy loss": losses, "rise": losses - clean})
    first_copy = found.get("first_copy_loss")
    worst = int(np.argmax(losses))
    convincing = bool(losses[worst] - clean >= 0.5)
    sentence = (f"The second-copy loss is {clean:.2f} nats with every head in place. Zero-ablating "
                f"{labels[worst]} raises it to {losses[worst]:.2f}")
    if first_copy is not None and first_copy - clean > 0.1:
        recovered = (losses[worst] - clean) / max(first_copy - clean, 1e-9)
        sentence += f", {100 * recovered:.0f}% of the way back to the first copy's {first_copy:.2f}"
    sentence += "." if convincing else ": under half a nat, so these heads are not what the copying rests on."
    per_head = {str(h): float(losses[i] - clean) for i, h in enumerate(heads)}
    figure = bar_figure(labels, list(losses), "Second-copy loss with induction heads zero-ablated",
                        "loss (nats)", reference=clean, reference_label="no ablation")
    return StepResult(sentence=sentence, figure=figure, table=table, convincing=convincing, link=link,
                      found={"induction_loss_rise": per_head})


def attribution_of_edge(model: Any, found: dict, model_name: str = "", half_len: int = 10, seed: int = 0
                        ) -> StepResult:
    """Step 7: the induction head's attention score on one repeated token, split into the contributions of the
    components that write the key's residual stream (headvis_core.attribution)."""
    from headvis_core.tours import attribution_step

    return attribution_step.induction_score_attribution(model, found, model_name=model_name, half_len=half_len,
                                                        seed=seed)
