from tests.conftest import app_test


def test_home_shows_the_model_card():
    at = app_test("Home.py", model="tiny-llama").run()
    assert not at.exception and not at.error
    assert at.title[0].value == "HeadVis Workbench"
    card = at.table[0].value
    assert "2 x 4 = 8 heads" in card.to_string() and "grouped-query" in card.to_string()
    assert "tiny-llama" in at.sidebar.caption[0].value


def test_a_hub_model_offline_shows_an_error_not_an_exception(monkeypatch):
    at = app_test("Home.py", model="tiny-llama").run()
    at.sidebar.selectbox(key="model_choice").set_value("gpt2").run()
    if at.error:  # no network here; with the network gpt2 simply loads
        assert not at.exception
        assert any("needs the network" in e.value for e in at.error)


def test_a_missing_local_directory_is_an_error():
    at = app_test("Home.py", model="/no/such/model/dir").run()
    assert not at.exception
    assert any("not a directory" in e.value for e in at.error)
