from tests.conftest import app_test


def test_home_shows_the_model_card():
    at = app_test("Home.py", model="tiny-llama").run()
    assert not at.exception and not at.error
    assert at.title[0].value == "HeadVis Workbench"
    card = at.table[0].value
    assert "2 x 4 = 8 heads" in card.to_string() and "grouped-query" in card.to_string()
    assert "tiny-llama" in at.sidebar.caption[0].value
    links = [link.proto.label.split(":")[0] for link in at.get("page_link")]
    assert links == ["Head atlas", "Prompt lab", "Dataset examples", "Ablation", "Circuit graph", "Prompt sweeps",
                     "Edge attribution", "Compare", "Tours"]


def test_a_hub_model_offline_shows_an_error_not_an_exception(monkeypatch):
    from headvis_core.models import loader

    # Offline whether or not this machine has the network or a cached copy of gpt2.
    monkeypatch.setattr(loader, "hub_reachable", lambda *args, **kwargs: False)
    monkeypatch.setattr(loader, "_cached_hub_snapshot", lambda repo_id: None)
    at = app_test("Home.py", model="tiny-llama").run()
    at.sidebar.selectbox(key="model_choice").set_value("gpt2").run()
    assert not at.exception
    assert any("needs the network" in e.value for e in at.error)
    assert any("Could not load gpt2" in e.value for e in at.sidebar.error)
    assert at.query_params["model"] == "tiny-llama"  # the URL keeps the last model that loaded


def test_the_url_picks_model_device_and_dtype_and_bad_values_fall_back():
    at = app_test("Home.py", model="tiny-gpt2", device="cpu", dtype="bfloat16").run()
    assert not at.exception and not at.error
    assert "tiny-gpt2" in at.sidebar.caption[0].value and "bfloat16" in at.sidebar.caption[0].value
    at = app_test("Home.py", model="tiny-gpt2", device="<script>", dtype="float128").run()
    assert not at.exception and not at.error
    assert at.selectbox(key="model_device_choice").value == "auto"
    assert at.selectbox(key="model_dtype_choice").value == "float32"


def test_a_missing_local_directory_is_an_error():
    at = app_test("Home.py", model="/no/such/model/dir").run()
    assert not at.exception
    assert any("not a directory" in e.value for e in at.error)


def test_the_model_chosen_in_the_sidebar_stays_across_pages():
    at = app_test("Home.py", model="tiny-llama").run()
    at.sidebar.selectbox(key="model_choice").set_value("tiny-gpt2").run()
    assert "tiny-gpt2" in at.sidebar.caption[0].value
    at.switch_page("pages/3_Dataset_examples.py").run()
    assert not at.exception and at.title[0].value == "Dataset examples"
    assert "tiny-gpt2" in at.sidebar.caption[0].value and at.query_params["model"] == "tiny-gpt2"
    at.switch_page("Home.py").run()
    assert "tiny-gpt2" in at.sidebar.caption[0].value


def test_heads_bound_on_three_pages_keep_their_own_kind_of_value():
    """?heads= is a list on the Prompt lab and a text on the sweeps and graph pages."""
    at = app_test("Home.py", model="tiny-llama").run()
    at.query_params.update(template="{a} and", slots="a=1..3", heads="0.1,1.2")
    at.switch_page("pages/6_Prompt_sweeps.py").run()
    assert not at.exception and at.text_input(key="heads").value == "0.1,1.2"
    at.query_params.clear()
    at.query_params["model"] = "tiny-llama"
    at.switch_page("pages/2_Prompt_lab.py").run()
    assert not at.exception and at.multiselect(key="heads").value == ["0.0"]
    at.multiselect(key="heads").set_value(["1.3"]).run()
    at.switch_page("pages/5_Circuit_graph.py").run()
    assert not at.exception and not at.error and at.text_input(key="heads").value == ""
    at.switch_page("pages/6_Prompt_sweeps.py").run()
    assert not at.exception and at.text_input(key="heads").value == "0.1,1.2"
    at.switch_page("pages/2_Prompt_lab.py").run()
    assert not at.exception and at.multiselect(key="heads").value == ["1.3"]


