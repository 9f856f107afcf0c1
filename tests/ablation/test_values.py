"""Ablation values at hook_z: equal to weight edits and to slow references; what cannot be ablated is refused."""

import pytest
import torch

from headvis_core import hooks
from headvis_core.ablation.metrics import AnswerMetrics
from headvis_core.ablation.runner import AblationRunner
from headvis_core.ablation.values import Ablation, check_hookable, make_ablation, zero_ablation
from headvis_core.data.prompt_pairs import prompts_from_texts
from headvis_core.errors import InputError, UnsupportedArchitectureError
from headvis_core.heads import HeadRef
from headvis_core.hooks import z_hook
from headvis_core.models.loader import load_model
from tests.reference import ablated_logits

TEXTS = ["hello world, hello", "jello world, jello"]  # same byte length
CORRUPTED = ["abcde world, hello", "jello wxrld, jello"]


def _o_proj(model, layer):
    """The HF output projection that ``hook_z`` feeds."""
    return model.blocks[layer].attn.o.original_component


def _zero_head_rows_of_w_o(model, layer, head, d_head):
    weight = _o_proj(model, layer).weight
    cols = slice(head * d_head, (head + 1) * d_head)
    with torch.no_grad():
        if type(_o_proj(model, layer)).__name__ == "Conv1D":  # GPT-2: weight is [in = heads*d_head, out]
            weight[cols, :] = 0
        else:  # nn.Linear: weight is [out, in = heads*d_head]
            weight[:, cols] = 0


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_zero_ablation_at_hook_z_equals_zeroing_the_heads_rows_of_w_o(name):
    reference = load_model(name, device="cpu")  # a private copy: its weights get edited
    ablated = load_model(name, device="cpu")
    model = reference.model
    layer, head, d_head = 1, 2, reference.info.d_head
    tokens = model.to_tokens("When Mary and John went to the store")

    hooked = ablated_logits(model, tokens, [HeadRef(layer, head)])
    _zero_head_rows_of_w_o(ablated.model, layer, head, d_head)
    edited = hooks.forward(ablated.model, tokens)
    assert not torch.allclose(hooked, hooks.forward(model, tokens), atol=1e-3)  # the head matters
    torch.testing.assert_close(hooked, edited, atol=1e-5, rtol=1e-5)

    # The batched runner (replay engine) gives the same prediction.
    prompts = prompts_from_texts(model, ["When Mary and John went to the store"])
    runner = AblationRunner(model, prompts, zero_ablation(model))
    out = runner.evaluate([(HeadRef(layer, head),)], AnswerMetrics(keep_logprobs=True))
    torch.testing.assert_close(out["logprobs"][0, 0], edited[0, -1].log_softmax(-1), atol=1e-5, rtol=1e-5)


def _slow_logprobs(model, tokens_list, replace_fn, head):
    """One prompt and one forward at a time, with ``z[:, :, h]`` replaced by ``replace_fn(i, z)``."""
    out = []
    for i, tokens in enumerate(tokens_list):
        logits = ablated_logits(model, tokens[None], [head],
                                replacement=lambda layer, z, i=i: replace_fn(i, z).expand_as(z))
        out.append(logits[0, -1].log_softmax(-1))
    return torch.stack(out)


def _z(model, tokens, layer):
    _, cache = hooks.capture(model, tokens[None], [z_hook(layer)])
    return next(iter(cache.values()))[0]  # [pos, heads, d_head]


@pytest.mark.parametrize("engine", ["replay", "forward"])
def test_mean_ablation_matches_a_slow_per_position_reference(tiny_llama, engine):
    model = tiny_llama.model
    prompts = prompts_from_texts(model, TEXTS)
    reference = prompts_from_texts(model, ["the cat sat on the mat", "a dog ran in the park."])
    assert len(set(reference.lengths)) == 1 and reference.lengths[0] != prompts.lengths[0]
    head = HeadRef(1, 3)
    # Reference of another length: the mean over all its positions.
    all_z = torch.cat([_z(model, t, head.layer) for t in reference.tokens])
    token_mean = all_z.mean(0)
    ablation = make_ablation(model, "mean", prompts, reference=reference)
    slow = _slow_logprobs(model, prompts.tokens, lambda i, z: token_mean.expand_as(z[0]), head)
    runner = AblationRunner(model, prompts, ablation, engine=engine)
    fast = runner.evaluate([(head,)], AnswerMetrics(keep_logprobs=True))
    torch.testing.assert_close(fast["logprobs"][0], slow, atol=1e-5, rtol=1e-5)
    # The prompts as their own reference: the mean per position.
    per_position = torch.stack([_z(model, t, head.layer) for t in prompts.tokens]).mean(0)
    slow = _slow_logprobs(model, prompts.tokens, lambda i, z: per_position, head)
    fast = AblationRunner(model, prompts, make_ablation(model, "mean", prompts), engine=engine).evaluate(
        [(head,)], AnswerMetrics(keep_logprobs=True))
    torch.testing.assert_close(fast["logprobs"][0], slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_resample_ablation_matches_a_slow_position_aligned_reference(name, request):
    model = request.getfixturevalue(name.replace("-", "_")).model
    prompts = prompts_from_texts(model, TEXTS, corrupted=CORRUPTED)
    head = HeadRef(0, 1)
    corrupted_z = [_z(model, t, head.layer) for t in prompts.corrupted_tokens]
    slow = _slow_logprobs(model, prompts.tokens, lambda i, z: corrupted_z[i], head)
    fast = AblationRunner(model, prompts, make_ablation(model, "resample", prompts)).evaluate(
        [(head,)], AnswerMetrics(keep_logprobs=True))
    torch.testing.assert_close(fast["logprobs"][0], slow, atol=1e-5, rtol=1e-5)


def test_mixed_lengths_are_refused_for_mean_and_resample(tiny_llama):
    model = tiny_llama.model
    mixed = prompts_from_texts(model, ["short", "a longer prompt"], corrupted=["shxrt", "a longer prxmpt"])
    for kind in ("mean", "resample"):
        with pytest.raises(InputError, match="one length"):
            make_ablation(model, kind, mixed)
    make_ablation(model, "zero", mixed)  # zero ablation does not care
    with pytest.raises(InputError, match="same length"):
        prompts_from_texts(model, ["short"], corrupted=["much longer"])
    with pytest.raises(InputError, match="corrupted prompts"):
        make_ablation(model, "resample", prompts_from_texts(model, TEXTS))
    with pytest.raises(InputError, match="Unknown ablation kind"):
        make_ablation(model, "shuffle", mixed)


def test_a_model_without_hook_z_is_refused():
    class Opaque:
        hook_dict: dict = {}
        blocks: list = []

    with pytest.raises(UnsupportedArchitectureError, match="cannot be hooked"):
        check_hookable(Opaque())


def test_a_hook_z_without_a_head_axis_is_refused(tiny_llama):
    model = tiny_llama.model
    ablation = Ablation("zero", n_heads=3, d_head=16)  # wrong head count for this model
    runner = AblationRunner(model, prompts_from_texts(model, ["hello"]), ablation, engine="forward")
    with pytest.raises(UnsupportedArchitectureError, match="shape"):
        runner.evaluate([(HeadRef(0, 0),)], AnswerMetrics())


def test_mean_ablation_of_a_single_prompt_is_refused(tiny_llama):
    # The mean over one prompt is that prompt's own activation: ablating would silently change nothing.
    prompts = prompts_from_texts(tiny_llama.model, ["hello world"])
    with pytest.raises(InputError, match="at least two prompts"):
        make_ablation(tiny_llama.model, "mean", prompts)
