"""Templates: slot definitions, expansion, tokenization and position resolution, bad input."""

import json

import pytest

from headvis_core.errors import InputError
from headvis_core.sweeps.templates import (
    MAX_VALUES,
    SweepSpec,
    build_plan,
    expand_values,
    load_presets,
    parse_position,
    parse_slot,
    parse_template,
    preset,
    render,
    resolve_position,
    tokenization_report,
)

YEAR = "The war lasted from the year {year} to the year"
GREATER_THAN = "The {noun} lasted from the year {XX}{YY} to the year {XX}"


# ----------------------------------------------------------------------------- slots

def test_range_slot_with_step_and_padding():
    slot = parse_slot("year=1000..1999")
    assert slot.kind == "range" and len(slot) == 1000 and slot.values[0] == 1000 and slot.values[-1] == 1999
    assert list(parse_slot("y = 1000..1010:5").values) == [1000, 1005, 1010]
    padded = parse_slot("YY=02..98")
    assert padded.text_of(padded.values[0]) == "02" and len(padded) == 97


def test_list_and_derived_slots():
    assert parse_slot("noun=war, feud ,expedition").values == ("war", "feud", "expedition")
    assert parse_slot("place=Paris, France|Lyon, France").values == ("Paris, France", "Lyon, France")
    assert parse_slot("XX=year[:2]").op == ("slice", None, 2)
    assert parse_slot("YY=year[2:]").op == ("slice", 2, None)
    assert parse_slot("d=year[0]").op == ("index", 0)
    assert parse_slot("next=year+1").op == ("offset", 1)


def test_list_files_from_prompts():
    names = parse_slot("name=@sweeps:ioi_names")
    assert "John" in names.values and "Mary" not in names.values
    assert "Mary" in parse_slot("name=@ioi_templates:names").values
    cities = parse_slot("city=@sweeps:foreign_cities")
    assert cities.companions() == ["country"] and cities.records[cities.values.index("Berlin")]["country"] == "Germany"


def test_text_list_file_and_folder_escape(tmp_path):
    (tmp_path / "colours.txt").write_text("# a comment\nred\n\ngreen\n")
    (tmp_path / "sets.json").write_text(json.dumps({"lists": {"fruit": ["apple", "pear"]}}))
    assert parse_slot("c=@colours.txt", folder=tmp_path).values == ("red", "green")
    assert parse_slot("f=@sets:fruit", folder=tmp_path).values == ("apple", "pear")
    with pytest.raises(InputError, match="no list file"):
        parse_slot("c=@../../etc/passwd", folder=tmp_path)
    with pytest.raises(InputError, match="no list 'veg'"):
        parse_slot("f=@sets:veg", folder=tmp_path)


@pytest.mark.parametrize("spec, message", [
    ("year", "not a slot definition"),
    ("year=1999..1000", "empty.*did you mean 1000..1999"),
    ("year=1..10:0", "step must be a positive"),
    ("five cities=Paris", "not a slot name"),
    ("last=1..3", "reserved"),
    ("noun=war,,feud", "empty value"),
    ("year=", "no values"),
])
def test_bad_slot_definitions(spec, message):
    with pytest.raises(InputError, match=message):
        parse_slot(spec)


# ----------------------------------------------------------------------------- template text

def test_template_slots_marks_and_braces():
    template = parse_template("When [[Mary]] and {name} met, {name} said {{hi}}")
    assert template.slot_names == ["name"] and template.n_marks == 1
    rendered = render(template, {"name": "John"})
    assert rendered.text == "When Mary and John met, John said {hi}"
    assert [rendered.text[s:e] for s, e in rendered.slot_spans["name"]] == ["John", "John"]
    assert [rendered.text[s:e] for s, e in rendered.mark_spans] == ["Mary"]


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("a {five cities} b", "not a slot name"), ("a { b", "lone"),
    ("[[a [[b]] c]]", "unbalanced or nested"), ("[[a b", "without its closing"),
])
def test_bad_templates(text, message):
    with pytest.raises(InputError, match=message):
        parse_template(text)


# ----------------------------------------------------------------------------- expansion

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


def test_expand_refuses_too_many_values_and_samples():
    with pytest.raises(InputError, match=r"100,001 combinations.*sample"):
        expand_values(SweepSpec("{n}", (f"n=0..{MAX_VALUES}",)))
    _, values, total = expand_values(SweepSpec("{a} {b}", ("a=0..999", "b=0..999")), sample=50, seed=1)
    assert total == 1_000_000 and len(values) == 50 and len(values.drop_duplicates()) == 50
    _, again, _ = expand_values(SweepSpec("{a} {b}", ("a=0..999", "b=0..999")), sample=50, seed=1)
    assert values.equals(again)


# ----------------------------------------------------------------------------- positions

def test_parse_positions():
    assert parse_position("last").kind == "last"
    assert parse_position("year:first").edge == "first"
    spec = parse_position("{name}#2:first+1")
    assert (spec.kind, spec.name, spec.occurrence, spec.edge, spec.offset) == ("slot", "name", 2, "first", 1)
    assert parse_position("mark#2").occurrence == 2 and parse_position("-2").index == -2
    assert parse_position("year").edge == "last"
    with pytest.raises(InputError, match="not a position"):
        parse_position("year:middle")


def test_overlap_resolution_on_merged_tokens():
    # a GPT-2-like split of " 1732" into " 17" + "32": the year's first token starts before the year
    rendered = render(parse_template("from {year} on"), {"year": "1732"})
    offsets = [(0, 4), (4, 7), (7, 9), (9, 12)]  # "from", " 17", "32", " on"
    assert resolve_position(parse_position("year:first"), rendered, offsets, 1, 5) == 2
    assert resolve_position(parse_position("year:last"), rendered, offsets, 1, 5) == 3
    assert resolve_position(parse_position("year:first-3"), rendered, offsets, 1, 5) is None


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


# ----------------------------------------------------------------------------- bad input at plan time

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


def test_presets_load_and_plan(smollm2):
    presets = load_presets()
    assert {p.id for p in presets} >= {"year_range", "greater_than", "cities", "ioi_names"}
    for entry in presets:
        plan = build_plan(smollm2.model, entry.spec)
        assert plan.n_values > 10, entry.id
    with pytest.raises(InputError, match="No sweep preset called 'nope'"):
        preset("nope")
