"""The Prompt sweeps page, driven with AppTest on tiny-llama: presets, runs, ranges, URL state, errors."""

import pytest

from tests.app import bound_params
from tests.conftest import app_test

PAGE = "pages/6_Prompt_sweeps.py"
YEARS = dict(template="The war lasted from the year {year} to the year", slots="year=1000..1029",
             query="year:last", key="year:first", heads="0.1,1.2")


@pytest.fixture(autouse=True)
def fresh_store(tmp_path, monkeypatch):
    """An empty result store per test: what a test sees stored is what it ran itself."""
    monkeypatch.setenv("HEADVIS_STORE_DIR", str(tmp_path / "store"))


def texts(at):
    return [t.value for t in at.text]


def errors(at):
    return " ".join(e.value for e in at.error)


def test_url_sweep_runs_and_finds_ranges():
    at = app_test(PAGE, **YEARS).run()
    assert not at.exception and not at.error
    assert at.text_area(key="template").value == YEARS["template"]
    assert at.text_input(key="heads").value == "0.1,1.2"
    report = at.dataframe[0].value
    assert len(report) == 5 and report["query"].str.endswith(":0").any()  # year 1000: last digit 0
    assert any("Run sweep" in i.value for i in at.info)

    at.button(key="sweep_run").click().run()
    assert not at.exception and not at.error
    assert at.query_params["run"] == ["1"] or at.query_params["run"] == "1"
    assert at.selectbox(key="curve").value == "attn 0.1"
    at.slider(key="level").set_value(0.0).run()
    assert "attn 0.1 >= 0 for year 1000-1029 (30 values" in texts(at)[0]
    at.slider(key="level").set_value(1.0).run()
    assert texts(at)[0].startswith("attn 0.1 is never >= 1")
    assert len(at.get("plotly_chart")) == 1
    downloads = [d.proto.label for d in at.get("download_button")]
    assert "Download CSV" in downloads and "Download figure (HTML)" in downloads
    assert at.query_params["heads"] in (["0.1,1.2"], "0.1,1.2")
    assert bound_params(at) == {"preset", "template", "slots", "heads", "query", "key", "answers", "gt", "drop_odd",
                                "predictions", "sample", "curve", "level", "side", "min_values", "max_gap"}


def test_reopening_the_url_with_run_shows_results():
    at = app_test(PAGE, run=1, curve="attn 1.2", level=0.0, **YEARS).run()
    assert not at.exception and not at.error
    assert at.selectbox(key="curve").value == "attn 1.2"
    assert texts(at)[0].startswith("attn 1.2 >= 0 for year 1000-1029")
    at = app_test(PAGE, run=1, curve="attn 0.1", level=1.0, side="below", min_values=2, max_gap=1, **YEARS).run()
    assert not at.exception and not at.error
    assert at.slider(key="level").value == 1.0 and at.radio(key="side").value == "below"
    assert (at.number_input(key="min_values").value, at.number_input(key="max_gap").value) == (2, 1)
    assert texts(at)[0].startswith("attn 0.1 <= 1 for year 1000-1029 (30 values")


@pytest.mark.parametrize("query", [
    {"level": "nan", "curve": "<script>", "side": "sideways", "min_values": "0", "max_gap": "-1"},
    {"level": "abc", "min_values": "inf", "max_gap": "1e400", "sample": "-inf", "predictions": "maybe"},
    {"level": "1e308", "preset": "../../etc/passwd", "drop_odd": "2"},
])
def test_hostile_url_values_give_defaults(query):
    at = app_test(PAGE, run=1, **YEARS, **query).run()
    assert not at.exception and not at.error
    assert at.slider(key="level").value == 0.5 and at.selectbox(key="curve").value == "attn 0.1"
    assert at.radio(key="side").value == "above" and at.number_input(key="min_values").value == 1
    assert at.number_input(key="max_gap").value == 0 and at.number_input(key="sample").value == 0
    assert at.checkbox(key="predictions").value is True and at.checkbox(key="drop_odd").value is False
    assert texts(at)[0].startswith("attn 0.1 ")


def test_presets_fill_the_form_and_greater_than_runs():
    at = app_test(PAGE).run()
    assert not at.exception
    at.selectbox(key="preset").set_value("greater_than").run()
    assert at.text_area(key="template").value.startswith("The {noun} lasted")
    assert at.text_input(key="gt").value == "YY"
    at.text_area(key="slots").set_value("year=1702..1706\nXX=year[:2]\nYY=year[2:]\nnoun=war").run()
    at.button(key="sweep_run").click().run()
    assert not at.exception and not at.error
    assert at.selectbox(key="curve").value == "greater_than"  # the preset's curve


def test_two_slots_draw_a_heatmap():
    at = app_test(PAGE, template="{a} and {b} went", slots="a=1..5\nb=x,y", heads="1.0", key="a:first").run()
    at.button(key="sweep_run").click().run()
    assert not at.exception and not at.error
    assert len(texts(at)) == 2  # ranges per value of the second slot
    assert "heatmap" in at.get("plotly_chart")[0].proto.spec


def test_selected_head_can_be_added():
    at = app_test(PAGE, layer=1, head=3, **YEARS).run()
    at.button(key="sweep_add_selected").click().run()
    assert at.text_input(key="heads").value == "0.1,1.2,1.3"


