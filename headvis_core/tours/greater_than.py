"""The greater-than tour (Hanna et al. 2023, "How does GPT-2 compute greater-than?"; the HeadVis year sweep).

"The war lasted from the year 17YY to the year 17" is swept over YY with the
``greater_than`` preset of ``prompts/sweeps.json``: a model that compares puts
its probability on endings above YY. One sweep (every head's attention from
the last token to YY, and the model's answer) serves all three steps; it goes
through the result store, so the Prompt sweeps page and a second visit find it.
"""

from typing import Any

import numpy as np
import pandas as pd

from headvis_core.heads import all_heads
from headvis_core.store import kinds as store_kinds
from headvis_core.store.results import cached
from headvis_core.sweeps.plan import build_plan
from headvis_core.sweeps.presets import preset
from headvis_core.sweeps.result import attention_column
from headvis_core.sweeps.run import run_sweep
from headvis_core.sweeps.thresholds import curve_ranges, describe_ranges
from headvis_core.tours.base import StepResult, heads_text, page_link
from headvis_core.viz.sweeps import sweep_line_figure
from headvis_core.viz.tours import bar_figure

PRESET = "greater_than"
MIN_MEAN_SCORE = 0.1  # mean P(> YY) - P(<= YY) below this: no clear greater-than behaviour
MIN_ATTENTION = 0.2  # mean attention to YY that counts as a head reading the year
TOP_HEADS = 5
MIN_NUMBER_MASS = 0.2  # probability on two-digit endings below this: the model is not answering with a year


def year_sweep_result(model: Any, sample: int = 0) -> Any:
    """The preset's sweep with every head's attention, from the store where it is there."""
    plan = build_plan(model, preset(PRESET).spec, drop_odd_lengths=True, sample=sample or None)
    heads = all_heads(int(model.cfg.n_layers), int(model.cfg.n_heads))
    stored = cached(store_kinds.SWEEP, model, store_kinds.sweep_inputs(plan, heads, True),
                    lambda: run_sweep(model, plan, heads, predictions=True))
    return stored.value


def _link(model_name: str, heads: list[str] = ()) -> str:
    return page_link("Prompt_sweeps", model_name, preset=PRESET, heads=",".join(heads) or None)


def answer_probabilities(model: Any, found: dict, model_name: str = "", sample: int = 0) -> StepResult:
    result = year_sweep_result(model, sample)
    table = result.table
    above, below = float(table.p_above.mean()), float(table.p_at_or_below.mean())
    sentence = (f"Over {len(table)} years 17YY, the model puts on average {above:.2f} of its probability on "
                f"two-digit endings above YY and {below:.2f} on endings at or below it "
                f"(the rest goes to other tokens).")
    convincing = above + below >= MIN_NUMBER_MASS and above - below >= MIN_MEAN_SCORE
    if above + below < MIN_NUMBER_MASS:
        sentence += " It hardly predicts a two-digit ending at all here."
    elif not convincing:
        sentence += " It does not clearly favour the later years."
    figure = sweep_line_figure(result, ["p_above", "p_at_or_below"], title="P(ending > YY) and P(ending <= YY)")
    columns = [c for c in ("YY", "prompt", "top_token", "p_above", "p_at_or_below") if c in table.columns]
    return StepResult(sentence=sentence, figure=figure, table=table[columns], convincing=convincing,
                      link=_link(model_name), found={"p_above": above, "p_at_or_below": below})


def probability_difference(model: Any, found: dict, model_name: str = "", sample: int = 0) -> StepResult:
    result = year_sweep_result(model, sample)
    table = result.table
    score = table.greater_than.to_numpy(float)
    ranges = curve_ranges(result, "greater_than", 0.0)[None]
    mean = float(score.mean())
    convincing = mean >= MIN_MEAN_SCORE
    x = result.swept[0]
    sentence = (f"The probability difference P(> YY) - P(<= YY) is {mean:.2f} on average and positive for "
                f"{int((score > 0).sum())} of {len(score)} years. "
                + describe_ranges(ranges, x, "greater_than", 0.0))
    if not convincing:
        sentence += f" Below {MIN_MEAN_SCORE}: no clear greater-than behaviour on this model."
    figure = sweep_line_figure(result, ["greater_than"], level=0.0, ranges=ranges,
                               title="P(ending > YY) - P(ending <= YY) across the years")
    columns = [c for c in (x, "prompt", "greater_than") if c in table.columns]
    return StepResult(sentence=sentence, figure=figure, table=table[list(dict.fromkeys(columns))],
                      convincing=convincing, link=_link(model_name), found={"greater_than_mean": mean})


def year_heads(model: Any, found: dict, model_name: str = "", sample: int = 0) -> StepResult:
    result = year_sweep_result(model, sample)
    table = result.table
    score = table.greater_than.to_numpy(float)
    rows = []
    for head in result.heads:
        attention = table[attention_column(head)].to_numpy(float)
        varies = attention.std() > 1e-9 and score.std() > 1e-9
        rows.append({"head": str(head), "mean_attention_to_YY": float(attention.mean()),
                     "correlation_with_score": float(np.corrcoef(attention, score)[0, 1]) if varies else np.nan})
    heads = pd.DataFrame(rows).sort_values("mean_attention_to_YY", ascending=False, ignore_index=True)
    top = heads.head(TOP_HEADS)
    readers = list(top[top.mean_attention_to_YY >= MIN_ATTENTION]["head"])
    convincing = bool(readers)
    best = top.iloc[0]
    sentence = (f"From the last token, {best['head']} attends most to YY ({best.mean_attention_to_YY:.2f} on "
                f"average over the years; correlation with the probability difference "
                f"{best.correlation_with_score:+.2f}). Heads reading YY with at least {MIN_ATTENTION}: "
                f"{heads_text(readers)}. Attention shows which heads read the year, not that their output "
                "carries the comparison: ablate them on the Ablation page to test it (Hanna et al. found GPT-2's "
                "in layers 5-9 and the comparison in the MLPs after them).")
    if not convincing:
        sentence = (f"No head attends to YY with at least {MIN_ATTENTION} on average from the last token (the most "
                    f"is {best['head']} at {best.mean_attention_to_YY:.2f}): nothing convincing reads the year.")
    curves = ["greater_than"] + [attention_column(h) for h in result.heads if str(h) in list(top["head"][:3])]
    figure = bar_figure(list(top["head"]) + [], list(top.mean_attention_to_YY),
                        "Mean attention from the last token to YY", "attention probability",
                        reference=MIN_ATTENTION, reference_label=f"{MIN_ATTENTION}")
    return StepResult(sentence=sentence, figure=figure, table=heads.head(15), convincing=convincing,
                      link=_link(model_name, list(top["head"][:3])),
                      found={"year_heads": readers or list(top["head"][:2]), "year_curves": curves})
