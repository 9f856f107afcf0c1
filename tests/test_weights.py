"""The weights module: KV-head expansion as TransformerLens does it, layer norms folded as the model applies them."""

import pytest
import torch

from headvis_core.errors import InputError
from headvis_core.weights import effective_embedding, effective_unembedding, expand_kv_heads


def test_kv_expansion_equals_the_bridges_own(tiny_llama):
    model = tiny_llama.model
    n_heads = int(model.cfg.n_heads)
    assert model.W_K.shape[1] < n_heads  # the fixture is grouped-query
    for weights in (model.W_K, model.W_V):
        torch.testing.assert_close(expand_kv_heads(weights, n_heads), model._expand_kv_heads(weights), rtol=0, atol=0)
    W_Q = model.W_Q  # a property: a fresh tensor on every read
    assert expand_kv_heads(W_Q, n_heads) is W_Q
    with pytest.raises(InputError, match="evenly"):
        expand_kv_heads(torch.zeros(1, 3, 2), 4)


def test_effective_embedding_is_what_ln1_makes_of_each_token(tiny_gpt2, tiny_llama):
    for loaded in (tiny_gpt2, tiny_llama):
        model = loaded.model
        ln1 = model.blocks[1].ln1.original_component
        W_E = model.W_E.detach()
        with torch.no_grad():
            real = ln1(W_E) - ln1(torch.zeros_like(W_E))
        torch.testing.assert_close(effective_embedding(model, 1), real.double(), rtol=1e-4, atol=1e-5)
        assert effective_unembedding(model).shape == (64, 257)


def test_qk_norm_gains_fold_into_the_query_and_key_weights():
    from headvis_core.circuits.composition import head_weights
    from headvis_core.models.loader import load_model
    from headvis_core.weights import qk_norm_gains

    model = load_model("tiny-gemma3", device="cpu").model
    q_norm = model.blocks[1].attn._modules["q_norm"]
    with torch.no_grad():
        q_norm.weight.copy_(torch.linspace(-0.5, 2.0, q_norm.weight.numel()))
    q_gain, k_gain = qk_norm_gains(model)
    assert torch.allclose(q_gain[1], 1.0 + q_norm.weight.detach().float())  # Gemma's gain is 1 + weight
    assert torch.allclose(k_gain[0], torch.ones_like(k_gain[0]))  # zero-initialised weights: gain 1
    folded = head_weights(model, fold_ln=True)
    raw = head_weights(model, fold_ln=False)
    ln1 = 1.0 + model.blocks[1].ln1.weight.detach().float()
    expected = raw.W_Q[1] * ln1[None, :, None] * q_gain[1][None, None, :]
    torch.testing.assert_close(folded.W_Q[1], expected)
    assert qk_norm_gains(load_model("tiny-llama", device="cpu").model) is None
