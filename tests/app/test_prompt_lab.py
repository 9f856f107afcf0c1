import pytest

from headvis_core.heads import HeadRef
from tests.app import bound_params
from tests.conftest import app_test

PAGE = "pages/2_Prompt_lab.py"


def iframes(at):
    return [e.proto.srcdoc for e in at.get("iframe")]


def test_heads_from_the_url_get_a_heatmap_and_a_token_view_each():
    at = app_test(PAGE, prompt="abcabc", heads="1.2,0.3").run()
    assert not at.exception and not at.error
    assert at.multiselect(key="heads").value == ["1.2", "0.3"]
    assert [s.value for s in at.subheader][-2:] == ["Head 1.2", "Head 0.3"]
    views = iframes(at)
    assert len(views) == 2 and "head 1.2" in views[0]
    # The query defaults to the last token, the key to the token after its previous occurrence (induction).
    assert at.selectbox(key="lab_query").value == 6 and at.selectbox(key="lab_key").value == 4
    ranking = at.dataframe[0].value
    assert len(ranking) == 8 and list(ranking.columns[:4]) == ["layer", "head", "name", "attention"]
    # The old comma list is rewritten into the repeated parameters the bound multiselect reads.
    assert at.query_params["heads"] == ["1.2", "0.3"] and at.query_params["q"] == "6" and at.query_params["k"] == "4"
    assert bound_params(at) == {"prompt", "heads"}
    labels = {b.label for b in at.get("download_button")}
    assert {"Download CSV", "Download predictions (CSV)", "Download figure (HTML)"} <= labels


def test_script_in_a_prompt_is_escaped_in_the_token_view():
    at = app_test(PAGE, heads="0.0").run()
    at.text_area(key="prompt").set_value("<script>alert('x')</script> \u202eok").run()
    assert not at.exception and not at.error
    view = iframes(at)[0]
    assert view.count("<script") == 1 and "&lt;" in view and "\u202e" not in view


def test_empty_and_too_long_prompts_show_errors():
    at = app_test(PAGE, heads="0.0").run()
    at.text_area(key="prompt").set_value("   ").run()
    assert not at.exception and "empty" in at.error[0].value
    at.text_area(key="prompt").set_value("x" * 300).run()  # 301 tokens, context 256
    assert not at.exception and "301 tokens long" in at.error[0].value
    at.checkbox(key="lab_cut").check().run()
    assert not at.exception and not at.error
    assert "301 tokens long" in at.warning[0].value
    assert at.slider(key="lab_window").value == 256 - 160  # a long prompt shows a window


def test_key_after_query_is_an_error_and_library_prompts_load():
    at = app_test(PAGE, heads="1.1").run()
    at.selectbox(key="lab_query").set_value(3).run()
    at.selectbox(key="lab_key").set_value(5).run()
    assert not at.exception and "earlier tokens" in at.error[0].value
    choice = next(o for o in at.selectbox(key="lab_library").options if o.startswith("Induction"))
    at.selectbox(key="lab_library").set_value(choice).run()
    assert not at.exception and not at.error
    assert at.text_area(key="prompt").value.startswith("Mr and Mrs Dursley")


def test_atlas_head_is_the_default_and_can_be_added():
    at = app_test(PAGE, layer=1, head=3).run()
    assert not at.exception and at.multiselect(key="heads").value == ["1.3"]
    at.session_state["selected_head"] = HeadRef(0, 2)
    at.run()
    at.button[0].click().run()
    assert at.multiselect(key="heads").value == ["1.3", "0.2"]
    assert len(iframes(at)) == 2


def test_clicking_the_grid_adds_heads():
    at = app_test(PAGE, heads="1.1").run()
    at.session_state["lab_grid"] = {"selection": {"points": [{"customdata": "0.2"}]}}  # what a click leaves
    at.run()
    assert not at.exception and at.multiselect(key="heads").value == ["1.1", "0.2"]
    assert [s.value for s in at.subheader][-2:] == ["Head 1.1", "Head 0.2"]


def test_the_url_reopens_the_same_view_with_repeated_heads_and_positions():
    at = app_test(PAGE, prompt="abcabcabc", q=5, k=2)
    at.query_params["heads"] = ["0.1", "1.3"]
    at.run()
    assert not at.exception and not at.error
    assert at.text_area(key="prompt").value == "abcabcabc"
    assert at.multiselect(key="heads").value == ["0.1", "1.3"]
    assert at.selectbox(key="lab_query").value == 5 and at.selectbox(key="lab_key").value == 2
    assert [s.value for s in at.subheader][-2:] == ["Head 0.1", "Head 1.3"]


def test_hostile_url_values_give_defaults():
    at = app_test(PAGE, prompt="abcabc", heads="9.9,<script>,1.1", q="nan", k="-3").run()
    assert not at.exception and not at.error
    assert at.multiselect(key="heads").value == ["1.1"]  # heads that do not exist are dropped
    assert at.selectbox(key="lab_query").value == 6 and at.selectbox(key="lab_key").value == 4
    at = app_test(PAGE, prompt="abcabc", heads="7.7", q="99", k="1e9").run()
    assert not at.exception and not at.error
    assert at.multiselect(key="heads").value == ["0.0"]  # none valid: the default, the model's first head
    assert at.selectbox(key="lab_query").value == 6 and at.selectbox(key="lab_key").value == 4


def test_each_head_links_to_the_attribution_of_the_chosen_edge():
    at = app_test(PAGE, prompt="abcabc", heads="1.2", q=5, k=3).run()
    assert not at.exception and not at.error
    links = [m.value for m in at.markdown if "Edge_attribution?" in m.value]
    assert len(links) == 1
    assert "Edge_attribution?model=tiny-llama&prompt=abcabc&layer=1&head=2&q=5&k=3" in links[0]


def test_a_prompt_over_the_memory_cap_is_refused_before_the_model_runs(monkeypatch):
    from headvis_core.lab import prompt_lab

    calls = []
    monkeypatch.setattr(prompt_lab, "analyse_prompt", lambda *args, **kwargs: calls.append(1))
    monkeypatch.setenv("HEADVIS_MEMORY_CAP_GB", "0.01")  # under what this process already holds
    at = app_test(PAGE, prompt="abcabc", heads="0.0").run()
    assert not at.exception and calls == []
    assert "this prompt (7 tokens) needs about" in at.error[0].value.lower()
    assert "over the limit of" in at.error[0].value and not iframes(at)


@pytest.mark.real_model
def test_an_8192_token_prompt_on_smollm2_is_refused_with_the_estimate(monkeypatch):
    from headvis_core.lab import prompt_lab

    at = app_test(PAGE, model="smollm2-135m", timeout=300, heads="0.0").run()
    calls = []
    monkeypatch.setattr(prompt_lab, "analyse_prompt", lambda *args, **kwargs: calls.append(1))
    at.checkbox(key="lab_cut").check()  # cut at the context: 8192 tokens
    at.text_area(key="prompt").set_value(" a" * 9000).run()
    assert not at.exception and calls == []
    message = at.error[0].value
    assert "8192 tokens" in message and "needs about" in message and "attention patterns" in message
