"""The IOI tour (Wang et al. 2022, "Interpretability in the Wild"), step by step on the loaded model.

All steps use one IOI template, so every clean prompt and its ABC corruption
("When Mary and John went to the store, Kate gave a drink to") have one
length: heads are mean-ablated over the ABC prompts position by position, as
in the paper. Where exact patching of every head or edge would be costly the
step ranks them first by attribution patching
(:mod:`headvis_core.ablation.estimate`) and patches only the top ones exactly.
"""

from typing import Any

import numpy as np
import pandas as pd
import torch

from headvis_core import hooks
from headvis_core.ablation.estimate import agreement, estimate_heads, estimate_query_edges
from headvis_core.ablation.metrics import AnswerMetrics, logit_difference, prompt_mean
from headvis_core.ablation.ranking import rank_heads_by_ablation
from headvis_core.ablation.runner import AblationRunner
from headvis_core.ablation.values import make_ablation
from headvis_core.atlas.copying import DEFAULT_MAX_VOCAB, copying_scores
from headvis_core.atlas.metrics import (
    earlier_occurrences,
    for_each_layer_pattern,
    induction_sums,
    length_batches,
    text_metric_sums,
)
from headvis_core.atlas.run import build_probe_set
from headvis_core.attribution.edge import sliding_window
from headvis_core.circuits.path_patching import Edge, path_patch
from headvis_core.circuits.published_roles import published_roles_for
from headvis_core.data.ioi import load_templates
from headvis_core.data.probes import induction_probe
from headvis_core.data.prompt_pairs import ioi_prompts, prompts_from_texts
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef, all_heads
from headvis_core.tokens import bos_token_id
from headvis_core.tours.base import StepResult, heads_text, page_link
from headvis_core.viz.tours import bar_figure, depth_figure, grouped_bars, head_heatmap

MIN_SHARE = 0.05  # path patching: share of the clean - corrupted gap an edge must carry to count
MAX_ROLE_HEADS = 3
N_DIRECT = 3  # heads with the largest direct effect, kept in the circuit whatever their attention
MIN_IO_ATTENTION = 0.1  # attention from the last token to the indirect object that counts as attending to it
PUBLISHED_MODEL = "gpt2"


def tour_prompts(model: Any, n_prompts: int, seed: int) -> Any:
    """IOI prompts of the first template (one length), with their ABC corruptions."""
    template = load_templates()["templates"][0]
    return ioi_prompts(model, n_prompts=n_prompts, seed=seed, template=template)


def abc_mean_ablation(model: Any, prompts: Any) -> Any:
    """Each head's mean output over the ABC prompts, per position (Wang et al. 2022, section 3)."""
    reference = prompts_from_texts(model, prompts.corrupted_texts, name="IOI ABC")
    return make_ablation(model, "mean", prompts, reference=reference)


def _ld_link(model_name: str, n_prompts: int) -> str:
    return page_link("Ablation", model_name, source="ioi", mode="kl", metric="logit_diff", kind="mean",
                     n=n_prompts)


ATLAS_BATCH = 16  # sequences per pass, as the atlas batches them (the sums then add up in the same order)


