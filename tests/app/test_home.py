from tests.conftest import app_test


def test_home_shows_the_model_card():
    at = app_test("Home.py", model="tiny-llama").run()
    assert not at.exception and not at.error
    assert at.title[0].value == "HeadVis Workbench"
    card = at.table[0].value
    assert "2 x 4 = 8 heads" in card.to_string() and "grouped-query" in card.to_string()
    assert "tiny-llama" in at.sidebar.caption[0].value


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
