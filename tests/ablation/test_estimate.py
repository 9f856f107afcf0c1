"""Attribution patching: the batched gradient formula equals a per-head first-order (or, for KL,
second-order) term, agrees with TransformerLens's own attribution patching where both apply, and
ranks SmolLM2's IOI heads close to the exact ablation."""

import numpy as np
import pytest
import torch
from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

from headvis_core import hooks
from headvis_core.ablation.estimate import agreement, estimate_heads, refine_estimate
from headvis_core.ablation.metrics import kl_divergence, logit_difference, next_token_loss
from headvis_core.ablation.values import make_ablation
from headvis_core.data.prompt_pairs import induction_prompts, ioi_prompts, prompts_from_texts
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.hooks import z_hook

IOI = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and Kate went to the store, Mike gave a drink to"
# One length under the tiny models' byte tokenizer (mean ablation averages position by position).
PROMPTS = [IOI, CORRUPT, "When Anna and Fred went to the store, Fred gave a drink to"]


def _scaled_patch(model, tokens, ablation, indices, head, epsilon, positions):
    """Logits at ``positions`` with head ``head`` moved ``epsilon`` of the way to its ablated value."""
    def hook(z, hook):
        change = ablation.replacement(head.layer, indices, z.shape[1], z) - z.detach()
        mask = torch.zeros(z.shape[2], dtype=z.dtype)
        mask[head.head] = 1.0
        return z + epsilon * change * mask[None, None, :, None]

    return model.run_with_hooks(torch.stack(tokens), fwd_hooks=[(z_hook(head.layer), hook)]
                                )[:, list(positions)].float()


def _per_head_derivative(model, prompts, ablation, metric_of_logits, head, order=1):
    """d^order/d eps of the prompt-mean metric at eps = 0, one autograd pass per head (the slow reference)."""
    epsilon = torch.zeros((), requires_grad=True)
    with hooks.model_lock(model), torch.enable_grad():
        try:
            logits = _scaled_patch(model, prompts.tokens, ablation, list(range(len(prompts))), head, epsilon,
                                   prompts.answer_positions[0])
            value = metric_of_logits(logits).mean()
            (first,) = torch.autograd.grad(value, epsilon, create_graph=order > 1)
            if order == 1:
                return float(first)
            (second,) = torch.autograd.grad(first, epsilon)
            return float(second)
        finally:
            model.reset_hooks(including_permanent=False)


def _heads(model):
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    return [HeadRef(0, 0), HeadRef(0, n_heads - 1), HeadRef(n_layers - 1, 1)]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_logit_diff_estimate_equals_the_per_head_first_order_term(name, kind, request):
    model = request.getfixturevalue(name.replace("-", "_")).model
    prompts = prompts_from_texts(model, PROMPTS, targets=["M"] * 3, alternatives=["J"] * 3)
    ablation = make_ablation(model, kind, prompts)
    estimate = estimate_heads(model, prompts, ablation, metric="logit_diff")
    target, alternative = torch.tensor(prompts.target_ids), torch.tensor(prompts.alternative_ids)

    def logit_diff(logits):
        return logit_difference(logits[:, -1], target, alternative)

    for head in _heads(model):
        slope = _per_head_derivative(model, prompts, ablation, logit_diff, head)
        # importance is the drop: minus the slope
        assert estimate.importance[head.layer, head.head] == pytest.approx(-slope, rel=1e-5, abs=1e-7)
    assert estimate.clean["logit_diff"] == pytest.approx(float(logit_diff(hooks.forward(
        model, torch.stack(prompts.tokens))[:, -1:]).mean()), rel=1e-5)


def test_prompts_of_several_lengths_average_their_groups(tiny_llama):
    model = tiny_llama.model
    texts = PROMPTS[:2] + ["When Anna and Bob went to the park, Bob gave a ball to"]
    prompts = prompts_from_texts(model, texts, targets=["M"] * 3, alternatives=["J"] * 3)
    assert len(prompts.length_groups()) == 2
    mixed = estimate_heads(model, prompts, metric="logit_diff").importance
    parts = [estimate_heads(model, prompts.subset(i), metric="logit_diff").importance for i in ([0, 1], [2])]
    np.testing.assert_allclose(mixed, (2 * parts[0] + parts[1]) / 3, rtol=1e-5, atol=1e-7)


def test_the_estimate_is_the_slope_of_the_exact_ablation(tiny_gpt2):
    """A finite difference of the real (partially) ablated run: the estimate is its tangent at 0."""
    model = tiny_gpt2.model
    prompts = induction_prompts(model, n_seqs=2, half_len=6)
    ablation = make_ablation(model, "zero", prompts)
    estimate = estimate_heads(model, prompts, ablation, metric="loss")
    labels = torch.tensor(prompts.label_ids)
    # float32 logits: a step large enough to rise above rounding, on the heads that matter most
    step = 0.05
    strongest = np.argsort(-np.abs(estimate.importance).ravel())[:3]
    for head in (HeadRef(*divmod(int(i), model.cfg.n_heads)) for i in strongest):
        with hooks.exclusive(model):
            try:
                up, down = (next_token_loss(_scaled_patch(model, prompts.tokens, ablation, [0, 1], head, e,
                                                          prompts.answer_positions[0]), labels).mean()
                            for e in (step, -step))
            finally:
                model.reset_hooks(including_permanent=False)
        slope = float(up - down) / (2 * step)
        assert estimate.importance[head.layer, head.head] == pytest.approx(slope, rel=2e-2)


