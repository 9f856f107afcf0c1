"""Behaviour classification of heads from their metrics, with a confidence in [0, 1].

Rule (one per behaviour, see :data:`RULES`): each behaviour reads one score
of the head (a metric, or for local/positional ``local_attention -
previous_token``: attention to the last few tokens that is *not* the previous
token). A head holds the behaviour when its score reaches the behaviour's
absolute ``threshold``. Its confidence combines how far past the threshold
the score is and how extreme it is among all heads of the model::

    strength   = clip((score - threshold) / (saturation - threshold), 0, 1)
    rarity     = fraction of the model's other heads with a lower score
    confidence = (1 + strength) / 2 * (1 + rarity) / 2

so a head just at the threshold and no higher than most heads gets 0.25, one
at saturation and above every other head gets 1. With a single head there is
nothing to compare with and ``rarity`` is taken as 1 (absolute test only).

A head can hold several behaviours (an induction head is often a copying
head too). Its main ``behaviour`` is the one with the highest confidence,
except that attention-sink is named only when nothing else is: most heads of
trained models park attention on position 0 when idle, so the sink is the
least specific label. Heads holding none are ``unclassified``, with
confidence ``1 - max(score / threshold)`` over the behaviours (how clearly
every score stays below its threshold).

Calibration (:mod:`headvis_core.atlas.calibration`): each threshold is
``max(floor, the largest score of any head of a baseline)``, the baseline
being the same model with every attention parameter's entries shuffled (no
learned head structure, same weight statistics), on the same probe; so no head
of the baseline holds any behaviour. Set from SmolLM2-135M on the built-in
prompts (64 sequences of up to 128 tokens, seed 0); baseline maxima:
induction 0.105, previous-token 0.264, duplicate-token 0.170 (all under
their floor of 0.3), local/positional 0.564 (threshold raised from 0.4 to
0.57), attention sink 0.445 (under its floor 0.6), direct copying 0.093
logits (threshold 0.1), retrieval 0.348 (threshold 0.35). Where another
model's baseline goes higher, :data:`MODEL_THRESHOLDS` raises that model's
threshold: Gemma 3 270M's baseline reaches 0.434 on retrieval (threshold
0.44); its other maxima stay under SmolLM2's thresholds. The copying class
reads the direct copying score on text, not the OV eigenvalue score: the
baseline's OV scores stay under 0.15, yet 160 of SmolLM2's 270 heads exceed
that, because its tied embeddings make ``W_E W_V W_O W_U`` score high for most
heads whatever they attend to.
"""

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pandas as pd

UNCLASSIFIED = "unclassified"
SINK = "attention-sink"


@dataclass(frozen=True)
class BehaviourRule:
    behaviour: str
    score: Callable[[pd.DataFrame], pd.Series]
    score_label: str
    threshold: float
    saturation: float
    explanation: str


def _metric(name: str) -> Callable[[pd.DataFrame], pd.Series]:
    return lambda table: table[name]


RULES: tuple[BehaviourRule, ...] = (
    BehaviourRule("induction", _metric("induction"), "induction", 0.3, 0.7,
                  "attends from a repeated token to the token after its earlier occurrence"),
    BehaviourRule("previous-token", _metric("previous_token"), "previous_token", 0.3, 0.7,
                  "attends to the token just before"),
    BehaviourRule("duplicate-token", _metric("duplicate_token"), "duplicate_token", 0.3, 0.7,
                  "attends to earlier occurrences of the current token"),
    BehaviourRule("copying", _metric("direct_copying"), "direct_copying", 0.1, 0.3,
                  "on real text, its output raises the logit of the token it attends to (as a name mover does)"),
    BehaviourRule("retrieval", _metric("retrieval"), "retrieval", 0.35, 0.5,
                  "attends from the answer position of a factual prompt to the entity it asks about"),
    BehaviourRule("local/positional", lambda t: t["local_attention"] - t["previous_token"],
                  "local_attention - previous_token", 0.57, 0.85,
                  "attends within the last four tokens, other than the previous one"),
    BehaviourRule(SINK, _metric("attention_sink"), "attention_sink", 0.6, 0.95,
                  "parks its attention on position 0 / BOS"),
)
BEHAVIOURS = tuple(rule.behaviour for rule in RULES)
# Thresholds raised for one model where its own shuffled-heads baseline goes past the rule's threshold.
MODEL_THRESHOLDS: dict[str, dict[str, float]] = {
    "gemma-3-270m": {"retrieval": 0.44},
}