@pytest.mark.parametrize("change, message", [
    ({"slots": "year=1999..1000"}, "is empty"),
    ({"template": "The {noun} lasted"}, "{noun} is used but not defined"),
    ({"slots": "year=1..200000"}, "sample"),
    ({"heads": "7.7"}, "out of range"),
    ({"query": "year:first-60"}, "does not exist for 30 of 30 values"),
    ({"template": "x" * 300 + " {year}"}, "longer than the model's context"),
    ({"slots": "year=a..b"}, "not a range of whole numbers"),
    ({"slots": "year=1000..1029\nnoun=war,peace"}, "noun is defined but"),
    ({"slots": ""}, "Define at least one slot"),
])
def test_bad_input_shows_clear_errors(change, message):
    at = app_test(PAGE, **{**YEARS, **change}).run() if "slots" not in change or change["slots"] else None
    if at is None:  # an empty slots box cannot come from the URL: clear it in the form
        at = app_test(PAGE, **YEARS).run()
        at.text_area(key="slots").set_value("").run()
    assert not at.exception
    assert message in errors(at)
    assert not at.get("plotly_chart")


def test_script_in_values_is_not_rendered():
    at = app_test(PAGE, template="a {w} b", slots="w=<script>alert(1)</script>,<b>x</b>", heads="0.0",
                  key="w:first").run()
    at.button(key="sweep_run").click().run()
    assert not at.exception and not at.error
    assert not any("<script>" in m.value for m in at.markdown)
    assert "<script>" not in at.get("plotly_chart")[0].proto.spec


def test_heads_from_the_atlas(tiny_llama):
    import pandas as pd

    import headvis_ui as ui

    info = tiny_llama.info
    at = app_test(PAGE, **YEARS)
    at.session_state[f"{ui.ATLAS_METRICS}@{info.name}|{info.source}|{info.device}|{info.dtype}"] = pd.DataFrame(
        {"layer": [0, 1], "head": [3, 0], "behaviour": ["previous token", "induction"]})
    at.run()
    at.multiselect(key="sweep_atlas_heads").set_value(["1.0"]).run()
    at.button(key="sweep_add_atlas").click().run()
    assert not at.exception and at.text_input(key="heads").value == "0.1,1.2,1.0"


@pytest.mark.real_model
def test_year_preset_on_smollm2():
    at = app_test(PAGE, model="smollm2-135m", timeout=300, preset="year_range").run()
    assert not at.exception and not at.error
    report = at.dataframe[0].value
    assert report["tokens"].str.contains(r"\| 1 \| 0 \| 0 \| 0 \|", regex=True).any()  # digits, one by one
    at.text_area(key="slots").set_value("year=1984..1989").run()
    at.button(key="sweep_run").click().run()
    assert not at.exception and not at.error
    assert at.selectbox(key="curve").value == "attn 2.3"
    assert texts(at)[0].startswith("attn 2.3 >= 0.5 for year")


def test_the_form_survives_a_visit_to_another_page():
    at = app_test("Home.py").run()
    at.query_params.update(YEARS)
    at.switch_page("pages/6_Prompt_sweeps.py").run()
    assert not at.exception and at.title[0].value == "Prompt sweeps"
    at.text_area(key="slots").set_value("year=1500..1509").run()
    at.switch_page("pages/3_Dataset_examples.py").run()
    assert not at.exception and at.title[0].value == "Dataset examples"
    at.switch_page("pages/6_Prompt_sweeps.py").run()
    assert not at.exception and not at.error
    assert at.text_area(key="slots").value == "year=1500..1509"
    assert at.text_area(key="template").value == YEARS["template"]


def counted_sweeps(monkeypatch) -> list:
    from headvis_core.sweeps import run

    calls = []
    real = run.run_sweep

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "run_sweep", counted)
    return calls


def sweep_caption(at) -> str:
    return next(c.value for c in at.caption if c.value.startswith("Sweep: computed at "))


def test_a_stored_sweep_shows_at_once_on_reopening_and_recompute_runs_it_again(monkeypatch):
    calls = counted_sweeps(monkeypatch)
    at = app_test(PAGE, **YEARS).run()
    at.button(key="sweep_run").click().run()
    assert not at.exception and not at.error and len(calls) == 1 and "just now" in sweep_caption(at)
    table = at.dataframe[-1].value
    reopened = app_test(PAGE, **YEARS).run()  # a new session, no run=1 and no button: the store has it
    assert not reopened.exception and not reopened.error
    assert len(calls) == 1 and "from the store" in sweep_caption(reopened)
    assert reopened.dataframe[-1].value.equals(table)
    reopened.button(key="sweep_recompute").click().run()
    assert not reopened.exception and len(calls) == 2 and "just now" in sweep_caption(reopened)
    other = app_test(PAGE, **{**YEARS, "heads": "0.1"}).run()  # other heads: another result, not stored
    assert not other.exception and any("Run sweep" in i.value for i in other.info) and len(calls) == 2


def test_a_sweep_over_the_memory_cap_is_refused_before_it_runs(monkeypatch):
    calls = counted_sweeps(monkeypatch)
    monkeypatch.setenv("HEADVIS_MEMORY_CAP_GB", "0.01")  # under what this process already holds
    at = app_test(PAGE, **YEARS).run()
    at.button(key="sweep_run").click().run()
    assert not at.exception and calls == []
    assert "needs about" in errors(at) and "over the limit of" in errors(at)
