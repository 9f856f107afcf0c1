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


@pytest.fixture(autouse=True)
def fresh_store(tmp_path, monkeypatch):
    """An empty result store per test: what a test sees stored is what it ran itself."""
    monkeypatch.setenv("HEADVIS_STORE_DIR", str(tmp_path / "store"))


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


def counting(monkeypatch, module, name) -> list:
    """Count calls of ``module.name`` (the page imports it afresh on every run)."""
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _stored_caption(at) -> str:
    return next(c.value for c in at.caption if c.value.startswith("This result: computed at "))


def test_a_reopened_kl_ranking_shows_at_once_from_the_store_and_recompute_computes_it(monkeypatch):
    from headvis_core.ablation import ranking

    calls = counting(monkeypatch, ranking, "rank_heads_by_ablation")
    first = _run(app_test(PAGE).run())
    assert len(calls) == 1 and "just now" in _stored_caption(first)
    ranked = first.dataframe[0].value
    reopened = app_test(PAGE).run()  # a new session (a restart, a shared URL): no button pressed
    assert not reopened.exception and not _errors(reopened)
    assert len(calls) == 1 and "from the store" in _stored_caption(reopened)
    pd.testing.assert_frame_equal(reopened.dataframe[0].value, ranked)
    importance = reopened.session_state[f"{ui.ABLATION_IMPORTANCE}@{_key()}"]
    assert len(importance) == 8  # a stored ranking is shared with the circuit graph like a fresh one
    reopened.button(key="abl_recompute").click().run()
    assert not reopened.exception and len(calls) == 2 and "just now" in _stored_caption(reopened)
    other = app_test(PAGE, prompt="The cat sat on the").run()  # other inputs: nothing stored for them
    assert not other.exception and any("Run ablation" in i.value for i in other.info)


def test_an_opened_experiment_file_is_not_replaced_by_a_stored_result(saved_dir):
    at = _run(app_test(PAGE).run())
    at.text_input(key="abl_filename").set_value("kept")
    at.button(key="abl_save").click().run()
    fresh = app_test(PAGE, prompt="The cat sat on the").run()
    fresh.button(key="abl_open").click().run()
    fresh.run()
    assert not fresh.exception and not _errors(fresh)
    assert len(fresh.dataframe[0].value) == 8
    assert not any(c.value.startswith("This result: computed at ") for c in fresh.caption)  # a file, not the store


def test_the_estimate_mode_shows_every_head_the_refined_ones_and_their_agreement():
    from headvis_core.ablation.estimate import estimate_heads, refine_estimate
    from headvis_core.ablation.values import zero_ablation
    from headvis_core.data.prompt_pairs import prompts_from_texts
    from headvis_core.models.loader import load_model

    at = app_test(PAGE, mode="estimate", refine=5).run()
    assert not at.exception and not _errors(at)
    assert at.number_input(key="refine").value == 5
    _run(at)
    assert not _errors(at)
    table = at.dataframe[0].value
    assert len(table) == 8 and table["estimate"].is_monotonic_decreasing
    assert table["exact"].notna().sum() == 5 and table["exact"].head(5).notna().all()
    metrics = {m.label: m.value for m in at.metric}
    # the same flow run directly gives the same agreement figures
    model = load_model("tiny-llama", device="cpu").model
    prompts = prompts_from_texts(model, [at.text_area(key="prompt").value])
    ablation = zero_ablation(model)
    refined = refine_estimate(model, prompts, estimate_heads(model, prompts, ablation, metric="kl"), 5,
                              ablation=ablation)
    rho = refined.agreement.to_dict()["spearman"]
    assert metrics["Spearman (estimate vs exact)"] == ("undefined" if rho is None else f"{rho:.2f}")
    assert metrics["Top-5 overlap"] == f"{refined.agreement.top_k_overlap} of 5"
    assert any("compares the refined heads with themselves" in c.value for c in at.caption)  # 5 refined <= 10
    assert table["exact"].dropna().tolist() == pytest.approx(refined.table["exact"].dropna().tolist())
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # the estimate's heatmap and estimate against exact
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Download estimate vs exact (HTML)" in labels and "Download CSV" in labels
    assert not any(b.key == "abl_save" for b in at.button)  # an estimate is not an experiment file
    assert bound_params(at) == {"source", "prompt", "kind", "mode", "metric", "refine"}
    reopened = app_test(PAGE, mode="estimate", refine=5).run()
    assert not reopened.exception and "from the store" in _stored_caption(reopened)
    assert len(reopened.get("plotly_chart")) == 2


def test_an_ablation_over_the_memory_cap_is_refused_and_a_stored_one_still_shows(monkeypatch):
    from headvis_core.ablation import ranking

    _run(app_test(PAGE).run())
    calls = counting(monkeypatch, ranking, "rank_heads_by_ablation")
    monkeypatch.setenv("HEADVIS_MEMORY_CAP_GB", "0.01")  # under what this process already holds
    stored = app_test(PAGE).run()
    assert not stored.exception and not _errors(stored) and len(stored.dataframe[0].value) == 8
    refused = _run(app_test(PAGE, prompt="The cat sat on the").run())
    assert calls == []
    assert any("needs about" in e and "over the limit of" in e for e in _errors(refused)), _errors(refused)
