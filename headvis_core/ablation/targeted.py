"""Targeted ablation: a small set of heads whose ablation makes a chosen token the top prediction.

Greedy forward selection, then backward pruning. The objective is the
alternative token's margin, ``logit(alternative) - max_{t != alternative}
logit(t)`` at the answer position (positive exactly when the alternative is
the top prediction; averaged over a prompt set). Each step evaluates adding
every remaining head to the current set in one batched pass
(:meth:`AblationRunner.evaluate`) and keeps the one that raises the margin
most; the search stops when the alternative is the top prediction on every
prompt, when no head raises the margin, or when the set reaches the budget.
Pruning then drops, one at a time, heads whose removal keeps the alternative
on top. Finding no set within the budget is a valid answer.
"""

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import pandas as pd
import torch

from headvis_core.ablation.metrics import AnswerMetrics, clean_metrics, prediction_shift, top_k_table
from headvis_core.ablation.ranking import table_from_json, table_to_json
from headvis_core.ablation.runner import DEFAULT_BATCH_TOKENS, AblationRunner
from headvis_core.ablation.values import Ablation, zero_ablation
from headvis_core.data.prompt_pairs import PromptPairs
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef, all_heads, parse_heads
from headvis_core.progress import ProgressCallback, report, scaled
from headvis_core.tokens import single_token_id

MIN_GAIN = 1e-6  # margin gain (logits) below which a head "does not help"


