"""Ranking every head by the effect of ablating it alone.

Each head is ablated on its own (zero, mean or resample ablation at
``hook_z``) and scored by how much the prediction at the answer position
moves: KL(clean || ablated) by default, or the drop in the logit difference
(target - alternative), or the rise in the loss on the answer tokens (see
:mod:`headvis_core.ablation.metrics`). All heads are evaluated in batched
passes by :class:`~headvis_core.ablation.runner.AblationRunner`, each starting at
the head's own layer from the clean residual stream.
"""

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from headvis_core.ablation.metrics import (
    ABLATION_METRIC_LABELS,
    AnswerMetrics,
    clean_metrics,
    prediction_shift,
    prompt_mean,
    top_k_table,
)
from headvis_core.ablation.runner import DEFAULT_BATCH_TOKENS, AblationRunner
from headvis_core.ablation.values import Ablation, zero_ablation
from headvis_core.data.prompt_pairs import PromptPairs
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef, all_heads
from headvis_core.progress import ProgressCallback, report, scaled

RANKING_METRICS = tuple(ABLATION_METRIC_LABELS)
# Columns of the ranked table, in the order shown, when the metric exists for the prompts.
TABLE_COLUMNS = ["kl", "logit_diff", "logit_diff_drop", "loss", "loss_rise", "target_prob", "target_rank",
                 "alternative_prob", "alternative_rank", "top_prob"]


