import shutil

import pandas as pd
import pytest

from tests.app import bound_params
from tests.conftest import app_test

PAGE = "pages/5_Circuit_graph.py"


def _errors(at):
    return [e.value for e in at.error]


def test_the_page_draws_the_graph_with_downloads_and_the_folding_note():
    at = app_test(PAGE, model="tiny-llama").run()
    assert not at.exception and not _errors(at)
    assert any("Layer norm is folded here" in i.value for i in at.info)
    assert any("Grouped-query attention: 4 query heads share 2 key/value heads" in c.value for c in at.caption)
    summary = next(m.value for m in at.markdown if m.value.startswith("**"))
    assert "heads," in summary and "edges." in summary
    edges = at.dataframe[0].value
    assert len(edges) > 0 and {"sender", "receiver", "kind", "ratio", "z"} <= set(edges.columns)
    labels = [b.label for b in at.get("download_button")]
    assert {"Download GraphML", "Download JSON", "Download HTML (offline)", "Download edges (CSV)"} <= set(labels)
    # unfolded weights are stated as such
    at.checkbox(key="fold").uncheck().run()
    assert any("NOT folded" in w.value for w in at.warning)
    assert bound_params(at) == {"kinds", "measure", "threshold", "top_k", "max_edges", "heads", "io", "fold"}


def test_a_threshold_that_leaves_no_edge_says_so_and_suggests_one():
    at = app_test(PAGE, model="tiny-gpt2").run()
    at.number_input(key="threshold").set_value(50.0).run()
    assert not at.exception
    assert any("No edge has ratio >= 50" in e and "Try a threshold of" in e for e in _errors(at))
    suggested = float(_errors(at)[0].split("Try a threshold of ")[1].split()[0])
    at.number_input(key="threshold").set_value(suggested).run()
    assert not _errors(at) and len(at.dataframe[0].value) > 0


def test_heads_out_of_range_and_no_kinds_are_errors():
    at = app_test(PAGE, model="tiny-gpt2").run()
    at.text_input(key="heads").set_value("1.9").run()
    assert not at.exception
    assert _errors(at) == ["Head 1.9 is out of range: this model has layers 0-1 and heads 0-3 in each layer."]
    at.text_input(key="heads").set_value("five").run()
    assert "is not a head" in _errors(at)[0]
    at.text_input(key="heads").set_value("1.2").run()
    assert not _errors(at)
    assert set(at.dataframe[0].value.receiver) | set(at.dataframe[0].value.sender) >= {"1.2"}
    at.multiselect(key="kinds").set_value([]).run()
    assert "Choose at least one composition kind" in _errors(at)[0]


def test_the_url_reopens_the_same_view():
    at = app_test(PAGE, model="tiny-gpt2", kinds="k", measure="z", top_k="1", heads="1.2").run()
    assert not at.exception and not _errors(at)
    assert at.multiselect(key="kinds").value == ["k"] and at.radio(key="measure").value == "z"
    edges = at.dataframe[0].value
    assert set(edges.kind) == {"k"} and (edges.receiver == "1.2").all() and len(edges) == 1


def test_path_patching_check_and_its_error_on_a_model_without_ioi_names():
    at = app_test(PAGE, model="tiny-gpt2").run()
    at.selectbox(key="graph_patch_set").set_value("induction")
    at.number_input(key="graph_patch_n").set_value(2)
    at.number_input(key="graph_patch_edges").set_value(3)
    at.button(key="graph_patch_run").click().run()
    assert not at.exception and not _errors(at)
    patched = at.dataframe[1].value
    assert len(patched) == 3 and {"effect", "normalized", "score", "ratio"} <= set(patched.columns)
    assert any("clean logit difference" in m.value for m in at.markdown)
    at.selectbox(key="graph_patch_set").set_value("ioi")
    at.button(key="graph_patch_run").click().run()
    assert not at.exception
    assert any("IOI names are single tokens" in e for e in _errors(at))


def test_atlas_roles_importance_and_chosen_heads_from_other_pages_are_used():
    import headvis_ui as ui
    from headvis_core.heads import HeadRef
    from headvis_core.models.loader import load_model

    model_key = ui.model_key(load_model("tiny-llama", device="cpu"))
    at = app_test(PAGE, model="tiny-llama")
    at.session_state[f"{ui.GRAPH_HEADS}@{model_key}"] = [HeadRef(1, 3)]
    at.session_state[f"{ui.ATLAS_METRICS}@{model_key}"] = pd.DataFrame(
        {"layer": [1], "head": [3], "behaviour": ["<script>alert(1)</script>"], "confidence": [0.7]})
    at.session_state[f"{ui.ABLATION_IMPORTANCE}@{model_key}"] = pd.DataFrame(
        {"layer": [1, 0], "head": [3, 1], "importance": [0.4, 0.1]})
    at.run()
    assert not at.exception and not _errors(at)
    assert at.text_input(key="heads").value == "1.3"
    summary = next(m.value for m in at.markdown if m.value.startswith("**"))
    assert "Overlaid: atlas roles, ablation importance" in summary
    edges = at.dataframe[0].value
    assert ((edges.sender == "1.3") | (edges.receiver == "1.3")).all()


