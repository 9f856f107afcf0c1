"""Ablation at hook_z: equivalences with weight edits and slow references, prompt sets, bad input."""

import pytest
import torch

from headvis_core import hooks
from headvis_core.ablation.metrics import AnswerMetrics
from headvis_core.ablation.replay import BlockReplay
from headvis_core.ablation.runner import AblationRunner
from headvis_core.ablation.values import Ablation, check_hookable, make_ablation, zero_ablation
from headvis_core.data.prompt_pairs import induction_prompts, ioi_prompts, prompts_from_texts
from headvis_core.errors import InputError, UnsupportedArchitectureError
from headvis_core.heads import HeadRef, all_heads
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


def test_gqa_query_heads_sharing_a_kv_head_are_ablated_one_by_one(tiny_llama):
    model = tiny_llama.model
    assert tiny_llama.info.n_kv_heads < tiny_llama.info.n_heads
    tokens = model.to_tokens("hello world")
    _, cache = hooks.capture(model, tokens, [z_hook(0)])
    (z,) = cache.values()
    assert z.shape[2] == tiny_llama.info.n_heads  # one slot per query head

    prompts = prompts_from_texts(model, ["hello world"])
    runner = AblationRunner(model, prompts, zero_ablation(model))
    # Heads 0 and 1 share a KV head; ablating one leaves the other's output alone.
    out = runner.evaluate([(HeadRef(0, 0),), (HeadRef(0, 1),), (HeadRef(0, 0), HeadRef(0, 1))],
                          AnswerMetrics(keep_logprobs=True))
    lp = out["logprobs"][:, 0]
    assert not torch.allclose(lp[0], lp[1], atol=1e-6)
    assert not torch.allclose(lp[2], lp[0], atol=1e-6)


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


def test_replay_engine_equals_full_forward_with_chunks_and_a_base_set(tiny_gpt2):
    model = tiny_gpt2.model
    prompts = prompts_from_texts(model, TEXTS + ["a different length"], corrupted=None)
    base = (HeadRef(1, 0),)
    variants = [base + (h,) for h in all_heads(2, 4) if h not in base] + [base, ()]
    metrics = AnswerMetrics(keep_logprobs=True)
    reference = AblationRunner(model, prompts, zero_ablation(model), engine="forward").evaluate(variants, metrics)
    runner = AblationRunner(model, prompts, zero_ablation(model), engine="replay", max_batch_tokens=40)
    assert runner.engine == "replay" and not runner.engine_note
    plain = runner.evaluate(variants, metrics)
    with_base = runner.evaluate(variants[:-1], metrics, base=base)
    torch.testing.assert_close(plain["logprobs"], reference["logprobs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_base["logprobs"], reference["logprobs"][:-1], atol=1e-5, rtol=1e-5)
    # The empty variant is the clean run.
    for i in range(len(prompts)):
        torch.testing.assert_close(plain["logprobs"][-1, i], runner.clean_logits[i][-1].log_softmax(-1))
    with pytest.raises(ValueError):
        runner.evaluate([(HeadRef(0, 0),)], metrics, base=base)


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


def test_bad_prompts_give_clear_errors(tiny_llama):
    model = tiny_llama.model
    with pytest.raises(InputError, match="empty"):
        prompts_from_texts(model, ["   "])
    with pytest.raises(InputError, match="Prompt 2"):
        prompts_from_texts(model, ["fine", ""])
    with pytest.raises(InputError, match="No prompts"):
        prompts_from_texts(model, [])
    with pytest.raises(InputError, match="tokenizes into 2 tokens"):
        prompts_from_texts(model, ["fine"], targets=["ab"])
    with pytest.raises(InputError, match="every prompt"):
        prompts_from_texts(model, TEXTS, targets=["a", None])
    runner = AblationRunner(model, prompts_from_texts(model, ["fine"]), zero_ablation(model))
    with pytest.raises(InputError, match="out of range"):
        runner.evaluate([(HeadRef(5, 0),)], AnswerMetrics())


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


def test_induction_prompts_score_the_second_copy(tiny_gpt2):
    model = tiny_gpt2.model
    prompts = induction_prompts(model, n_seqs=3, half_len=5, seed=1)
    assert len(prompts) == 3 and prompts.label_ids is not None
    for tokens, positions, labels in zip(prompts.tokens, prompts.answer_positions, prompts.label_ids):
        assert tokens.shape[-1] == 11 and tokens[0] == 256  # BOS, then 5 + 5 tokens
        assert torch.equal(tokens[1:6], tokens[6:])
        assert positions == (6, 7, 8, 9)
        assert list(labels) == tokens[7:11].tolist()  # the next token at each answer position
        assert 256 not in tokens[1:].tolist()


def test_ioi_prompts_skip_multi_token_names_and_align_with_their_corruptions(smollm2):
    template = "When {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to"
    prompts = ioi_prompts(smollm2.model, 6, seed=3, template=template)
    assert len(prompts) == 6 and len(set(prompts.lengths)) == 1
    assert [t.shape for t in prompts.corrupted_tokens] == [t.shape for t in prompts.tokens]
    assert isinstance(prompts.skipped_names, tuple)
    for text, target, alternative in zip(prompts.texts, prompts.target_ids, prompts.alternative_ids):
        io, s = smollm2.model.to_single_str_token(target), smollm2.model.to_single_str_token(alternative)
        assert text.count(s.strip()) == 2 and text.count(io.strip()) == 1


def test_ioi_preset_on_a_byte_level_model_explains_the_names(tiny_llama):
    with pytest.raises(InputError, match="single tokens"):
        ioi_prompts(tiny_llama.model, 4)


def test_runner_falls_back_to_full_forward_passes_if_the_replay_is_wrong(tiny_gpt2, monkeypatch):
    model = tiny_gpt2.model
    prompts = prompts_from_texts(model, TEXTS)
    expected = AblationRunner(model, prompts, zero_ablation(model)).evaluate([(HeadRef(0, 2),)],
                                                                              AnswerMetrics(keep_logprobs=True))
    real_block = BlockReplay.block
    monkeypatch.setattr(BlockReplay, "block", lambda self, i, h: real_block(self, i, h) * 1.01)
    runner = AblationRunner(model, prompts, zero_ablation(model))
    assert runner.engine == "forward" and "differs from the full forward" in runner.engine_note
    got = runner.evaluate([(HeadRef(0, 2),)], AnswerMetrics(keep_logprobs=True))
    torch.testing.assert_close(got["logprobs"], expected["logprobs"], atol=1e-5, rtol=1e-5)


def test_mean_ablation_of_a_single_prompt_is_refused(tiny_llama):
    # The mean over one prompt is that prompt's own activation: ablating would silently change nothing.
    prompts = prompts_from_texts(tiny_llama.model, ["hello world"])
    with pytest.raises(InputError, match="at least two prompts"):
        make_ablation(tiny_llama.model, "mean", prompts)
