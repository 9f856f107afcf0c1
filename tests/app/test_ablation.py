"""The Ablation page driven with AppTest: runs, results shared with other pages, error paths, save/reopen."""

import pandas as pd
import pytest

import headvis_ui as ui
from headvis_core.ablation import experiments
from headvis_core.heads import HeadRef
from tests.app import bound_params
from tests.conftest import app_test

PAGE = "pages/4_Ablation.py"


def _key():
    from headvis_core.models.loader import load_model

    return ui.model_key(load_model("tiny-llama", device="cpu"))


def _errors(at):
    return [e.value for e in at.error]


def _run(at):
    at.button(key="abl_run").click().run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def saved_dir(tmp_path, monkeypatch):
    folder = tmp_path / "experiments"
    monkeypatch.setattr(experiments, "experiments_dir", lambda: folder)
    return folder


def test_kl_ranking_shows_heatmap_table_predictions_and_shares_importance():
    at = app_test(PAGE).run()
    assert not at.exception and not _errors(at)
    assert any("Run ablation" in i.value for i in at.info)
    _run(at)
    assert not _errors(at)
    assert len(at.get("plotly_chart")) == 1
    table = at.dataframe[0].value
    assert len(table) == 8 and table["importance"].is_monotonic_decreasing
    assert {"layer", "head", "importance", "kl"} <= set(table.columns)
    importance = at.session_state[f"{ui.ABLATION_IMPORTANCE}@{_key()}"]
    assert list(importance.columns) == ["layer", "head", "importance"] and len(importance) == 8
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Download CSV" in labels and "Download figure (HTML)" in labels
    # Before/after predictions for a top head.
    assert at.selectbox(key="abl_shift_head").options[0] == table["label"].iloc[0]
    assert {"prob_before", "prob_after"} <= set(at.dataframe[2].value.columns)
    at.number_input(key="abl_n_send").set_value(3)
    at.button(key="abl_send").click().run()
    sent = at.session_state[f"{ui.GRAPH_HEADS}@{_key()}"]
    assert sent == [HeadRef(int(r.layer), int(r.head)) for r in table.head(3).itertuples()]
    assert bound_params(at) == {"source", "prompt", "kind", "mode", "metric"}


def test_targeted_search_shows_the_set_and_trajectory():
    at = app_test(PAGE, mode="targeted", budget=8).run()
    assert at.number_input(key="budget").value == 8
    pick = at.selectbox(key="abl_alt_pick")
    assert len(pick.options) == 10 and pick.options[-1] == "Type a token..."
    _run(at)
    assert not _errors(at)
    summary = (at.success or at.info)[0].value
    assert "top prediction" in summary
    assert len(at.get("plotly_chart")) == 1
    trajectory = at.dataframe[0].value
    assert trajectory["action"].iloc[0] == "clean" and "alternative_prob" in trajectory.columns
    assert at.query_params["mode"] == "targeted" and at.query_params["budget"] == "8"
    assert bound_params(at) == {"source", "prompt", "kind", "mode", "budget"}


def test_empty_prompt_is_an_error():
    at = app_test(PAGE).run()
    at.text_area(key="prompt").set_value("   ")
    _run(at)
    assert any("prompt is empty" in e for e in _errors(at))
    assert not at.get("plotly_chart")


def test_multi_token_target_says_how_it_tokenizes():
    at = app_test(PAGE, mode="targeted").run()
    at.selectbox(key="abl_alt_pick").set_value("Type a token...").run()
    at.text_input(key="alt").set_value("ab")
    _run(at)
    assert any("tokenizes into 2 tokens ['a', 'b']" in e for e in _errors(at)), _errors(at)


def test_budget_zero_is_an_error():
    at = app_test(PAGE, mode="targeted").run()
    at.number_input(key="budget").set_value(0)
    _run(at)
    assert any("budget" in e for e in _errors(at))


def test_mean_ablation_over_prompts_of_mixed_lengths_is_an_error():
    at = app_test(PAGE, source="set", set="ioi", kind="mean").run()
    assert at.radio(key="source").value == "set" and at.selectbox(key="kind").value == "mean"
    _run(at)
    assert any("one length" in e for e in _errors(at)), _errors(at)


def test_ioi_preset_on_a_byte_level_model_explains_why_not():
    at = app_test(PAGE, source="ioi").run()
    assert not at.exception
    assert any("single tokens" in e for e in _errors(at))