def test_kl_estimate_over_the_whole_vocabulary_is_the_exact_second_order_term(tiny_llama):
    model = tiny_llama.model
    prompts = prompts_from_texts(model, PROMPTS[:2])
    ablation = make_ablation(model, "zero", prompts)
    estimate = estimate_heads(model, prompts, ablation, metric="kl", fisher_tokens=model.cfg.d_vocab)
    assert "first-order term is zero" in estimate.note
    clean = hooks.forward(model, torch.stack(prompts.tokens))[:, -1:].float()
    for head in _heads(model):
        curvature = _per_head_derivative(model, prompts, ablation,
                                         lambda logits: kl_divergence(clean, logits).mean(-1), head, order=2)
        assert estimate.importance[head.layer, head.head] == pytest.approx(curvature / 2, rel=1e-4, abs=1e-9)
    # Fewer tokens: an approximation of the same quantity, never negative.
    few = estimate_heads(model, prompts, ablation, metric="kl", fisher_tokens=4)
    assert (few.importance >= 0).all() and "4 most likely tokens" in few.note


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_resample_estimate_equals_transformer_lens_attribution_patching(name, request):
    """Where TransformerLens's node attribution applies (resample ablation: a corrupted *prompt*), it gives
    the same numbers: its clean/corrupt pair is our corrupted/clean pair (we linearise around the clean run),
    summed over positions."""
    model = request.getfixturevalue(name.replace("-", "_")).model
    prompts = prompts_from_texts(model, [IOI], targets=["M"], alternatives=["J"], corrupted=[CORRUPT])
    ablation = make_ablation(model, "resample", prompts)
    ours = estimate_heads(model, prompts, ablation, metric="logit_diff")
    target, alternative = prompts.target_ids[0], prompts.alternative_ids[0]

    def metric_fn(logits):
        return logits[0, -1, target] - logits[0, -1, alternative]

    # TransformerLens reads gradients through the graph of the weights, which the loader freezes.
    model.requires_grad_(True)
    try:
        theirs = attribution_patch(model, prompts.corrupted_tokens[0][None], prompts.tokens[0][None], metric_fn)
    finally:
        model.requires_grad_(False)
    summed = np.zeros_like(ours.importance)
    for node, score in theirs.node_scores.items():
        if node.kind == "attn_head_out":
            summed[node.layer, node.head] += score
    np.testing.assert_allclose(ours.importance, -summed, rtol=1e-4, atol=1e-6)


def test_transformer_lens_edge_attribution_refuses_grouped_query_attention(tiny_llama):
    model = tiny_llama.model
    assert model.cfg.n_key_value_heads != model.cfg.n_heads
    tokens = prompts_from_texts(model, [IOI]).tokens[0][None]
    with pytest.raises(ValueError, match="GQA"):
        attribution_patch(model, tokens, tokens, lambda logits: logits[0, -1, 0],
                          config=EdgeAttributionConfig(granularity="edge"))


def test_agreement_figures():
    exact = np.array([[3.0, 2.0, np.nan], [1.0, 0.0, np.nan]])
    same_order = np.array([[30.0, 20.0, 99.0], [10.0, 0.0, -5.0]])
    result = agreement(same_order, exact, top_k=2)
    assert result.spearman == pytest.approx(1.0) and result.top_k_overlap == 2 and result.n_heads == 4
    reversed_order = -same_order
    result = agreement(reversed_order, exact, top_k=2)
    assert result.spearman == pytest.approx(-1.0) and result.top_k_overlap == 0
    assert np.isnan(agreement(same_order, np.full((2, 3), np.nan)).spearman)


def test_bad_inputs_are_clear_errors(tiny_gpt2):
    model = tiny_gpt2.model
    prompts = prompts_from_texts(model, [IOI])
    with pytest.raises(InputError, match="target and an alternative"):
        estimate_heads(model, prompts, metric="logit_diff")
    with pytest.raises(InputError, match="at least 2 tokens"):
        estimate_heads(model, prompts, metric="kl", fisher_tokens=0)
    estimate = estimate_heads(model, prompts, metric="kl", fisher_tokens=2)
    with pytest.raises(InputError, match="at least one head"):
        refine_estimate(model, prompts, estimate, top_n=0)


def test_refined_heads_are_the_estimates_top_heads(tiny_llama):
    model = tiny_llama.model
    prompts = prompts_from_texts(model, PROMPTS[:2], targets=["M"] * 2, alternatives=["J"] * 2)
    estimate = estimate_heads(model, prompts, metric="logit_diff")
    refined = refine_estimate(model, prompts, estimate, top_n=5, top_k=3)
    assert sorted(refined.exact.table["label"]) == sorted(str(h) for h in estimate.top_heads(5))
    assert np.isfinite(refined.exact.importance).sum() == 5
    assert refined.agreement.n_heads == 5 and refined.agreement.top_k == 3
    assert refined.table["exact"].notna().sum() == 5


def test_smollm2_ioi_estimate_ranks_heads_like_the_exact_ablation(smollm2):
    """Four IOI prompts, zero ablation, all 270 heads also ablated exactly."""
    model = smollm2.model
    prompts = ioi_prompts(model, n_prompts=4, seed=0)
    ablation = make_ablation(model, "zero", prompts)
    estimate = estimate_heads(model, prompts, ablation, metric="logit_diff")
    from headvis_core.ablation.ranking import rank_heads_by_ablation

    exact = rank_heads_by_ablation(model, prompts, ablation, metric="logit_diff", top_n=0)
    result = agreement(estimate.importance, exact.importance, top_k=10)
    assert result.n_heads == model.cfg.n_layers * model.cfg.n_heads
    assert result.spearman > 0.5, result.summary
    assert result.top_k_overlap >= 5, result.summary
