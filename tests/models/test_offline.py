import json

import pytest

from headvis_core.errors import ModelLoadError
from headvis_core.models import offline as offline_model


def test_check_rejects_a_wrong_shape(tmp_path):
    config = dict(offline_model.EXPECTED_SHAPE, num_hidden_layers=12)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unexpected shape"):
        offline_model._check_converted(tmp_path)


def test_check_rejects_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(offline_model.EXPECTED_SHAPE))
    with pytest.raises(ModelLoadError, match="no weights"):
        offline_model._check_converted(tmp_path)


def test_unknown_offline_model():
    with pytest.raises(ModelLoadError, match="No offline model"):
        offline_model.fetch_offline_model("llama-70b")


def test_fetch_is_idempotent(smollm2):
    folder = offline_model.fetch_offline_model("smollm2-135m")
    assert offline_model.is_fetched() and (folder / offline_model.MANIFEST).is_file()
    manifest = json.loads((folder / offline_model.MANIFEST).read_text())
    assert manifest["shape"] == offline_model.EXPECTED_SHAPE