@dataclass
class TargetedResult:
    alternative: str  # the token made top (on the first prompt)
    alternative_ids: list[int]  # per prompt
    heads: list[HeadRef]  # the set found, after pruning (the greedy set when none was found)
    greedy_heads: list[HeadRef]  # in the order the greedy search added them
    found: bool
    reason: str
    trajectory: pd.DataFrame  # one row per step: the clean run, each head added, each head pruned
    clean_top: pd.DataFrame  # top-k on the first prompt, clean
    final_shift: pd.DataFrame  # prediction shift on the first prompt with ``heads`` ablated
    budget: int
    kind: str = "zero"
    n_prompts: int = 1
    passes: int = 0  # batched passes run
    engine: str = "replay"
    seconds: float = 0.0

    @property
    def summary(self) -> str:
        heads = ", ".join(str(h) for h in self.heads) or "none"
        if self.found:
            return (f"Ablating {len(self.heads)} head(s) ({heads}) makes {self.alternative!r} the top prediction"
                    + (" on every prompt." if self.n_prompts > 1 else "."))
        return f"No set of at most {self.budget} heads makes {self.alternative!r} the top prediction: {self.reason}."

    def to_dict(self) -> dict[str, Any]:
        return {"alternative": self.alternative, "alternative_ids": self.alternative_ids,
                "heads": [str(h) for h in self.heads], "greedy_heads": [str(h) for h in self.greedy_heads],
                "found": self.found, "reason": self.reason, "trajectory": table_to_json(self.trajectory),
                "clean_top": table_to_json(self.clean_top), "final_shift": table_to_json(self.final_shift),
                "budget": self.budget, "kind": self.kind, "n_prompts": self.n_prompts, "passes": self.passes,
                "engine": self.engine, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TargetedResult":
        def heads(values):
            return [HeadRef.from_label(str(v)) for v in values]

        return cls(alternative=data["alternative"], alternative_ids=[int(i) for i in data["alternative_ids"]],
                   heads=heads(data["heads"]), greedy_heads=heads(data["greedy_heads"]), found=bool(data["found"]),
                   reason=data["reason"], trajectory=table_from_json(data["trajectory"]),
                   clean_top=table_from_json(data["clean_top"]), final_shift=table_from_json(data["final_shift"]),
                   budget=int(data["budget"]), kind=data.get("kind", "zero"), n_prompts=int(data.get("n_prompts", 1)),
                   passes=int(data.get("passes", 0)), engine=data.get("engine", ""),
                   seconds=float(data.get("seconds", 0.0)))


def alternative_token_ids(model: Any, prompts: PromptPairs, alternative: Any) -> list[int]:
    """Per-prompt ids: a token text (one token, else a clear error), one id, or one id per prompt."""
    if alternative is None or (isinstance(alternative, str) and not alternative):
        if prompts.alternative_ids is None:
            raise InputError("Choose the alternative token to make the top prediction.")
        return list(prompts.alternative_ids)
    if isinstance(alternative, str):
        return [single_token_id(model, alternative)] * len(prompts)
    if isinstance(alternative, int):
        return [alternative] * len(prompts)
    ids = [int(i) for i in alternative]
    if len(ids) != len(prompts):
        raise InputError(f"Give one alternative token per prompt ({len(prompts)}), not {len(ids)}.")
    return ids


@dataclass
class _Step:
    margin: torch.Tensor  # [P]
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # {name: [P]}

    @property
    def objective(self) -> float:
        return float(self.margin.mean())

    @property
    def success(self) -> bool:
        return bool((self.margin > 0).all())


def _steps(values: dict[str, torch.Tensor]) -> list[_Step]:
    n = values["alternative_margin"].shape[0]
    return [_Step(values["alternative_margin"][i], {k: v[i] for k, v in values.items()}) for i in range(n)]


def _best(steps: list[_Step]) -> int:
    return max(range(len(steps)), key=lambda i: (steps[i].success, steps[i].objective))


def _candidate_pool(candidates: Optional[Sequence[HeadRef] | str], n_layers: int, n_heads: int) -> list[HeadRef]:
    """The heads the search may ablate (``"5.1,6.9"``, a list, or ``None`` for all), checked."""
    if isinstance(candidates, str):
        candidates = parse_heads(candidates, n_layers, n_heads)
    pool = list(candidates) if candidates is not None else all_heads(n_layers, n_heads)
    for head in pool:
        head.check(n_layers, n_heads)
    return pool


@dataclass
class _Search:
    """The search's state: the heads chosen so far, the current metrics and the trajectory."""

    model: Any
    runner: AblationRunner
    metrics: AnswerMetrics
    current: _Step
    rows: list[dict[str, Any]]
    chosen: list[HeadRef] = field(default_factory=list)
    passes: int = 0

    def grow(self, pool: list[HeadRef], budget: int, progress: Optional[ProgressCallback]) -> str:
        """Add the head that raises the alternative's margin most, until it is on top; why the search stopped."""
        while not self.current.success:
            if len(self.chosen) >= budget:
                return f"the budget of {budget} heads is used up"
            remaining = [h for h in pool if h not in self.chosen]
            if not remaining:
                return "every candidate head is already ablated"
            done = len(self.chosen) / budget
            step_progress = scaled(progress, 0.05 + 0.8 * done, 0.05 + 0.8 * (len(self.chosen) + 1) / budget)
            values = self.runner.evaluate([tuple(self.chosen) + (h,) for h in remaining], self.metrics,
                                          base=self.chosen, progress=step_progress)
            self.passes += 1
            steps = _steps(values)
            best = _best(steps)
            if not steps[best].success and steps[best].objective <= self.current.objective + MIN_GAIN:
                return "no remaining head raises the alternative further"
            self.chosen.append(remaining[best])
            self.current = steps[best]
            self.rows.append(_trajectory_row(self.model, len(self.rows), "add", remaining[best], self.chosen,
                                             self.current))
        return ""

    def prune(self) -> None:
        """Drop heads one at a time while the alternative stays on top (the drop that keeps the best margin)."""
        while len(self.chosen) > 1:
            values = self.runner.evaluate([tuple(h for h in self.chosen if h != drop) for drop in self.chosen],
                                          self.metrics)
            self.passes += 1
            steps = _steps(values)
            kept = [i for i, s in enumerate(steps) if s.success]
            if not kept:
                return
            best = max(kept, key=lambda i: steps[i].objective)
            dropped = self.chosen[best]
            self.chosen = [h for h in self.chosen if h != dropped]
            self.current = steps[best]
            self.rows.append(_trajectory_row(self.model, len(self.rows), "prune", dropped, self.chosen,
                                             self.current))

    def final_logits(self) -> torch.Tensor:
        """The first prompt's final-position log-probabilities with the chosen heads ablated."""
        if not self.chosen:
            return self.runner.clean_logits[0][-1]
        final = self.runner.evaluate([tuple(self.chosen)], AnswerMetrics(keep_logprobs=True), prompt_indices=[0])
        return final["logprobs"][0, 0]


def targeted_search(model: Any, prompts: PromptPairs, alternative: Any = None,
                    ablation: Optional[Ablation] = None, budget: int = 10, prune: bool = True,
                    candidates: Optional[Sequence[HeadRef] | str] = None, k: int = 10, engine: str = "replay",
                    max_batch_tokens: int = DEFAULT_BATCH_TOKENS, runner: Optional[AblationRunner] = None,
                    progress: Optional[ProgressCallback] = None) -> TargetedResult:
    """Greedily find heads whose joint ablation makes ``alternative`` the top prediction, then prune them.

    ``alternative``: a token text such as ``" John"`` (must be one token),
    a token id, or one id per prompt; ``None`` uses the prompts'
    alternatives. ``budget``: the most heads the set may hold (at least 1).
    ``candidates``: heads the search may use (default: all).
    """
    started = time.perf_counter()
    if budget is None or int(budget) < 1:
        raise InputError("The budget must allow at least one head (it is the most heads the search may ablate).")
    budget = int(budget)
    pool = _candidate_pool(candidates, int(model.cfg.n_layers), int(model.cfg.n_heads))
    alternative_ids = alternative_token_ids(model, prompts, alternative)
    report(progress, 0.0, "clean run")
    if runner is None:
        runner = AblationRunner(model, prompts, ablation or zero_ablation(model), engine=engine,
                                max_batch_tokens=max_batch_tokens, progress=scaled(progress, 0.0, 0.05))
    original_ids = [int(runner.clean_logits[i][-1].argmax()) for i in range(len(prompts))]
    metrics = AnswerMetrics(target_ids=original_ids, alternative_ids=alternative_ids)
    clean = clean_metrics(runner, metrics)
    start = _Step(clean["alternative_margin"], clean)
    search = _Search(model, runner, metrics, start, [_trajectory_row(model, 0, "clean", None, [], start)])
    reason = "the alternative is already the top prediction" if start.success else search.grow(pool, budget, progress)
    found = search.current.success
    greedy = list(search.chosen)
    if found and not reason:
        reason = "the alternative is the top prediction"
    if found and prune:
        report(progress, 0.85, "pruning")
        search.prune()
    first_clean = runner.clean_logits[0][-1]
    final_logits = search.final_logits()
    report(progress, 1.0, "done")
    return TargetedResult(
        alternative=model.to_single_str_token(alternative_ids[0]), alternative_ids=alternative_ids,
        heads=search.chosen, greedy_heads=greedy, found=found, reason=reason, trajectory=pd.DataFrame(search.rows),
        clean_top=top_k_table(model, first_clean, k), final_shift=prediction_shift(model, first_clean, final_logits, k),
        budget=budget, kind=runner.ablation.kind, n_prompts=len(prompts), passes=search.passes, engine=runner.engine,
        seconds=time.perf_counter() - started)


def _trajectory_row(model: Any, step: int, action: str, head: Optional[HeadRef], chosen: list[HeadRef],
                    state: _Step) -> dict[str, Any]:
    values = state.values
    return {
        "step": step, "action": action, "head": "" if head is None else str(head),
        "heads": ", ".join(str(h) for h in chosen), "n_heads": len(chosen),
        "alternative_prob": float(values["alternative_prob"].float().mean()),
        "original_prob": float(values["target_prob"].float().mean()),
        "margin": state.objective,
        "alternative_top_share": float((state.margin > 0).float().mean()),
        "top_token": model.to_single_str_token(int(values["top_id"][0])),
    }
