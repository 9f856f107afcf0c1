"""Sweep plans: expansion over slot values, tokenization, positions on real tokenizers, bad input."""

import pytest

from headvis_core.errors import InputError
from headvis_core.sweeps.plan import SweepSpec, build_plan, check_slots_used, expand_values, tokenization_report
from headvis_core.sweeps.presets import preset
from headvis_core.sweeps.slots import MAX_VALUES

YEAR = "The war lasted from the year {year} to the year"
GREATER_THAN = "The {noun} lasted from the year {XX}{YY} to the year {XX}"


def test_expand_derived_values_for_greater_than():
    axes, values, total = expand_values(SweepSpec(GREATER_THAN, ("year=1702..1798", "XX=year[:2]", "YY=year[2:]",
                                                                 "noun=war")))
    assert axes == ["year"] and total == 97  # a one-value slot is a constant, not an axis
    first = values.iloc[0]
    assert (first["year"], first["XX"], first["YY"], first["noun"]) == (1702, "17", "02", "war")


def test_expand_two_slots_and_companions():
    axes, values, total = expand_values(SweepSpec("{city} in {country}, {year}",
                                                  ("year=2000..2002", "city=@sweeps:foreign_cities")))
    assert axes == ["year", "city"] and total == 3 * 16 and len(values) == total
    assert set(values[values.city == "Tokyo"].country) == {"Japan"}


def test_expand_refuses_undefined_and_loops():
    with pytest.raises(InputError, match=r"\{noun\} is used but not defined \(defined: year\)"):
        expand_values(SweepSpec("The {noun} of {year}", ("year=1..3",)))
    with pytest.raises(InputError, match=r"derived from \{yaer\}, which is not defined"):
        expand_values(SweepSpec("{year} {XX}", ("year=1..3", "XX=yaer[:2]")))
    with pytest.raises(InputError, match="loop"):
        expand_values(SweepSpec("{a} {b} {y}", ("y=1..2", "a=b+1", "b=a+1")))
    with pytest.raises(InputError, match="At most two slots"):
        expand_values(SweepSpec("{a}{b}{c}", ("a=1..2", "b=1..2", "c=1..2")))


def test_an_unused_slot_is_refused_in_the_plan_itself(tiny_gpt2):
    """An extra slot the template never uses would repeat every prompt per value (a grid instead of a curve)."""
    spec = SweepSpec("In {year} it ended.", ("year=1..3", "noun=war,feud"))
    with pytest.raises(InputError, match="noun is defined but not used"):
        check_slots_used(spec)
    with pytest.raises(InputError, match="noun is defined but not used"):
        expand_values(spec)
    with pytest.raises(InputError, match="noun is defined but not used"):
        build_plan(tiny_gpt2.model, spec)
    # used by an answer, a position, greater-than, a derived slot or a list file's companion field: all fine
    check_slots_used(SweepSpec("In {year} it", ("year=1..3", "noun=war,feud"), answers=(" {noun}",)))
    check_slots_used(SweepSpec("In {year} the {noun}", ("year=1..3", "noun=a,b"), key="noun:first"))
    check_slots_used(SweepSpec(GREATER_THAN, ("year=1702..1798", "XX=year[:2]", "YY=year[2:]", "noun=war"),
                               greater_than="YY"))
    check_slots_used(SweepSpec("{city} in {year}", ("year=1..2", "city=@sweeps:foreign_cities")))
    check_slots_used(SweepSpec("Visit {country} in {year}", ("year=1..2", "city=@sweeps:foreign_cities")))
    with pytest.raises(InputError, match="XX, YY are defined but not used"):
        check_slots_used(SweepSpec("In {year}", ("year=1..3", "XX=year[:2]", "YY=year[2:]")))


def test_expand_refuses_too_many_values_and_samples():
    with pytest.raises(InputError, match=r"100,001 combinations.*sample"):
        expand_values(SweepSpec("{n}", (f"n=0..{MAX_VALUES}",)))
    _, values, total = expand_values(SweepSpec("{a} {b}", ("a=0..999", "b=0..999")), sample=50, seed=1)
    assert total == 1_000_000 and len(values) == 50 and len(values.drop_duplicates()) == 50
    _, again, _ = expand_values(SweepSpec("{a} {b}", ("a=0..999", "b=0..999")), sample=50, seed=1)
    assert values.equals(again)