def rules_for(model_name: str = "") -> tuple[BehaviourRule, ...]:
    """:data:`RULES` with ``model_name``'s calibrated thresholds (saturation kept above the threshold)."""
    overrides = MODEL_THRESHOLDS.get(model_name, {})
    return tuple(replace(rule, threshold=overrides[rule.behaviour],
                         saturation=max(rule.saturation, overrides[rule.behaviour] + 0.1))
                 if rule.behaviour in overrides else rule for rule in RULES)


def _rarity(score: np.ndarray) -> np.ndarray:
    """For each head, the fraction of the other heads with a strictly lower score (NaN scores rank lowest)."""
    n = len(score)
    if n <= 1:
        return np.ones(n)
    filled = np.where(np.isnan(score), -np.inf, score)
    lower = (filled[None, :] < filled[:, None]).sum(1)
    return lower / (n - 1)


def behaviour_confidences(table: pd.DataFrame, model_name: str = "") -> pd.DataFrame:
    """``[heads, behaviours]`` confidence of each behaviour per head (0 where the head does not hold it)."""
    out = {}
    for rule in rules_for(model_name):
        score = rule.score(table).to_numpy(dtype=float)
        strength = np.clip((score - rule.threshold) / (rule.saturation - rule.threshold), 0.0, 1.0)
        confidence = (1 + strength) / 2 * (1 + _rarity(score)) / 2
        held = np.nan_to_num(score, nan=-np.inf) >= rule.threshold
        out[rule.behaviour] = np.where(held, confidence, 0.0)
    return pd.DataFrame(out, index=table.index)


def classify_heads(table: pd.DataFrame, model_name: str = "") -> pd.DataFrame:
    """Add ``behaviour``, ``confidence`` and ``behaviours`` (all held, strongest first) to a metrics table.

    ``table`` needs the metric columns the rules read (see :data:`RULES`); ``model_name`` picks that
    model's calibrated thresholds where it has its own (:data:`MODEL_THRESHOLDS`).
    """
    rules = rules_for(model_name)
    confidences = behaviour_confidences(table, model_name)
    ratios = pd.DataFrame({rule.behaviour: (rule.score(table) / rule.threshold).clip(lower=0)
                           for rule in rules}, index=table.index)
    main, main_conf, held_lists = [], [], []
    for index in table.index:
        row = confidences.loc[index]
        held = row[row > 0].sort_values(ascending=False, kind="stable")
        specific = held.drop(SINK, errors="ignore")
        if len(specific):
            main.append(specific.index[0])
            main_conf.append(float(specific.iloc[0]))
        elif len(held):
            main.append(SINK)
            main_conf.append(float(held.iloc[0]))
        else:
            main.append(UNCLASSIFIED)
            worst = np.nanmax(ratios.loc[index].to_numpy(dtype=float)) if ratios.loc[index].notna().any() else 0.0
            main_conf.append(float(np.clip(1.0 - worst, 0.0, 1.0)))
        held_lists.append(", ".join(f"{name} {value:.2f}" for name, value in held.items()))
    out = table.copy()
    out["behaviour"] = main
    out["confidence"] = np.round(main_conf, 4)
    out["behaviours"] = held_lists
    return out


def rules_table(model_name: str = "") -> pd.DataFrame:
    """The classification rule as a table, for the page and the report."""
    return pd.DataFrame([{"behaviour": r.behaviour, "score": r.score_label, "threshold": r.threshold,
                          "saturation": r.saturation,
                          "meaning": r.explanation} for r in rules_for(model_name)])
