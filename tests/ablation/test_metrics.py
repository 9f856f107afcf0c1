"""Metrics at the answer position against their textbook definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from headvis_core.ablation.metrics import (
    AnswerMetrics,
    clean_metrics,
    kl_divergence,
    logit_difference,
    margin_over_rest,
    next_token_loss,
    prediction_shift,
    prompt_mean,
    token_probability,
    token_rank,
    top_k_table,
)
from headvis_core.ablation.runner import AblationRunner
from headvis_core.ablation.values import zero_ablation
from headvis_core.data.prompt_pairs import prompts_from_texts
from headvis_core.heads import HeadRef


def test_kl_divergence_matches_torch_and_is_zero_for_identical_logits():
    torch.manual_seed(0)
    clean, ablated = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    expected = F.kl_div(ablated.log_softmax(-1), clean.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_divergence(clean, ablated), expected)
    assert torch.allclose(kl_divergence(clean, clean), torch.zeros(3, 5))
    # Not symmetric: KL(clean || ablated) is what is reported.
    assert not torch.allclose(kl_divergence(clean, ablated), kl_divergence(ablated, clean))


def test_token_metrics():
    logits = torch.tensor([[2.0, 1.0, 3.0, 0.0], [0.0, 5.0, 1.0, 1.0]])
    ids = torch.tensor([0, 1])
    torch.testing.assert_close(logit_difference(logits, torch.tensor([2, 1]), torch.tensor([0, 3])),
                               torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(token_probability(logits, ids), torch.stack([logits[0].softmax(-1)[0],
                                                                            logits[1].softmax(-1)[1]]))
    assert token_rank(logits, ids).tolist() == [1, 0]
    assert token_rank(logits, torch.tensor([3, 2])).tolist() == [3, 1]  # ties do not count as above
    torch.testing.assert_close(margin_over_rest(logits, ids), torch.tensor([-1.0, 4.0]))
    assert (margin_over_rest(logits, logits.argmax(-1)) > 0).all()


def test_next_token_loss_is_cross_entropy():
    torch.manual_seed(1)
    logits, labels = torch.randn(2, 4, 9), torch.randint(0, 9, (2, 4))
    expected = F.cross_entropy(logits.reshape(-1, 9), labels.reshape(-1), reduction="none").view(2, 4).mean(-1)
    torch.testing.assert_close(next_token_loss(logits, labels), expected)


def test_answer_metrics_shapes_and_values():
    torch.manual_seed(2)
    clean = torch.randn(3, 2, 7)  # [P, n_ans, vocab]
    ablated = torch.randn(4, 3, 2, 7)  # [n, P, n_ans, vocab]
    metrics = AnswerMetrics(target_ids=[1, 2, 3], alternative_ids=[4, 5, 6], label_ids=[(0, 1), (2, 3), (4, 5)],
                            keep_logprobs=True)
    out = metrics(ablated, clean, [0, 1, 2])
    for name in ("kl", "logit_diff", "target_prob", "target_rank", "alternative_prob", "alternative_rank",
                 "alternative_margin", "loss", "top_id", "top_prob"):
        assert out[name].shape == (4, 3), name
    assert out["logprobs"].shape == (4, 3, 7)
    # KL averages the answer positions; the token metrics read the last one.
    torch.testing.assert_close(out["kl"][1, 2], kl_divergence(clean[2], ablated[1, 2]).mean())
    torch.testing.assert_close(out["logit_diff"][3, 0], ablated[3, 0, -1, 1] - ablated[3, 0, -1, 4])
    torch.testing.assert_close(out["loss"][0, 1], next_token_loss(ablated[0, 1], torch.tensor([2, 3])))
    # A subset of prompts picks their own tokens.
    sub = metrics(ablated[:, 1:], clean[1:], [1, 2])
    torch.testing.assert_close(sub["logit_diff"], out["logit_diff"][:, 1:])
    assert math.isclose(float(metrics.clean(clean, [0, 1, 2])["kl"].abs().max()), 0.0, abs_tol=1e-6)
    means = prompt_mean(out)
    assert "top_id" not in means and means["kl"].shape == (4,)
    torch.testing.assert_close(means["kl"], out["kl"].mean(1))


def test_metrics_average_over_a_prompt_set(tiny_gpt2):
    model = tiny_gpt2.model
    prompts = prompts_from_texts(model, ["hello there", "another prompt here"], targets=["a", "b"],
                                 alternatives=["c", "d"])
    runner = AblationRunner(model, prompts, zero_ablation(model))
    metrics = AnswerMetrics.for_prompts(prompts)
    clean = clean_metrics(runner, metrics)
    assert clean["logit_diff"].shape == (2,)
    for i in range(2):
        logits = runner.clean_logits[i][-1]
        assert math.isclose(float(clean["logit_diff"][i]), float(logits[prompts.target_ids[i]] -
                                                               logits[prompts.alternative_ids[i]]), rel_tol=1e-5)
    values = runner.evaluate([(HeadRef(0, 0),)], metrics)
    assert prompt_mean(values)["kl"].item() == pytest.approx(values["kl"][0].mean().item())


def test_top_k_and_prediction_shift(tiny_gpt2):
    model = tiny_gpt2.model
    a, b, c = (model.to_single_token(t) for t in "ABC")
    clean = torch.zeros(257)
    clean[a], clean[b] = 5.0, 4.0
    ablated = clean.clone()
    ablated[c] = 6.0  # "C" jumps to the top
    top = top_k_table(model, clean, k=3)
    assert top["token"].tolist()[:2] == ["A", "B"] and top["rank"].tolist() == [1, 2, 3]
    shift = prediction_shift(model, clean, ablated, k=2)
    assert shift["token"].iloc[0] == "C" and shift["rank_after"].iloc[0] == 1
    assert set(shift["token"]) == {"A", "B", "C"}
    row = shift.set_index("token").loc["A"]
    assert row["rank_before"] == 1 and row["rank_after"] == 2 and row["change"] < 0
