import pytest


@pytest.fixture(autouse=True)
def private_result_store(tmp_path, monkeypatch):
    """Each CLI test gets an empty result store of its own, so no test reads another's results."""
    monkeypatch.setenv("HEADVIS_STORE_DIR", str(tmp_path / "store"))
