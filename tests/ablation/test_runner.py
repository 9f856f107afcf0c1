"""The ablation runner: grouped-query heads ablated one by one, in batched variants."""

import torch

from headvis_core import hooks
from headvis_core.ablation.metrics import AnswerMetrics
from headvis_core.ablation.runner import AblationRunner
from headvis_core.ablation.values import zero_ablation
from headvis_core.data.prompt_pairs import prompts_from_texts
from headvis_core.heads import HeadRef
from headvis_core.hooks import z_hook


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