def test_induction_preset_ranks_by_loss():
    at = app_test(PAGE, source="induction", metric="loss", n=2).run()
    at.number_input(key="abl_half").set_value(6)
    _run(at)
    assert not _errors(at)
    assert "loss_rise" in at.dataframe[0].value.columns


def test_save_and_reopen_an_experiment(saved_dir):
    at = _run(app_test(PAGE).run())
    at.text_input(key="abl_filename").set_value("my run")
    at.button(key="abl_save").click().run()
    assert not _errors(at) and (saved_dir / "my run.json").is_file()
    ranked = at.dataframe[0].value

    fresh = app_test(PAGE).run()
    assert fresh.selectbox(key="abl_saved").options == ["my run.json"]
    fresh.button(key="abl_open").click().run()
    assert not fresh.exception and not _errors(fresh)
    pd.testing.assert_frame_equal(fresh.dataframe[0].value, ranked, check_dtype=False)

    (saved_dir / "broken.json").write_text('{"format": "headvis-ablation-experiment", "mo')
    broken = app_test(PAGE).run()
    broken.selectbox(key="abl_saved").set_value(saved_dir / "broken.json")
    broken.button(key="abl_open").click().run()
    assert any("corrupt" in e for e in _errors(broken)), _errors(broken)


def test_script_tokens_in_the_prompt_are_not_run_as_html():
    at = app_test(PAGE).run()
    at.text_area(key="prompt").set_value("<script>alert(1)</script> hi")
    _run(at)
    assert not _errors(at)
    assert not at.get("html")  # nothing rendered as raw HTML
    assert all("<script>" not in m.value for m in at.markdown)


def test_ioi_preset_on_smollm2_shows_the_skipped_names(smollm2):
    at = app_test(PAGE, model="smollm2-135m", source="ioi", n=4).run()
    assert not at.exception and not _errors(at)
    caption = next(c.value for c in at.caption if "IOI prompts" in c.value)
    assert "Skipped" in caption and "names that are not one token" in caption


def test_choosing_a_preset_picks_its_metric():
    at = app_test(PAGE).run()
    assert at.selectbox(key="metric").value == "kl"
    at.radio(key="source").set_value("induction").run()
    assert at.selectbox(key="metric").value == "loss" and at.query_params["metric"] == "loss"
    at.radio(key="source").set_value("prompt").run()
    assert at.selectbox(key="metric").value == "kl"


def test_the_url_reopens_the_same_setup():
    at = app_test(PAGE, source="induction", n=3, kind="mean", mode="kl", metric="loss").run()
    assert not at.exception and not _errors(at)
    assert at.radio(key="source").value == "induction" and at.number_input(key="n").value == 3
    assert at.selectbox(key="kind").value == "mean" and at.selectbox(key="metric").value == "loss"
    at = app_test(PAGE, source="set", set="induction", mode="targeted", alt=" x", budget=3).run()
    assert not at.exception and not _errors(at)
    assert at.selectbox(key="set").value == "induction" and at.number_input(key="budget").value == 3
    assert at.selectbox(key="abl_alt_pick").value == "Type a token..." and at.text_input(key="alt").value == " x"
    at = app_test(PAGE, prompt="The cat sat on the").run()
    assert at.text_area(key="prompt").value == "The cat sat on the"


@pytest.mark.parametrize("query", [
    {"source": "<script>", "kind": "nan", "mode": "everything", "metric": "1e309"},
    {"source": "ioi", "n": "-4"},
    {"source": "induction", "n": "abc"},
    {"source": "set", "set": "../../etc/passwd"},
    {"mode": "targeted", "budget": "1e9"},
    {"mode": "targeted", "budget": "nan"},
    {"mode": "targeted", "budget": "inf"},
    {"source": "induction", "n": "-1e400"},
])
def test_hostile_url_values_give_defaults(query):
    at = app_test(PAGE, **query).run()
    assert not at.exception
    assert at.radio(key="source").value == (query["source"] if query.get("source") in ("ioi", "induction", "set")
                                            else "prompt")
    assert at.selectbox(key="kind").value == "zero"
    if "n" in query:
        assert at.number_input(key="n").value == 8
    if "set" in query:
        assert at.selectbox(key="set").value == "ioi"
    if "budget" in query:
        assert at.number_input(key="budget").value == 10
    assert all("Traceback" not in e for e in _errors(at))
