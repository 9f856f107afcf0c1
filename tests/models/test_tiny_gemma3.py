"""The ``tiny-gemma3`` preset: Gemma 3's quirks (QK-norm, one KV head, sliding windows) in miniature."""

import pytest
import torch

from headvis_core.models.loader import load_model
from headvis_core.models.random_models import RANDOM_PRESETS

WINDOW = RANDOM_PRESETS["tiny-gemma3"].sliding_window


@pytest.fixture(scope="module")
def tiny_gemma3():
    return load_model("tiny-gemma3", device="cpu")


def test_shape_and_architecture(tiny_gemma3):
    info = tiny_gemma3.info
    assert info.architecture == "Gemma3ForCausalLM"
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_head, info.d_model) == (3, 4, 1, 16, 64)
    assert info.is_gqa and info.prepends_bos
    config = tiny_gemma3.model.original_model.config
    assert config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert config.sliding_window == WINDOW < info.n_ctx


def test_bridge_matches_hf_and_hooks_have_gqa_and_qk_norm_shapes(tiny_gemma3):
    bridge = tiny_gemma3.model
    tokens = bridge.to_tokens("a prompt longer than the sliding window of eight tokens")
    logits, cache = bridge.run_with_cache(tokens)
    torch.testing.assert_close(logits, bridge.original_model(tokens).logits, rtol=1e-4, atol=1e-4)
    n = tokens.shape[1]
    assert cache["blocks.0.attn.hook_k"].shape == (1, n, 1, 16)
    assert cache["blocks.0.attn.hook_q"].shape == cache["blocks.0.attn.hook_z"].shape == (1, n, 4, 16)
    assert "blocks.0.attn.hook_q_normed" in cache and "blocks.0.attn.hook_k_normed" in cache


def test_sliding_layers_mask_keys_outside_the_window(tiny_gemma3):
    bridge = tiny_gemma3.model
    tokens = bridge.to_tokens("a prompt longer than the sliding window of eight tokens")
    n = tokens.shape[1]
    _, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    query = torch.arange(n)[:, None]
    key = torch.arange(n)[None, :]
    in_window = (key <= query) & (key > query - WINDOW)
    for layer in (0, 1):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]
        assert torch.all(pattern[:, ~in_window] == 0)
        assert torch.all(pattern[:, in_window] > 0)
    global_pattern = cache["blocks.2.attn.hook_pattern"][0]
    assert torch.all(global_pattern[:, key.expand(n, n) <= query.expand(n, n)] > 0)
