import json
import time

import pytest
import torch

from headvis_core.errors import (
    ModelNeedsNetworkError,
    NotEnoughMemoryError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from headvis_core.models import loader as models
from headvis_core.models.loader import load_model, load_random_model
from headvis_core.models.random_models import RandomModelSpec


def test_tiny_llama_info_reports_gqa(tiny_llama):
    info = tiny_llama.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_head) == (2, 4, 2, 16)
    assert info.is_gqa and info.n_total_heads == 8
    assert info.prepends_bos and info.n_ctx == 256 and info.device == "cpu"


def test_random_models_are_deterministic_and_in_eval_mode(tiny_gpt2):
    again = load_model("tiny-gpt2", device="cpu")
    tokens = tiny_gpt2.model.to_tokens("the same weights")
    assert not tiny_gpt2.model.training
    assert torch.equal(tiny_gpt2.model(tokens), again.model(tokens))


def test_load_random_model_any_shape():
    one = load_random_model(RandomModelSpec(arch="llama", n_layers=1, n_heads=1, d_model=32))
    assert (one.info.n_layers, one.info.n_heads, one.info.d_head) == (1, 1, 32)


def test_hub_name_without_network_fails_fast_with_clear_message(monkeypatch):
    monkeypatch.setattr(models, "_cached_hub_snapshot", lambda repo: None)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=0: False)
    with pytest.raises(ModelNeedsNetworkError) as err:
        load_model("gpt2")
    message = str(err.value)
    assert "network" in message and "local directory" in message and "smollm2-135m" in message


def test_hub_probe_never_hangs():
    started = time.time()
    models.hub_reachable(timeout=2.0)
    assert time.time() - started < 5


def test_missing_directory_and_directory_without_config(tmp_path):
    with pytest.raises(UnknownModelError, match="not a directory"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(UnknownModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_unknown_architecture_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "architectures": ["NoSuchLM"]}))
    with pytest.raises(UnsupportedArchitectureError, match="architecture"):
        load_model(str(tmp_path))


def test_not_enough_memory_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(models, "_available_bytes", lambda device: 1000)
    with pytest.raises(NotEnoughMemoryError, match=r"needs about 1 MiB on cpu, but only 0 MiB is free"):
        load_model("tiny-gpt2")


def test_bad_device_and_dtype():
    from headvis_core.errors import InputError

    with pytest.raises(InputError, match="dtype"):
        load_model("tiny-gpt2", dtype="float8")
    with pytest.raises(InputError, match="device"):
        load_model("tiny-gpt2", device="tpu")


def test_smollm2_shape_and_ioi_prediction(smollm2):
    info = smollm2.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_model, info.d_vocab) == (30, 9, 3, 576, 49152)
    model = smollm2.model
    logits = model(model.to_tokens("When Mary and John went to the store, John gave a drink to"))
    probs = logits[0, -1].softmax(-1)
    mary = model.to_single_token(" Mary")
    assert probs.argmax().item() == mary
    assert probs[mary].item() == pytest.approx(0.84, abs=0.05)
