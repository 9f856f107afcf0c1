"""Two sessions sharing one model must never see each other's hooks."""

import threading
import time

import torch

from headvis_core.hooks import capture, forward, run_with_hooks


def _zero_head_0(z, hook):
    time.sleep(0.002)  # give the other thread every chance to interleave
    z[:, :, 0] = 0.0
    return z


def test_concurrent_hooked_runs_match_solo_runs(tiny_llama):
    model = tiny_llama.model
    tokens_a = model.to_tokens("Alpha beta gamma delta")
    tokens_b = model.to_tokens("One two three four five six")
    solo_ablated = run_with_hooks(model, tokens_a, [("blocks.0.attn.hook_z", _zero_head_0)])
    _, solo_patterns = capture(model, tokens_b, ["blocks.1.attn.hook_pattern"])
    solo_plain = forward(model, tokens_b)
    assert not torch.allclose(solo_ablated, forward(model, tokens_a))  # the hook does change the output

    failures = []

    def ablating_session():
        for _ in range(15):
            out = run_with_hooks(model, tokens_a, [("blocks.0.attn.hook_z", _zero_head_0)])
            if not torch.equal(out, solo_ablated):
                failures.append("ablated run differs")

    def capturing_session():
        for _ in range(15):
            _, patterns = capture(model, tokens_b, ["blocks.1.attn.hook_pattern"])
            plain = forward(model, tokens_b)
            if not torch.equal(patterns["blocks.1.attn.hook_pattern"], solo_patterns["blocks.1.attn.hook_pattern"]):
                failures.append("captured pattern differs")
            if not torch.equal(plain, solo_plain):
                failures.append("plain forward saw a foreign hook")

    threads = [threading.Thread(target=ablating_session), threading.Thread(target=capturing_session)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_hooks_are_removed_after_an_error(tiny_gpt2):
    model = tiny_gpt2.model
    tokens = model.to_tokens("hello")

    def broken(z, hook):
        raise RuntimeError("boom")

    try:
        run_with_hooks(model, tokens, [("blocks.0.attn.hook_z", broken)])
    except RuntimeError:
        pass
    assert torch.equal(forward(model, tokens), model(tokens))
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_capture_stops_early_and_returns_only_named_hooks(tiny_gpt2):
    model = tiny_gpt2.model
    tokens = model.to_tokens("hello there")
    out, cache = capture(model, tokens, ["blocks.0.attn.hook_pattern"], stop_at_layer=1)
    assert out is None and list(cache) == ["blocks.0.attn.hook_pattern"]
    _, full = model.run_with_cache(tokens)
    assert torch.equal(cache["blocks.0.attn.hook_pattern"], full["blocks.0.attn.hook_pattern"])


def test_capture_keys_activations_by_the_name_asked_for(tiny_llama):
    model = tiny_llama.model
    tokens = model.to_tokens("alias names")
    _, cache = capture(model, tokens, ["blocks.0.attn.hook_z"])
    assert list(cache) == ["blocks.0.attn.hook_z"]
    _, full = model.run_with_cache(tokens)
    assert torch.equal(cache["blocks.0.attn.hook_z"], full["blocks.0.attn.hook_z"])