def test_a_one_layer_model_cannot_compose(tmp_path):
    """A one-layer model saved with weights, opened as a local directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from headvis_core.models.random_models import RandomModelSpec, _hf_config, random_model_dir

    spec = RandomModelSpec(arch="gpt2", n_layers=1, n_heads=2, d_model=32)
    folder = tmp_path / "one-layer"
    shutil.copytree(random_model_dir(spec), folder)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_hf_config(spec)).save_pretrained(folder)
    at = app_test(PAGE, model=str(folder)).run()
    assert not at.exception
    assert any("single layer" in e for e in _errors(at))


def test_malformed_numbers_in_the_url_fall_back_to_defaults():
    at = app_test(PAGE, model="tiny-gpt2", threshold="abc", top_k="many", max_edges="1e9").run()
    assert not at.exception
    assert at.number_input(key="top_k").value == 3 and at.number_input(key="max_edges").value == 200
    assert at.number_input(key="threshold").value is None


@pytest.mark.parametrize("query", [
    {"threshold": "nan", "top_k": "-1", "max_edges": "0", "measure": "<script>", "kinds": "x,y", "io": "maybe"},
    {"threshold": "inf", "top_k": "1e400", "max_edges": "-inf", "fold": "2"},
    {"threshold": "9" * 400, "top_k": "9" * 400, "max_edges": "-" + "9" * 400},
])
def test_hostile_url_values_give_defaults(query):
    at = app_test(PAGE, model="tiny-gpt2", **query).run()
    assert not at.exception and not _errors(at)
    assert at.number_input(key="threshold").value is None and at.number_input(key="top_k").value == 3
    assert at.number_input(key="max_edges").value == 200 and at.radio(key="measure").value == "ratio"
    assert at.multiselect(key="kinds").value == ["q", "k", "v"]
    assert at.checkbox(key="io").value is False and at.checkbox(key="fold").value is True


def test_an_empty_kinds_parameter_clears_the_kinds_and_says_so():
    at = app_test(PAGE, model="tiny-gpt2", kinds="").run()
    assert not at.exception and at.multiselect(key="kinds").value == []
    assert _errors(at) == ["Choose at least one composition kind (Q, K or V)."]


def test_old_links_with_comma_lists_and_digit_flags_reopen_the_same_view():
    at = app_test(PAGE, model="tiny-gpt2", kinds="q,v", io="1", fold="0", threshold="0.5", max_edges="7").run()
    assert not at.exception and not _errors(at)
    assert at.multiselect(key="kinds").value == ["q", "v"]
    assert at.checkbox(key="io").value is True and at.checkbox(key="fold").value is False
    assert at.number_input(key="threshold").value == 0.5 and at.number_input(key="max_edges").value == 7
    assert at.query_params["kinds"] == ["q", "v"] and at.query_params["io"] == "true"
    assert len(at.dataframe[0].value) <= 7


def test_composition_scores_come_from_the_store_on_reopening_and_recompute_computes_them(monkeypatch):
    from headvis_core.circuits import composition

    calls = []
    real = composition.compute_composition

    def counted(*args, **kwargs):
        calls.append(kwargs.get("fold_ln"))
        return real(*args, **kwargs)

    monkeypatch.setattr(composition, "compute_composition", counted)
    first = app_test(PAGE, model="tiny-gpt2", fold="false").run()
    assert not first.exception and not _errors(first)
    computed = len(calls)
    reopened = app_test(PAGE, model="tiny-gpt2", fold="false").run()  # a new session
    assert not reopened.exception and not _errors(reopened)
    assert len(calls) == computed
    assert any(c.value.startswith("Composition scores: computed at") and "from the store" in c.value
               for c in reopened.caption)
    reopened.button(key="graph_recompute").click().run()
    assert not reopened.exception and len(calls) == computed + 1
    assert any(c.value.startswith("Composition scores: computed at") and "just now" in c.value
               for c in reopened.caption)


def test_a_stored_path_patching_check_shows_at_once_in_a_new_session(monkeypatch):
    from headvis_core.circuits import path_patching

    calls = []
    real = path_patching.path_patch

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def setup(at):
        at.selectbox(key="graph_patch_set").set_value("induction")
        at.number_input(key="graph_patch_n").set_value(3)
        at.number_input(key="graph_patch_edges").set_value(2)
        return at.run()

    monkeypatch.setattr(path_patching, "path_patch", counted)
    at = setup(app_test(PAGE, model="tiny-gpt2", fold="false").run())
    at.button(key="graph_patch_run").click().run()
    assert not at.exception and not _errors(at) and len(calls) == 1
    patched = at.dataframe[1].value
    assert len(patched) == 2
    reopened = setup(app_test(PAGE, model="tiny-gpt2", fold="false").run())  # a new session, no button pressed
    assert not reopened.exception and not _errors(reopened) and len(calls) == 1
    pd.testing.assert_frame_equal(reopened.dataframe[1].value, patched)
    assert any(c.value.startswith("Path patching: computed at") and "from the store" in c.value
               for c in reopened.caption)
    other = app_test(PAGE, model="tiny-gpt2", fold="false").run()
    other.radio(key="graph_patch_direction").set_value("denoising")
    other = setup(other)  # the other direction: not stored, so nothing is shown
    assert not other.exception and len(other.dataframe) == 1 and len(calls) == 1
