"""Sweeps: batched results equal the one-prompt loop, greater-than, range detection, figures, CLI."""

import numpy as np
import pandas as pd
import pytest
import torch

from headvis_core.cli.main import main as cli_main
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.sweeps.greater_than import NumberTokens, greater_than_score, number_tokens
from headvis_core.sweeps.plan import SweepSpec, build_plan
from headvis_core.sweeps.presets import usable_heads
from headvis_core.sweeps.run import run_sweep, run_sweep_loop, shared_prefix_length
from headvis_core.sweeps.thresholds import curve_ranges, describe_ranges, detect_ranges
from headvis_core.viz.sweeps import sweep_figure, sweep_heatmap_figure, sweep_line_figure

GREATER_THAN = ("The {noun} lasted from the year {XX}{YY} to the year {XX}",
                ("year=1702..1705", "XX=year[:2]", "YY=year[2:]", "noun=war,feud"))


@pytest.fixture
def one_thread():
    """One intra-op thread: on a machine whose cores are busy, two spinning OpenMP threads make each small
    one-prompt pass of the reference loop many times slower (numbers are compared within one setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same(batched, loop, logit_scale=1.0):
    """Probabilities and attention to 1e-5; logits to 1e-5 of the logit scale; same top tokens."""
    assert batched.curves == loop.curves
    for column in batched.curves:
        tolerance = 1e-5 * logit_scale if column.startswith("logit") else 1e-5
        np.testing.assert_allclose(batched.table[column].to_numpy(float), loop.table[column].to_numpy(float),
                                   rtol=0, atol=tolerance, err_msg=column)
    assert (batched.table["top_token"] == loop.table["top_token"]).all()


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_batched_equals_loop_on_tiny_models(fixture, request, one_thread):
    model = request.getfixturevalue(fixture).model
    # two nouns of different lengths: two token-count groups; small batches: several chunks per group
    spec = SweepSpec(*GREATER_THAN, query="last", key="YY:first", answers=("1", "9"),
                     greater_than="YY")
    plan = build_plan(model, spec)
    assert len(set(plan.lengths)) == 2
    heads = [HeadRef(0, 1), HeadRef(1, 3), HeadRef(1, 0)]
    batched = run_sweep(model, plan, heads, batch_tokens=150)
    loop = run_sweep_loop(model, plan, heads)
    assert batched.greater_than_method == "digits"
    assert_same(batched, loop)
    assert np.isfinite(batched.table["greater_than"]).all()
    assert shared_prefix_length(plan, True) == len("The ") + 1  # BOS + "The " (the noun varies next)
    assert_same(run_sweep(model, plan, heads, batch_tokens=150, share_prefix=False), loop)
    attention_only = run_sweep(model, plan, heads, predictions=False, batch_tokens=150)
    for head in heads:
        np.testing.assert_allclose(attention_only.table[f"attn {head}"], loop.table[f"attn {head}"], atol=1e-6)
    assert "top_token" not in attention_only.table and attention_only.curves == [f"attn {h}" for h in heads]


def test_shared_prefix_with_keys_and_queries_inside_it(tiny_llama, one_thread):
    model = tiny_llama.model
    heads = [HeadRef(0, 2), HeadRef(1, 1)]
    # key (the marked name) inside the shared start, query after it
    plan = build_plan(model, SweepSpec("When [[Ann]] and Bo met {name}, {name} left", ("name=Cy,Di,Ed",),
                                       query="name#2:last", key="mark:first"))
    assert shared_prefix_length(plan, True) == 1 + len("When Ann and Bo met ")
    assert plan.key_pos.max() < shared_prefix_length(plan, True)
    assert_same(run_sweep(model, plan, heads), run_sweep_loop(model, plan, heads))
    # a query inside the shared start: the shared part ends before it
    early = build_plan(model, SweepSpec("When [[Ann]] and Bo met {name}, {name} left", ("name=Cy,Di,Ed",),
                                        query="mark:last", key="first"))
    assert shared_prefix_length(early, True) == int(early.query_pos.min())
    assert_same(run_sweep(model, early, heads), run_sweep_loop(model, early, heads))


def test_progress_and_nothing_to_measure(tiny_llama):
    plan = build_plan(tiny_llama.model, SweepSpec("a {w} b", ("w=1..20",)))
    calls = []
    run_sweep(tiny_llama.model, plan, [HeadRef(0, 0)], batch_tokens=40, progress=lambda f, m: calls.append(f))
    assert calls[0] == 0.0 and calls[-1] == 1.0 and len(calls) > 3 and calls == sorted(calls)
    with pytest.raises(InputError, match="Nothing to measure"):
        run_sweep(tiny_llama.model, plan, [], predictions=False)


def test_batched_equals_loop_on_smollm2(smollm2, one_thread):
    model = smollm2.model
    years = build_plan(model, SweepSpec("The war lasted from the year {year} to the year", ("year=1984..1988",),
                                        query="year:last", key="year:first", answers=(" ", " the")))
    heads = [HeadRef(2, 3), HeadRef(4, 4), HeadRef(23, 4)]
    batched, loop = run_sweep(model, years, heads), run_sweep_loop(model, years, heads)
    assert_same(batched, loop, logit_scale=float(np.abs(loop.table["logit[ ]"]).max()))
    # known behaviour: head 2.3 links the year's last digit to its first for every year here
    assert (batched.table["attn 2.3"] > 0.3).all()

    gt = build_plan(model, SweepSpec(*GREATER_THAN[:1], ("year=1702..1796:40", "XX=year[:2]", "YY=year[2:]",
                                                          "noun=war"), query="last", key="YY:first",
                                     greater_than="YY"))
    batched, loop = run_sweep(model, gt, heads), run_sweep_loop(model, gt, heads)
    assert_same(batched, loop, logit_scale=30.0)
    assert batched.greater_than_method == "digits"
    # SmolLM2 does greater-than: most of the number mass goes above YY
    assert (batched.table["greater_than"] > 0.5).all()
    assert np.allclose(batched.table["p_above"] - batched.table["p_at_or_below"], batched.table["greater_than"])


# ----------------------------------------------------------------------------- greater-than by hand

def test_greater_than_whole_number_tokens():
    numbers = NumberTokens("whole", 2, np.arange(100))
    probs = torch.zeros(2, 120)
    probs[0, 40], probs[0, 10], probs[0, 110] = 0.5, 0.3, 0.2  # 0.2 on a non-number token
    probs[1, 25], probs[1, 26] = 0.6, 0.4
    above, below = greater_than_score([probs], ["25", "25"], numbers)
    np.testing.assert_allclose(above, [0.5, 0.4])
    np.testing.assert_allclose(below, [0.3, 0.6])


def test_greater_than_digit_by_digit():
    numbers = NumberTokens("digits", 2, np.arange(10) + 5)  # digit d is token d + 5
    first, second = torch.zeros(1, 20), torch.zeros(1, 20)
    first[0, 5 + 3], first[0, 5 + 5], first[0, 5 + 2] = 0.5, 0.2, 0.3  # p1: 3 -> 0.5, 5 -> 0.2, 2 -> 0.3
    second[0, 5 + 7], second[0, 5 + 2] = 0.6, 0.4  # after the tied digit 3: 7 -> 0.6, 2 -> 0.4
    above, below = greater_than_score([first, second], ["35"], numbers)
    # above: p1(5) + p1(3) * p2(7 | 3) = 0.2 + 0.5 * 0.6; at or below: p1(2) + p1(3) * p2(2 | 3)
    np.testing.assert_allclose(above, [0.2 + 0.3])
    np.testing.assert_allclose(below, [0.3 + 0.2])


def test_number_tokens_by_tokenizer(tiny_llama, smollm2):
    assert number_tokens(tiny_llama.model, 2).method == "digits"  # byte tokens
    digits = number_tokens(smollm2.model, 2)
    assert digits.method == "digits" and smollm2.model.to_single_str_token(int(digits.ids[7])) == "7"


# ----------------------------------------------------------------------------- ranges

def test_detect_ranges_basic_and_edges():
    years = list(range(1000, 1010))
    curve = [0.9, 0.8, 0.2, 0.7, 0.7, 0.7, np.nan, 0.9, 0.1, 0.95]
    found = detect_ranges(years, curve, 0.5)
    assert [(r.start, r.stop, r.n_values) for r in found] == [(1000, 1001, 2), (1003, 1005, 3), (1007, 1007, 1),
                                                              (1009, 1009, 1)]
    assert found[0].peak == pytest.approx(0.9) and found[1].mean == pytest.approx(0.7)
    assert [r.label() for r in detect_ranges(years, curve, 0.5, min_length=2)] == ["1000-1001", "1003-1005"]
    merged = detect_ranges(years, curve, 0.5, max_gap=1)  # single dips at 1002, 1006 and 1008 bridged
    assert [(r.start, r.stop, r.n_values) for r in merged] == [(1000, 1009, 10)]
    gappy = [0.9, 0.1, 0.1, 0.9, 0.9]
    assert [(r.start, r.stop) for r in detect_ranges(range(5), gappy, 0.5, max_gap=1)] == [(0, 0), (3, 4)]
    assert [(r.start, r.stop) for r in detect_ranges(range(5), gappy, 0.5, max_gap=2)] == [(0, 4)]
    assert [(r.start, r.stop) for r in detect_ranges(years, curve, 0.2, above=False)] == [(1002, 1002), (1008, 1008)]
    assert detect_ranges(years, [0.0] * 10, 0.5) == []
    assert detect_ranges([], [], 0.5) == []
    with pytest.raises(InputError, match="3 values but 2"):
        detect_ranges([1, 2, 3], [0.1, 0.2], 0.5)


def test_describe_ranges():
    found = detect_ranges(list(range(1000, 1005)), [0.9, 0.9, 0.1, 0.1, 0.1], 0.5)
    assert describe_ranges(found, "year", "attn 5.1", 0.5) == \
        "attn 5.1 >= 0.5 for year 1000-1001 (2 values, peak 0.90)."
    assert describe_ranges([], "year", "attn 5.1", 0.95, [1, 2], [0.2, 0.4]) == \
        "attn 5.1 is never >= 0.95 (its max is 0.4 at year 2)."


def test_curve_ranges_and_figures_for_one_and_two_slots(tiny_llama):
    model = tiny_llama.model
    one = run_sweep(model, build_plan(model, SweepSpec("n {a} <script>", ("a=1..30",))), [HeadRef(0, 0)])
    level = float(one.table["attn 0.0"].median())
    ranges = curve_ranges(one, "attn 0.0", level)
    assert sum(r.n_values for r in ranges[None]) == int((one.table["attn 0.0"] >= level).sum())
    fig = sweep_line_figure(one, ["attn 0.0", "top_prob"], level, ranges[None])
    assert len(fig.data) == 2 and len(fig.layout.shapes) == len(ranges[None]) + 1  # ranges + level line
    assert "<script>" not in fig.to_json() and "&lt;script&gt;" in fig.to_json()  # escaped hover text

    two = run_sweep(model, build_plan(model, SweepSpec("{a} and {b}", ("a=1..6", "b=x,<b>y</b>,z"))),
                    [HeadRef(1, 2)], predictions=False)
    by_row = curve_ranges(two, "attn 1.2", 0.0)
    assert set(by_row) == {"x", "<b>y</b>", "z"} and all(r[0].n_values == 6 for r in by_row.values())
    heatmap = sweep_figure(two, ["attn 1.2"], 0.0, by_row)
    assert heatmap.data[0].type == "heatmap" and np.asarray(heatmap.data[0].z).shape == (3, 6)
    assert len(heatmap.layout.shapes) == 3 and "<b>y</b>" not in heatmap.to_json()
    with pytest.raises(InputError, match="needs a sweep over two slots"):
        sweep_heatmap_figure(one, "attn 0.0")
    with pytest.raises(InputError, match="No curve called 'nope'"):
        curve_ranges(one, "nope", 0.5)


def test_usable_heads():
    assert usable_heads("2.3, 9.9,0.1", 4, 4) == ([HeadRef(2, 3), HeadRef(0, 1)], ["9.9"])


# ----------------------------------------------------------------------------- CLI

def test_cli_sweep_writes_csv(tmp_path, capsys):
    out, figure = tmp_path / "sweep.csv", tmp_path / "sweep.html"
    status = cli_main(["sweep", "--model", "tiny-llama", "--device", "cpu",
                       "--template", "The war lasted from the year {year} to the year", "--slot", "year=1000..1039",
                       "--heads", "0.1,1.2", "--query", "year:last", "--key", "year:first", "--level", "0.01",
                       "--out", str(out), "--figure", str(figure)])
    printed = capsys.readouterr().out
    assert status == 0
    table = pd.read_csv(out)
    assert len(table) == 40 and list(table.year) == list(range(1000, 1040))
    assert {"attn 0.1", "attn 1.2", "top_token", "top_prob"} <= set(table.columns)
    assert "How sample values tokenize" in printed and "attn 0.1 >= 0.01 for year 1000-1039" in printed
    assert "<html>" in figure.read_text()


def test_cli_preset_and_errors(tmp_path, capsys):
    status = cli_main(["sweep", "--model", "tiny-llama", "--device", "cpu", "--preset", "greater_than",
                       "--slot", "year=1702..1705", "--slot", "XX=year[:2]", "--slot", "YY=year[2:]",
                       "--slot", "noun=war", "--out", str(tmp_path / "gt.csv")])
    assert status == 0 and "greater_than" in pd.read_csv(tmp_path / "gt.csv").columns
    assert cli_main(["sweep", "--list-presets"]) == 0
    capsys.readouterr()
    assert cli_main(["sweep", "--model", "tiny-llama", "--template", "The {noun}", "--slot", "year=1..3",
                     "--heads", "0.0"]) == 2
    assert "{noun} is used but not defined" in capsys.readouterr().err
    assert cli_main(["sweep", "--model", "tiny-llama", "--template", "{n}", "--slot", "n=1..200000",
                     "--heads", "0.0"]) == 2
    assert "sample" in capsys.readouterr().err
    assert cli_main(["sweep", "--model", "tiny-llama", "--device", "cpu", "--template", "{n} x", "--slot",
                     "n=1..3", "--heads", "7.7"]) == 2
    assert "out of range" in capsys.readouterr().err