@dataclass
class HeadRanking:
    """Every head's importance when ablated alone."""

    metric: str  # kl | logit_diff | loss
    kind: str  # zero | mean | resample
    importance: np.ndarray  # [n_layers, n_heads]; NaN for heads not evaluated
    table: pd.DataFrame  # ranked: rank, label, layer, head, importance, metric columns
    clean: dict[str, float]  # clean-run metrics averaged over prompts
    clean_top: pd.DataFrame  # top-k predictions on the first prompt
    shifts: dict[str, pd.DataFrame] = field(default_factory=dict)  # head label -> prediction shift (first prompt)
    n_prompts: int = 1
    engine: str = "replay"
    engine_note: str = ""
    seconds: float = 0.0

    def importance_table(self) -> pd.DataFrame:
        """``layer, head, importance`` for other pages (the circuit graph)."""
        return self.table[["layer", "head", "importance"]].copy()

    def top_heads(self, n: int) -> list[HeadRef]:
        return [HeadRef(int(r.layer), int(r.head)) for r in self.table.head(n).itertuples()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "kind": self.kind,
            "importance": [[None if np.isnan(x) else float(x) for x in row] for row in self.importance],
            "table": table_to_json(self.table), "clean": self.clean, "clean_top": table_to_json(self.clean_top),
            "shifts": {k: table_to_json(v) for k, v in self.shifts.items()}, "n_prompts": self.n_prompts,
            "engine": self.engine, "engine_note": self.engine_note, "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadRanking":
        importance = np.array([[np.nan if x is None else x for x in row] for row in data["importance"]], dtype=float)
        return cls(metric=data["metric"], kind=data["kind"], importance=importance,
                   table=table_from_json(data["table"]), clean=dict(data["clean"]),
                   clean_top=table_from_json(data["clean_top"]),
                   shifts={k: table_from_json(v) for k, v in data.get("shifts", {}).items()},
                   n_prompts=int(data.get("n_prompts", 1)), engine=data.get("engine", ""),
                   engine_note=data.get("engine_note", ""), seconds=float(data.get("seconds", 0.0)))


def table_to_json(df: pd.DataFrame) -> dict[str, Any]:
    """A table as JSON that keeps its column order (JSON files are written with sorted keys)."""
    def plain(v):
        if isinstance(v, (np.integer, np.floating)):
            v = v.item()
        return None if isinstance(v, float) and np.isnan(v) else v

    rows = [[plain(v) for v in row] for row in df.itertuples(index=False)]
    return {"columns": [str(c) for c in df.columns], "data": rows}


def table_from_json(data: Any) -> pd.DataFrame:
    if isinstance(data, dict) and "columns" in data:
        return pd.DataFrame(data["data"], columns=data["columns"])
    return pd.DataFrame(data)


def check_metric(metric: str, prompts: PromptPairs) -> None:
    if metric not in RANKING_METRICS:
        raise InputError(f"Unknown metric {metric!r}; choose one of {', '.join(RANKING_METRICS)}.")
    if metric == "logit_diff" and (prompts.target_ids is None or prompts.alternative_ids is None):
        raise InputError("The logit difference needs a target and an alternative token for every prompt "
                         "(the IOI preset has them: IO and S). Choose KL instead, or give both tokens."
                         + "".join(" " + note for note in prompts.notes))
    if metric == "loss" and prompts.label_ids is None:
        raise InputError("The loss metric needs the true next tokens: use the induction preset, or choose KL.")


def _importance(metric: str, mean: dict[str, torch.Tensor], clean: dict[str, float]) -> torch.Tensor:
    if metric == "kl":
        return mean["kl"]
    if metric == "logit_diff":
        return clean["logit_diff"] - mean["logit_diff"]
    return mean["loss"] - clean["loss"]


def rank_heads_by_ablation(model: Any, prompts: PromptPairs, ablation: Optional[Ablation] = None, metric: str = "kl",
               heads: Optional[Sequence[HeadRef]] = None, top_n: int = 5, k: int = 10, engine: str = "replay",
               max_batch_tokens: int = DEFAULT_BATCH_TOKENS, runner: Optional[AblationRunner] = None,
               progress: Optional[ProgressCallback] = None) -> HeadRanking:
    """Ablate each of ``heads`` (default: all) alone and rank them by ``metric``.

    ``top_n`` heads also get a prediction shift (top-``k`` tokens before and
    after, on the first prompt).
    """
    started = time.perf_counter()
    check_metric(metric, prompts)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    heads = list(heads) if heads is not None else all_heads(n_layers, n_heads)
    if not heads:
        raise InputError("No heads to rank.")
    report(progress, 0.0, "clean run")
    if runner is None:
        runner = AblationRunner(model, prompts, ablation or zero_ablation(model), engine=engine,
                                max_batch_tokens=max_batch_tokens, progress=scaled(progress, 0.0, 0.1))
    metrics = AnswerMetrics.for_prompts(prompts)
    clean_values = {name: float(v.float().mean()) for name, v in clean_metrics(runner, metrics).items()
                    if name not in ("top_id", "logprobs")}
    values = runner.evaluate([(h,) for h in heads], metrics, progress=scaled(progress, 0.1, 0.9))
    mean = prompt_mean(values)
    mean["logit_diff_drop"] = clean_values["logit_diff"] - mean["logit_diff"] if "logit_diff" in mean else None
    mean["loss_rise"] = mean["loss"] - clean_values["loss"] if "loss" in mean else None
    importance = _importance(metric, mean, clean_values)

    matrix = np.full((n_layers, n_heads), np.nan)
    for head, value in zip(heads, importance.tolist()):
        matrix[head.layer, head.head] = value
    table = pd.DataFrame({"label": [str(h) for h in heads], "layer": [h.layer for h in heads],
                          "head": [h.head for h in heads], "importance": importance.numpy()})
    for column in TABLE_COLUMNS:
        if mean.get(column) is not None:
            table[column] = mean[column].numpy()
    table = table.sort_values("importance", ascending=False, kind="stable", ignore_index=True)
    table.insert(0, "rank", range(1, len(table) + 1))

    first = runner.clean_logits[0][-1]
    ranking = HeadRanking(metric=metric, kind=runner.ablation.kind, importance=matrix, table=table,
                          clean=clean_values, clean_top=top_k_table(model, first, k), n_prompts=len(prompts),
                          engine=runner.engine, engine_note=runner.engine_note)
    top = [HeadRef(int(r.layer), int(r.head)) for r in table.head(top_n).itertuples()]
    if top:
        ranking.shifts = head_shifts(model, runner, top, k=k)
    ranking.seconds = time.perf_counter() - started
    report(progress, 1.0, "done")
    return ranking


def head_shifts(model: Any, runner: AblationRunner, heads: Sequence[HeadRef], k: int = 10
                ) -> dict[str, pd.DataFrame]:
    """Prediction shift on the runner's first prompt when each of ``heads`` is ablated alone."""
    values = runner.evaluate([(h,) for h in heads], AnswerMetrics(keep_logprobs=True), prompt_indices=[0])
    clean = runner.clean_logits[0][-1]
    return {str(h): prediction_shift(model, clean, values["logprobs"][i, 0], k=k) for i, h in enumerate(heads)}
