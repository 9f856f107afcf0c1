"""A SAELens-format dictionary replaces components on a side and the QK sum stays exact."""

import json

import pytest
import torch

from headvis_core.attribution import EdgeSpec, attribute_edges
from headvis_core.attribution.sae import load_sae, random_sae, save_sae
from headvis_core.errors import HeadVisError, InputError
from headvis_core.heads import HeadRef

PROMPT = "The cat sat on the mat. The cat sat on"


@pytest.fixture
def sae_dir(tmp_path, tiny_llama):
    return save_sae(tmp_path / "sae", **random_sae(tiny_llama.model, layer=1, d_sae=96))


@pytest.mark.parametrize("side", ["query", "key", "both"])
def test_dictionary_terms_sum_to_the_score(tiny_llama, sae_dir, side):
    model = tiny_llama.model
    tokens = model.to_tokens(PROMPT)
    sae = load_sae(sae_dir)
    edge = EdgeSpec(HeadRef(1, 2), 20, 7)
    plain = attribute_edges(model, tokens, [edge])[0]
    result = attribute_edges(model, tokens, [edge], sae=sae, sae_side=side)[0]
    assert result.qk.terms.sum().item() == pytest.approx(result.score, rel=1e-4, abs=1e-6)
    assert result.score == plain.score
    query_names, key_names = result.qk.query.names, result.qk.key.names
    features_on_query = any(n.startswith("F") for n in query_names)
    features_on_key = any(n.startswith("F") for n in key_names)
    assert features_on_query == (side in ("query", "both"))
    assert features_on_key == (side in ("key", "both"))
    if features_on_query:
        assert "error" in query_names and "L0H1" not in query_names
    assert result.as_json()["sae_side"] == side


def test_feature_decomposition_is_exact(tiny_llama, sae_dir):
    sae = load_sae(sae_dir)
    x = torch.randn(int(tiny_llama.model.cfg.d_model), generator=torch.Generator().manual_seed(1))
    parts = sae.components(x, position=3, layer=1)
    torch.testing.assert_close(parts.vectors.sum(0), x.double())
    active = [n for n in parts.names if n.startswith("F")]
    assert 0 < len(active) < 96  # ReLU switched some features off


def test_mismatched_dictionaries_are_refused(tiny_llama, tiny_gpt2, tmp_path):
    tokens = tiny_llama.model.to_tokens(PROMPT)
    edge = [EdgeSpec(HeadRef(1, 0), 10, 3)]
    wrong_hook = load_sae(save_sae(tmp_path / "hook", **random_sae(tiny_llama.model, layer=0, d_sae=8)))
    with pytest.raises(InputError, match="blocks.1.hook_resid_pre"):
        attribute_edges(tiny_llama.model, tokens, edge, sae=wrong_hook)
    spec = random_sae(tiny_llama.model, layer=1, d_sae=8)
    spec.update(W_enc=torch.zeros(32, 8), W_dec=torch.zeros(8, 32), b_dec=torch.zeros(32))
    narrow = load_sae(save_sae(tmp_path / "narrow", **spec))
    with pytest.raises(InputError, match="d_in=32"):
        attribute_edges(tiny_llama.model, tokens, edge, sae=narrow)
    with pytest.raises(InputError, match="side"):
        attribute_edges(tiny_llama.model, tokens, edge, sae=narrow, sae_side="value")


def test_broken_folders_give_clear_errors(tmp_path):
    with pytest.raises(InputError, match="No SAE folder"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="cfg.json"):
        load_sae(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cfg.json").write_bytes(b"\xff\xfe not json")
    (bad / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(HeadVisError, match="cfg.json"):
        load_sae(bad)
    (bad / "cfg.json").write_text(json.dumps({"hook_name": "blocks.0.hook_resid_pre", "d_in": 4, "d_sae": 2}))
    with pytest.raises(HeadVisError, match="safetensors"):
        load_sae(bad)
