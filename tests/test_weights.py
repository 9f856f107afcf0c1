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