def test_byte_tokenizer_positions(tiny_gpt2):
    plan = build_plan(tiny_gpt2.model, SweepSpec("When [[Ann]] met {name}, {name} left", ("name=Bo,Cyd",),
                                                 query="name#2:last", key="mark:first"))
    assert plan.n_prefix == 1
    for i, text in enumerate(plan.texts):  # one byte, one token: index = BOS + character index
        second = text.rindex(plan.values.name[i])
        assert plan.query_pos[i] == 1 + second + len(plan.values.name[i]) - 1
        assert plan.key_pos[i] == 1 + text.index("Ann")
    assert list(plan.odd_values.name) == ["Cyd"]  # one token longer than the (first-seen) majority


def test_smollm2_digit_years(smollm2):
    model = smollm2.model
    plan = build_plan(model, SweepSpec(YEAR, ("year=1000..1999:37",), query="year:last", key="year:first"))
    assert set(plan.lengths) == {15} and plan.odd_values.empty  # BOS + 14: " " then four digit tokens
    for i in range(plan.n_values):
        year = str(plan.values.year[i])
        assert model.to_single_str_token(plan.token_ids[i][plan.key_pos[i]]) == year[0]
        assert model.to_single_str_token(plan.token_ids[i][plan.query_pos[i]]) == year[-1]
        # the same positions found another way: tokenize the text before the year
        start = plan.texts[i].index(year)
        before = model.to_tokens(plan.texts[i][:start], truncate=False).shape[-1]
        assert plan.key_pos[i] == before
    report = tokenization_report(model, plan)
    assert "| 1 | 0 | 0 | 0 |" in report.tokens[0]  # the report shows the digits split


def test_smollm2_greater_than_positions(smollm2):
    plan = build_plan(smollm2.model, preset("greater_than").spec)
    assert plan.n_values == 97 and plan.greater_than_refs[0] == "02"
    tokens = [smollm2.model.to_single_str_token(t) for t in plan.token_ids[0]]
    assert tokens[plan.key_pos[0]] == "0" and tokens[plan.key_pos[0] - 2:plan.key_pos[0]] == ["1", "7"]
    assert plan.query_pos[0] == plan.lengths[0] - 1


def test_odd_token_counts_reported_and_dropped(smollm2):
    spec = SweepSpec("Paris, Lyon and {city} are cities in", ("city=Nice,Bordeaux,Berlin,Lille,Rome",),
                     key="city:first")
    kept = build_plan(smollm2.model, spec)
    assert sorted(kept.odd_values.city) == ["Bordeaux", "Lille"] and kept.n_values == 5
    assert "Bordeaux" in kept.warnings[0] and "kept" in kept.warnings[0]
    dropped = build_plan(smollm2.model, spec, drop_odd_lengths=True)
    assert list(dropped.values.city) == ["Nice", "Berlin", "Rome"] and "left out" in dropped.warnings[0]


def test_position_missing_for_some_values_lists_them(tiny_llama):
    with pytest.raises(InputError, match=r"query position '7' does not exist for 1 of 2 values: w=ab"):
        build_plan(tiny_llama.model, SweepSpec("{w} x", ("w=ab,abcdefgh",), query="7", key="w:first"))
    with pytest.raises(InputError, match=r"names slot \{nope\}, which is not defined"):
        build_plan(tiny_llama.model, SweepSpec("{w} x", ("w=a,b",), key="nope:first"))
    with pytest.raises(InputError, match=r"needs 1 \[\[marked\]\] word"):
        build_plan(tiny_llama.model, SweepSpec("{w} x", ("w=a,b",), key="mark"))


def test_template_longer_than_context(tiny_llama):
    n_ctx = tiny_llama.model.cfg.n_ctx
    with pytest.raises(InputError, match=rf"longer than the model's context of {n_ctx} tokens for 1 values.*w=long"):
        build_plan(tiny_llama.model, SweepSpec("x" * (n_ctx - 10) + " {w}", ("w=a,long enough to overflow",)))


def test_bad_answers_and_greater_than(tiny_llama):
    with pytest.raises(InputError, match="not a single token for this model"):
        build_plan(tiny_llama.model, SweepSpec("{w} x", ("w=a,b",), answers=(" Mary",)))
    with pytest.raises(InputError, match=r"not a single token for 1 of 2 values .*w=bc"):
        build_plan(tiny_llama.model, SweepSpec("{w} x", ("w=a,bc",), answers=("{w}",)))
    with pytest.raises(InputError, match="same 1 to 3 digits.*w=ab"):
        build_plan(tiny_llama.model, SweepSpec("{w} x", ("w=12,ab",), greater_than="w"))
