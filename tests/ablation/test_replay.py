"""Block replay: the replay engine equals full forward passes, and a wrong replay is caught."""

import pytest
import torch

from headvis_core.ablation.metrics import AnswerMetrics
from headvis_core.ablation.replay import BlockReplay
from headvis_core.ablation.runner import AblationRunner
from headvis_core.ablation.values import zero_ablation
from headvis_core.data.prompt_pairs import prompts_from_texts
from headvis_core.heads import HeadRef, all_heads

TEXTS = ["hello world, hello", "jello world, jello"]  # same byte length


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