def test_the_prompt_lab_and_the_ablation_page_keep_their_own_prompts():
    at = app_test("Home.py", model="tiny-llama").run()
    at.switch_page("pages/2_Prompt_lab.py").run()
    at.text_area(key="prompt").set_value("abcabc").run()
    at.switch_page("pages/4_Ablation.py").run()
    assert not at.exception and at.text_area(key="prompt").value.startswith("When Mary and John")
    at.text_area(key="prompt").set_value("xyz").run()
    at.switch_page("pages/2_Prompt_lab.py").run()
    assert not at.exception and at.text_area(key="prompt").value == "abcabc"
    at.switch_page("pages/4_Ablation.py").run()
    assert not at.exception and at.text_area(key="prompt").value == "xyz"


def test_home_lists_stored_results_of_the_loaded_model_with_links_that_reopen_them(tmp_path, monkeypatch):
    from urllib.parse import parse_qs, urlsplit

    monkeypatch.setenv("HEADVIS_STORE_DIR", str(tmp_path / "store"))  # only what this test stores
    empty = app_test("Home.py", model="tiny-llama").run()
    assert not empty.exception and any("Nothing stored yet" in c.value for c in empty.caption)
    ablation = app_test("pages/4_Ablation.py", model="tiny-llama", prompt="abcab abc").run()
    ablation.button(key="abl_run").click().run()
    assert not ablation.exception and not ablation.error
    home = app_test("Home.py", model="tiny-llama").run()
    assert not home.exception and not home.error
    links = [m.value for m in home.markdown if m.value.startswith("[kl ranking, computed ")]
    assert len(links) == 1 and "took " in links[0] and "metric kl" in links[0] and "](Ablation?" in links[0]
    query = {k: v[0] for k, v in parse_qs(urlsplit(links[0].split("](", 1)[1][:-1]).query).items()}
    assert query["model"] == "tiny-llama" and query["prompt"] == "abcab abc" and query["mode"] == "kl"
    reopened = app_test("pages/4_Ablation.py", **query).run()  # following the link: no button pressed
    assert not reopened.exception and not reopened.error
    assert any(c.value.startswith("This result: computed at ") and "from the store" in c.value
               for c in reopened.caption)
    other = app_test("Home.py", model="tiny-gpt2").run()  # another model: its own (empty) list
    assert not other.exception and not any(m.value.startswith("[kl ranking") for m in other.markdown)


def test_a_model_under_licence_terms_is_fetched_only_after_they_are_accepted(monkeypatch):
    import headvis_ui
    from headvis_core.errors import ModelLoadError

    fetches = []

    def fetch(key, progress=None, accept_terms=False):
        fetches.append((key, accept_terms))
        raise ModelLoadError("fetch stopped by the test")

    monkeypatch.setattr(headvis_ui, "is_fetched", lambda key: False)
    monkeypatch.setattr(headvis_ui, "terms_notice", lambda key: "Gemma is under the Gemma Terms of Use.")
    monkeypatch.setattr(headvis_ui, "fetch_offline_model", fetch)
    at = app_test("Home.py", model="gemma-3-270m").run()
    assert not at.exception and fetches == []
    assert any("Gemma Terms of Use" in i.value for i in at.info)
    at.checkbox(key="accept_terms_gemma-3-270m").check().run()
    assert fetches == [("gemma-3-270m", True)]
    assert any("fetch stopped by the test" in e.value for e in at.error)


def test_a_model_without_terms_is_fetched_without_asking(monkeypatch):
    import headvis_ui
    from headvis_core.errors import ModelLoadError

    fetches = []

    def fetch(key, progress=None, accept_terms=False):
        fetches.append((key, accept_terms))
        raise ModelLoadError("fetch stopped by the test")

    monkeypatch.setattr(headvis_ui, "is_fetched", lambda key: False)
    monkeypatch.setattr(headvis_ui, "fetch_offline_model", fetch)
    at = app_test("Home.py", model="smollm2-135m").run()
    assert not at.exception and fetches == [("smollm2-135m", False)] and not at.checkbox