def atlas_role_metrics(model: Any, n_seqs: int, seq_len: int, below_layer: int) -> pd.DataFrame:
    """The atlas's ``induction`` and ``duplicate_token`` scores of the heads below ``below_layer``, alone.

    The same probe, batches and float64 sums as :func:`headvis_core.atlas.run.run_atlas` (so the same
    values while ``n_seqs`` fits one of the atlas's text shards, ``DEFAULT_SHARD_SEQUENCES`` = 64: past it the
    atlas adds per-shard sums, equal up to the last bits; ``tests/tours/test_ioi_steps.py``), but only the
    attention patterns of layers ``0..below_layer - 1`` are captured and each pass stops there: none of the
    atlas's other metrics, its retrieval prompts, copying scores or passport examples. Returns ``layer, head,
    induction, duplicate_token``, layer-major like the atlas table.
    """
    n_heads = int(model.cfg.n_heads)
    layers = list(range(max(1, min(int(below_layer), int(model.cfg.n_layers)))))
    probe = build_probe_set(model, None, n_seqs=n_seqs, seq_len=seq_len)
    bos = bos_token_id(model) is not None
    induction = induction_probe(model, max(4, len(probe.sequences) // 4), max(2, (probe.seq_len - bos) // 2), seed=0)
    sums = {name: torch.zeros(len(layers), n_heads, dtype=torch.float64) for name in ("induction", "duplicate_token")}
    counts = {name: torch.zeros(len(layers), dtype=torch.float64) for name in sums}

    def add(name: str, layer: int, value: torch.Tensor, n_queries: float) -> None:
        sums[name][layer] += value.double().cpu()
        counts[name][layer] += n_queries

    for tokens in length_batches(probe.sequences, ATLAS_BATCH):
        earlier_same = earlier_occurrences(tokens)

        def on_text(layer: int, pattern: torch.Tensor, tokens: torch.Tensor = tokens,
                    earlier_same: torch.Tensor = earlier_same) -> None:
            layer_sums, layer_counts = text_metric_sums(pattern, tokens, earlier_same,
                                                        window=sliding_window(model, layer))
            add("duplicate_token", layer, layer_sums["duplicate_token"], layer_counts["duplicate_token"])

        for_each_layer_pattern(model, tokens, on_text, layers)
    for tokens in length_batches([induction.tokens], ATLAS_BATCH):
        def on_induction(layer: int, pattern: torch.Tensor) -> None:
            stripe, n_queries = induction_sums(pattern, induction.half_len, induction.prefix_len)
            add("induction", layer, stripe, n_queries)

        for_each_layer_pattern(model, tokens, on_induction, layers)
    layer_index, head_index = np.meshgrid(np.array(layers), np.arange(n_heads), indexing="ij")
    columns = {"layer": layer_index.ravel(), "head": head_index.ravel()}
    for name in sums:
        n = counts[name][:, None]
        columns[name] = torch.where(n > 0, sums[name] / n.clamp(min=1), torch.nan).numpy().ravel().astype(float)
    return pd.DataFrame(columns)


def logit_difference_step(model: Any, found: dict, model_name: str = "", n_prompts: int = 8, seed: int = 0
                          ) -> StepResult:
    prompts = tour_prompts(model, n_prompts, seed)
    padded = prompts.padded()
    device = model.cfg.device
    rows = torch.arange(padded.n_prompts)
    values = {}
    for name, tokens in (("clean", padded.clean), ("ABC corrupted", padded.corrupted)):
        logits = hooks.forward(model, tokens.to(device))[rows, padded.last].float().cpu()
        values[name] = logit_difference(logits, padded.answer, padded.alternative).numpy()
    clean, corrupted = values["clean"], values["ABC corrupted"]
    right = int((clean > 0).sum())
    convincing = bool(clean.mean() > 0 and right > len(clean) / 2)
    sentence = (f"On {len(clean)} IOI prompts the logit difference logit(IO) - logit(S) is {clean.mean():.2f} on "
                f"average (positive on {right} of {len(clean)}); on the ABC corruptions, where no name repeats, "
                f"it is {corrupted.mean():.2f}.")
    if not convincing:
        sentence += " This model does not prefer the indirect object, so there is little IOI behaviour to explain."
    labels = [f"#{i + 1}" for i in range(len(clean))]
    table = pd.DataFrame({"prompt": prompts.texts, "logit_diff": clean, "abc_logit_diff": corrupted})
    return StepResult(sentence=sentence, figure=grouped_bars(labels, values, "Logit difference IO - S per prompt",
                                                             "logit difference"),
                      table=table, convincing=convincing, link=_ld_link(model_name, n_prompts),
                      found={"clean_logit_diff": float(clean.mean()), "abc_logit_diff": float(corrupted.mean())})


def direct_effects(model: Any, prompts: Any) -> np.ndarray:
    """Each head's direct effect on the mean logit difference: path patching to the logits, noising.

    Head ``h``'s write at the last position, ``z_h W_O^h``, is replaced by its
    write on the ABC prompt in the final residual stream only (the paths
    through later layers see the clean run), the final norm is recomputed and
    the logits read: ``[n_layers, n_heads]`` of ``LD(patched) - LD(clean)``.
    """
    padded = prompts.padded()
    device = model.cfg.device
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    final_name = f"blocks.{n_layers - 1}.hook_resid_post"
    names = [hooks.z_hook(layer) for layer in range(n_layers)]
    rows = torch.arange(padded.n_prompts)
    clean_logits, clean = hooks.capture(model, padded.clean.to(device), names + [final_name])
    _, corrupted = hooks.capture(model, padded.corrupted.to(device), names, stop_at_layer=n_layers)
    final = clean[final_name][rows, padded.last]  # [batch, d_model]
    with hooks.exclusive(model):
        rebuilt = model.unembed(model.ln_final(final[:, None]))[:, 0].float().cpu()
    reference = clean_logits[rows, padded.last].float().cpu()
    if float((rebuilt - reference).abs().max()) > 1e-3 * (float(reference.abs().max()) + 1):
        raise InputError("This model's logits are not the unembedding of its final residual stream (a logit "
                         "soft-cap or similar), so the direct effect cannot be read this way.")
    base = logit_difference(reference, padded.answer, padded.alternative).mean()
    # Only logit(IO) - logit(S) is read, so the unembedding reduces to one direction per prompt.
    W_U, b_U = model.W_U.detach().float(), model.b_U.detach().float()
    direction = (W_U[:, padded.answer] - W_U[:, padded.alternative]).T  # [batch, d_model]
    offset = b_U[padded.answer] - b_U[padded.alternative]  # [batch]
    effects = np.zeros((n_layers, n_heads))
    for layer in range(n_layers):
        W_O = model.blocks[layer].attn.W_O.detach().float()  # [head, d_head, d_model]
        dz = (corrupted[names[layer]] - clean[names[layer]])[rows, padded.last].float()  # [batch, head, d_head]
        writes = torch.einsum("bhd,hdm->hbm", dz, W_O)  # [head, batch, d_model]
        patched = (final[None].float() + writes).to(final.dtype)
        with hooks.exclusive(model):
            normed = model.ln_final(patched.reshape(-1, 1, patched.shape[-1]))[:, 0].float().cpu()
        ld = (normed.view(n_heads, padded.n_prompts, -1) * direction).sum(-1) + offset  # [head, batch]
        effects[layer] = (ld.mean(1) - base).numpy()
    return effects


def _name_attention(model: Any, prompts: Any, heads: list[HeadRef]) -> pd.DataFrame:
    """Attention from the last token to the indirect object and to the subject (both mentions), per head."""
    padded = prompts.padded()
    layers = sorted({h.layer for h in heads})
    _, patterns = hooks.capture(model, padded.clean.to(model.cfg.device), [hooks.pattern_hook(l) for l in layers],
                                stop_at_layer=max(layers) + 1)
    rows = []
    for head in heads:
        pattern = patterns[hooks.pattern_hook(head.layer)][:, head.head].float().cpu()  # [batch, query, key]
        to_io, to_s = [], []
        for b in range(padded.n_prompts):
            tokens = padded.clean[b]
            last = int(padded.last[b])
            io = tokens[:last] == padded.answer[b]
            s = tokens[:last] == padded.alternative[b]
            to_io.append(float(pattern[b, last, :last][io].sum()))
            to_s.append(float(pattern[b, last, :last][s].sum()))
        rows.append({"head": str(head), "attention_to_IO": np.mean(to_io), "attention_to_S": np.mean(to_s)})
    return pd.DataFrame(rows)


def name_movers(model: Any, found: dict, model_name: str = "", n_prompts: int = 8, seed: int = 0,
                candidates: int = 10, refine: int = 10) -> StepResult:
    prompts = tour_prompts(model, n_prompts, seed)
    ablation = abc_mean_ablation(model, prompts)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    direct = direct_effects(model, prompts)
    order = np.argsort(direct.ravel())[:candidates]
    heads = [HeadRef(*divmod(int(i), n_heads)) for i in order]
    table = _name_attention(model, prompts, heads)
    table.insert(1, "direct_effect", [float(direct[h.layer, h.head]) for h in heads])
    # The atlas's OV copying score, alone (the atlas's other metrics are not needed here).
    copying = copying_scores(model, max_vocab=DEFAULT_MAX_VOCAB, seed=0)
    table["copying"] = [float(copying[h.layer, h.head]) for h in heads]
    # Attribution patching ranks all heads by their total effect; the top ones are ablated exactly.
    estimate = estimate_heads(model, prompts, ablation, metric="logit_diff")
    exact = rank_heads_by_ablation(model, prompts, ablation, metric="logit_diff", heads=estimate.top_heads(refine),
                                   top_n=0)
    fit = agreement(estimate.importance, exact.importance, top_k=min(5, refine))
    table["estimated_drop"] = [float(estimate.importance[h.layer, h.head]) for h in heads]
    table["ablation_drop"] = [float(exact.importance[h.layer, h.head]) for h in heads]
    attends = (table.direct_effect < 0) & (table.attention_to_IO >= MIN_IO_ATTENTION) & \
        (table.attention_to_IO > table.attention_to_S)
    movers = table[attends & (table.copying > 0)]
    chosen = list(movers["head"].head(MAX_ROLE_HEADS))
    convincing = bool(chosen)
    top = exact.table.iloc[0]
    sentence = (f"Path patching each head's direct path to the logits: {heads[0]} lowers the logit difference most "
                f"({direct.ravel()[order[0]]:+.2f}). ")
    if convincing:
        best = movers.iloc[0]
        sentence += (f"Name-mover candidates (direct effect < 0, attend to IO at least {MIN_IO_ATTENTION} and more "
                     f"than to S, copying > 0): {heads_text(chosen)}; {best['head']} attends "
                     f"{best.attention_to_IO:.2f} to IO vs {best.attention_to_S:.2f} to S. ")
    elif attends.any():
        readers = table[attends]
        chosen = list(readers["head"].head(MAX_ROLE_HEADS))
        best = readers.iloc[0]
        sentence += (f"No head meets all three tests: {heads_text(chosen)} attend to IO ({best['head']}: "
                     f"{best.attention_to_IO:.2f} vs {best.attention_to_S:.2f} to S) and lower the logit difference, "
                     f"but their copying score is not positive ({best.copying:+.2f}), so they are name movers "
                     "only in part; the next steps use them. ")
    else:
        chosen = [str(h) for h in heads[:2]]
        sentence += ("No head with a negative direct effect attends to IO more than to S: no convincing name mover. "
                     f"The next steps use the two strongest direct heads: {heads_text(chosen)}. ")
    sentence += (f"Attribution patching ranked all {n_layers * n_heads} heads in {estimate.seconds:.1f} s; mean-"
                 f"ablating its top {refine} exactly, {top.label} lowers the logit difference most, by "
                 f"{top.importance:.2f} (of {exact.clean['logit_diff']:.2f}); estimate vs exact: {fit.summary}.")
    found = {"name_movers": chosen, "direct_heads": [str(h) for h in heads[:N_DIRECT]], "top_drop_head": str(top.label),
             "top_drop": float(top.importance),
             "full_logit_diff": float(exact.clean["logit_diff"]), "estimate_spearman": fit.spearman,
             "estimate_top_overlap": fit.top_k_overlap}
    return StepResult(sentence=sentence, figure=head_heatmap(direct, "Direct effect on the logit difference "
                                                                     "(path patching to the logits)",
                                                             "LD change"),
                      table=table, found=found, convincing=convincing, link=_ld_link(model_name, n_prompts))


def _patch_table(model: Any, prompts: Any, edges: list[Edge]) -> tuple[pd.DataFrame, Any]:
    result = path_patch(model, prompts, edges, direction="noising")
    return result.table.sort_values("normalized", kind="stable").reset_index(drop=True), result


def s_inhibition(model: Any, found: dict, model_name: str = "", n_prompts: int = 8, seed: int = 0,
                 top_edges: int = 8) -> StepResult:
    # The name movers' queries, and those of the heads with the largest direct effect (which on some
    # models write the answer without passing every name-mover test).
    labels = dict.fromkeys(found.get("name_movers", []) + found.get("direct_heads", []))
    receivers = [r for r in (HeadRef.from_label(h) for h in labels) if r.layer > 0]
    link = page_link("Circuit_graph", model_name, kinds="q", measure="z", heads=",".join(map(str, receivers)))
    if not receivers:
        return StepResult(sentence="There are no name movers above the first layer to look for S-inhibition into.",
                          convincing=False, link=link)
    prompts = tour_prompts(model, n_prompts, seed)
    estimates = estimate_query_edges(model, prompts, receivers)
    ranked = estimates.sort_values("estimate", kind="stable").head(top_edges)
    edges = [Edge(HeadRef.from_label(r.sender), HeadRef.from_label(r.receiver), "q") for r in ranked.itertuples()]
    table, result = _patch_table(model, prompts, edges)
    table = table.merge(estimates, on=["sender", "receiver", "kind"], how="left")
    fit = agreement(-table.estimate.to_numpy(), -table.effect.to_numpy(), top_k=3)
    carriers = table[-table.normalized >= MIN_SHARE]
    chosen = list(dict.fromkeys(carriers.sender))[:MAX_ROLE_HEADS]
    convincing = bool(chosen)
    best = table.iloc[0]
    sentence = (f"Attribution patching scored all {len(estimates)} edges into the queries of "
                f"{heads_text([str(r) for r in receivers])} in one "
                f"backward pass; path-patching the top {len(edges)} exactly, {best.sender} -> {best.receiver} (Q) "
                f"removes {-100 * best.normalized:.0f}% of the logit difference (estimate vs exact on these "
                f"edges: Spearman {fit.spearman:.2f}). ")
    sentence += (f"S-inhibition candidates: {heads_text(chosen)}." if convincing else
                 f"No edge carries {100 * MIN_SHARE:.0f}% of the gap: no convincing S-inhibition head.")
    figure = bar_figure([f"{r.sender} -> {r.receiver}" for r in table.itertuples()], list(-table.normalized),
                        "Share of the logit difference each edge into a name mover's query carries",
                        "share of the clean - ABC gap removed (path patching)")
    return StepResult(sentence=sentence, figure=figure, table=table, convincing=convincing, link=link,
                      found={"s_inhibition": chosen})


def induction_duplicate_feeders(model: Any, found: dict, model_name: str = "", n_prompts: int = 8, seed: int = 0,
                                per_role: int = 3, atlas_seqs: int = 16, atlas_len: int = 64) -> StepResult:
    labels = found.get("s_inhibition", []) or list(dict.fromkeys(found.get("name_movers", [])
                                                                  + found.get("direct_heads", [])))
    receivers = [HeadRef.from_label(h) for h in labels]
    link = page_link("Circuit_graph", model_name, kinds="v", measure="z", heads=",".join(map(str, receivers)))
    if not receivers:
        return StepResult(sentence="No S-inhibition or name-mover heads to trace back from.", convincing=False,
                          link=link)
    top_layer = max(r.layer for r in receivers)
    earlier = atlas_role_metrics(model, atlas_seqs, atlas_len, top_layer)
    earlier = earlier[earlier.layer < top_layer]
    roles = {}
    for role, metric in (("induction", "induction"), ("duplicate token", "duplicate_token")):
        best = earlier.nlargest(per_role, metric)
        roles[role] = [f"{r.layer}.{r.head}" for r in best.itertuples()]
    edges = [Edge(HeadRef.from_label(s), r, "v") for senders in roles.values() for s in senders for r in receivers
             if HeadRef.from_label(s).layer < r.layer]
    if not edges:
        return StepResult(sentence="No induction or duplicate-token head sits below the heads found so far.",
                          convincing=False, link=link)
    prompts = tour_prompts(model, n_prompts, seed)
    patched, _ = _patch_table(model, prompts, edges)
    patched["role"] = ["induction" if s in roles["induction"] else "duplicate token" for s in patched.sender]
    carriers = patched[-patched.normalized >= MIN_SHARE]
    found_roles = {role: list(dict.fromkeys(carriers[carriers.role == role].sender))[:MAX_ROLE_HEADS]
                   for role in roles}
    convincing = bool(carriers.shape[0])
    best = patched.iloc[0]
    sentence = (f"Of the atlas's top induction heads ({heads_text(roles['induction'])}) and duplicate-token heads "
                f"({heads_text(roles['duplicate token'])}), path patching into the values of "
                f"{heads_text([str(r) for r in receivers])} finds {best.sender} -> {best.receiver} (V) carrying "
                f"{-100 * best.normalized:.0f}% of the logit difference. ")
    sentence += ("Feeders found: induction " + heads_text(found_roles["induction"]) + "; duplicate token "
                 + heads_text(found_roles["duplicate token"]) + "." if convincing else
                 f"None carries {100 * MIN_SHARE:.0f}%: no convincing feeder through the values.")
    figure = bar_figure([f"{r.sender} -> {r.receiver} ({r.role})" for r in patched.itertuples()],
                        list(-patched.normalized), "Share of the logit difference carried into the values",
                        "share of the clean - ABC gap removed (path patching)")
    return StepResult(sentence=sentence, figure=figure, table=patched, convincing=convincing, link=link,
                      found={"induction_feeders": found_roles["induction"],
                             "duplicate_feeders": found_roles["duplicate token"]})


ROLE_KEYS = (("name mover", "name_movers"), ("S-inhibition", "s_inhibition"), ("induction", "induction_feeders"),
             ("duplicate token", "duplicate_feeders"))
CIRCUIT_KEYS = tuple(key for _, key in ROLE_KEYS) + ("direct_heads",)


def roles_table(model: Any, found: dict, model_name: str = "") -> StepResult:
    published = published_roles_for(PUBLISHED_MODEL)
    own = published_roles_for(model_name) if model_name else None
    n_layers = int(model.cfg.n_layers)
    rows, depth_rows = [], []
    for role, key in ROLE_KEYS:
        mine = found.get(key, [])
        theirs = [str(h) for h in published.heads_with(role)] if published else []
        row = {"role": role, "GPT-2 small (Wang et al. 2022)": ", ".join(theirs), "this model": ", ".join(mine)}
        if own is not None:
            row["also published for this model"] = ", ".join(h for h in mine if own.role_of(HeadRef.from_label(h)))
        rows.append(row)
        depth_rows += [{"model": "GPT-2 small", "role": role, "head": h, "depth": HeadRef.from_label(h).layer / 12}
                       for h in theirs]
        depth_rows += [{"model": model_name or "this model", "role": role, "head": h,
                        "depth": HeadRef.from_label(h).layer / n_layers} for h in mine]
    table = pd.DataFrame(rows)
    found_roles = [r["role"] for r in rows if r["this model"]]
    sentence = (f"This model shows {len(found_roles)} of the 4 roles ({', '.join(found_roles) or 'none'}). "
                "Compare the depths: in GPT-2 small the name movers sit at 75-83% of the depth, S-inhibition at "
                "58-67%, induction at 42-50%.")
    if own is not None:
        sentence += " Heads also published for this model are marked in the table."
    return StepResult(sentence=sentence, figure=depth_figure(depth_rows, "Where each role sits (layer / layers)"),
                      table=table, convincing=len(found_roles) >= 2,
                      link=page_link("Circuit_graph", model_name, kinds="q,k,v"))


def faithfulness(model: Any, found: dict, model_name: str = "", n_prompts: int = 8, seed: int = 0) -> StepResult:
    circuit = sorted({HeadRef.from_label(h) for key in CIRCUIT_KEYS for h in found.get(key, [])})
    prompts = tour_prompts(model, n_prompts, seed)
    ablation = abc_mean_ablation(model, prompts)
    everything = all_heads(int(model.cfg.n_layers), int(model.cfg.n_heads))
    outside = tuple(h for h in everything if h not in set(circuit))
    runner = AblationRunner(model, prompts, ablation)
    metrics = AnswerMetrics.for_prompts(prompts)
    values = prompt_mean(runner.evaluate([(), outside, tuple(everything)], metrics))["logit_diff"].numpy()
    full, kept, nothing = (float(v) for v in values)
    share = kept / full if abs(full) > 1e-9 else float("nan")
    convincing = bool(circuit) and 0.5 <= share <= 1.5
    sentence = (f"With every head outside the {len(circuit)}-head circuit ({heads_text([str(h) for h in circuit])}) "
                f"mean-ablated over the ABC prompts, the logit difference is {kept:.2f}, {100 * share:.0f}% of the "
                f"full model's {full:.2f} (faithfulness {share:.2f}); with every head ablated it is {nothing:.2f}.")
    if not convincing:
        sentence += " The found heads do not carry the behaviour on their own."
    figure = bar_figure(["full model", f"circuit only ({len(circuit)} heads)", "no heads"], [full, kept, nothing],
                        "Logit difference with heads outside the circuit mean-ablated", "logit difference")
    table = pd.DataFrame({"run": ["full model", "circuit only", "no heads"], "logit_diff": [full, kept, nothing]})
    return StepResult(sentence=sentence, figure=figure, table=table, convincing=convincing,
                      link=_ld_link(model_name, n_prompts),
                      found={"faithfulness": share, "circuit": [str(h) for h in circuit]})
