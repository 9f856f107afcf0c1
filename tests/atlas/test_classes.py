import numpy as np
import pandas as pd
import pytest

from headvis_core.atlas.classes import (
    BEHAVIOURS,
    RULES,
    UNCLASSIFIED,
    behaviour_confidences,
    classify_heads,
    rules_table,
)

QUIET = dict(previous_token=0.05, induction=0.01, duplicate_token=0.05, copying=0.0, direct_copying=0.0,
             retrieval=0.0, local_attention=0.1, attention_sink=0.3)


def table(*rows):
    return pd.DataFrame([{**QUIET, **row} for row in rows])


def test_each_behaviour_is_found_by_its_own_score():
    t = classify_heads(table(dict(previous_token=0.9, local_attention=0.95), dict(induction=0.8),
                             dict(duplicate_token=0.6), dict(direct_copying=0.4), dict(retrieval=0.6),
                             dict(local_attention=0.9), dict(attention_sink=0.97), dict(copying=0.99), {}))
    assert list(t.behaviour) == ["previous-token", "induction", "duplicate-token", "copying", "retrieval",
                                 "local/positional", "attention-sink", UNCLASSIFIED, UNCLASSIFIED]
    # a previous-token head is local too, but local/positional counts only what is not the previous token
    assert "local/positional" not in t.behaviours[0]


def test_confidence_rule_at_threshold_and_saturation():
    rule = {r.behaviour: r for r in RULES}["induction"]
    t = classify_heads(table(dict(induction=rule.threshold), dict(induction=rule.saturation), {}, {}))
    # at the threshold: strength 0; one of three other heads lower -> rarity 2/3
    assert t.confidence[0] == pytest.approx(0.5 * (1 + 2 / 3) / 2, abs=1e-4)
    # at saturation and above all others: 1
    assert t.confidence[1] == pytest.approx(1.0)
    below = classify_heads(table(dict(induction=rule.threshold - 1e-6), {}))
    assert below.behaviour[0] == UNCLASSIFIED


def test_several_behaviours_and_the_sink_only_when_nothing_else_holds():
    t = classify_heads(table(dict(induction=0.75, direct_copying=0.35, attention_sink=0.9), dict(attention_sink=0.9)))
    assert t.behaviour[0] == "induction"
    held = [part.split()[0] for part in t.behaviours[0].split(", ")]
    assert set(held) == {"induction", "copying", "attention-sink"}
    assert t.behaviour[1] == "attention-sink"


def test_unclassified_confidence_says_how_far_below_the_thresholds():
    t = classify_heads(table({}, dict(previous_token=0.27)))
    rule = {r.behaviour: r for r in RULES}["previous-token"]
    assert t.behaviour.tolist() == [UNCLASSIFIED, UNCLASSIFIED]
    assert t.confidence[1] == pytest.approx(1 - 0.27 / rule.threshold, abs=1e-4)
    assert t.confidence[0] > t.confidence[1]


def test_confidences_stay_in_unit_interval_and_grow_with_the_score():
    rng = np.random.default_rng(0)
    rows = [{name: float(rng.uniform(-1 if "copying" in name else 0, 1)) for name in QUIET} for _ in range(60)]
    rows[0]["duplicate_token"] = np.nan  # no repeated tokens in the probe
    conf = behaviour_confidences(table(*rows))
    assert ((conf >= 0) & (conf <= 1)).all().all()
    assert conf.loc[0, "duplicate-token"] == 0
    t = classify_heads(table(*rows))
    assert t.confidence.between(0, 1).all() and set(t.behaviour) <= set(BEHAVIOURS) | {UNCLASSIFIED}
    weaker, stronger = [dict(r) for r in rows], [dict(r) for r in rows]
    weaker[5]["induction"], stronger[5]["induction"] = 0.4, 0.6
    assert 0 < behaviour_confidences(table(*weaker)).loc[5, "induction"] < \
        behaviour_confidences(table(*stronger)).loc[5, "induction"]


def test_a_single_head_is_judged_on_absolute_thresholds():
    t = classify_heads(table(dict(previous_token=0.7)))
    assert t.behaviour[0] == "previous-token" and t.confidence[0] == pytest.approx(1.0)


def test_rules_table_lists_every_behaviour():
    rules = rules_table()
    assert list(rules.behaviour) == list(BEHAVIOURS)
    assert (rules.threshold < rules.saturation).all()


def test_a_model_with_its_own_calibration_gets_its_thresholds():
    from headvis_core.atlas.classes import MODEL_THRESHOLDS, rules_for

    raised = MODEL_THRESHOLDS["gemma-3-270m"]["retrieval"]
    default = {r.behaviour: r for r in RULES}["retrieval"].threshold
    assert raised > default
    score = (default + raised) / 2  # past the default threshold, short of Gemma's
    heads = table(dict(retrieval=score), {})
    assert classify_heads(heads).behaviour[0] == "retrieval"
    assert classify_heads(heads, "gemma-3-270m").behaviour[0] == UNCLASSIFIED
    assert all(r.threshold < r.saturation for r in rules_for("gemma-3-270m"))
    assert rules_table("gemma-3-270m").set_index("behaviour").threshold["retrieval"] == raised
