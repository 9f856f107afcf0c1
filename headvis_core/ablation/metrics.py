"""How an ablation changes the prediction at the answer position(s).

All metrics read logits at the prompts' answer positions (default: the last
token) and are computed per prompt, then averaged over a prompt set:

- ``kl``: KL(clean || ablated) = sum_t p_clean(t) (log p_clean(t) - log p_ablated(t)),
  in nats, averaged over the answer positions; 0 when nothing changes
  (the standard "how much did the output distribution move" measure, e.g.
  Conmy et al. 2023, ACDC);
- ``logit_diff``: logit(target) - logit(alternative) at the last answer
  position (IOI: logit(IO) - logit(S), Wang et al. 2022);
- ``target_prob``/``target_rank`` and ``alternative_prob``/``alternative_rank``:
  the token's probability and rank (0 = top prediction);
- ``alternative_margin``: logit(alternative) - the largest other logit,
  positive exactly when the alternative is the top prediction;
- ``loss``: mean next-token cross-entropy at the answer positions against
  the true next tokens (the induction preset's metric on the second copy).
"""


from typing import Any, Optional, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int

ABLATION_METRIC_LABELS = {
    "kl": "KL(clean || ablated)",
    "logit_diff": "logit difference (target - alternative)",
    "loss": "loss on the answer tokens",
}


def kl_divergence(clean_logits: Float[torch.Tensor, "... vocab"],
                  ablated_logits: Float[torch.Tensor, "... vocab"]) -> Float[torch.Tensor, "..."]:
    """KL(clean || ablated) over the last (vocabulary) axis, in nats: ``[...]``."""
    clean = clean_logits.float().log_softmax(-1)
    ablated = ablated_logits.float().log_softmax(-1)
    return (clean.exp() * (clean - ablated)).sum(-1).clamp_min(0.0)


def gather_last(values: Float[torch.Tensor, "... vocab"], ids: Int[torch.Tensor, "..."]) -> Float[torch.Tensor, "..."]:
    """``values[..., ids]`` with ``ids`` broadcast over the leading axes: ``[...]``."""
    ids = ids.to(values.device).long()
    ids = ids.expand(values.shape[:-1])
    return values.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def logit_difference(logits: Float[torch.Tensor, "... vocab"], target_ids: Int[torch.Tensor, "..."],
                     alternative_ids: Int[torch.Tensor, "..."]) -> Float[torch.Tensor, "..."]:
    """``logit[target] - logit[alternative]``: ``[...]`` from ``logits [..., vocab]``."""
    return gather_last(logits.float(), target_ids) - gather_last(logits.float(), alternative_ids)


def token_probability(logits: Float[torch.Tensor, "... vocab"],
                      ids: Int[torch.Tensor, "..."]) -> Float[torch.Tensor, "..."]:
    return gather_last(logits.float().softmax(-1), ids)


def token_rank(logits: Float[torch.Tensor, "... vocab"], ids: Int[torch.Tensor, "..."]) -> Int[torch.Tensor, "..."]:
    """How many tokens have a strictly larger logit (0 = the top prediction)."""
    own = gather_last(logits, ids)
    return (logits > own.unsqueeze(-1)).sum(-1)


def margin_over_rest(logits: Float[torch.Tensor, "... vocab"],
                     ids: Int[torch.Tensor, "..."]) -> Float[torch.Tensor, "..."]:
    """``logit[id] - max_{t != id} logit[t]``: positive exactly when ``id`` is the unique top token."""
    logits = logits.float()
    own = gather_last(logits, ids)
    others = logits.scatter(-1, ids.to(logits.device).long().expand(logits.shape[:-1]).unsqueeze(-1),
                            float("-inf"))
    return own - others.max(-1).values


def next_token_loss(logits: Float[torch.Tensor, "... n_ans vocab"],
                    label_ids: Int[torch.Tensor, "... n_ans"]) -> Float[torch.Tensor, "..."]:
    """Mean cross-entropy of ``label_ids [..., n_ans]`` under ``logits [..., n_ans, vocab]``: ``[...]``."""
    logprobs = logits.float().log_softmax(-1)
    return -gather_last(logprobs, label_ids).mean(-1)


class AnswerMetrics:
    """The metric function :meth:`AblationRunner.evaluate` calls on each batch of ablated logits.

    Per-prompt token ids come from the prompt set; ``alternative_ids``
    overrides its alternatives (the targeted search's token).
    """

    def __init__(self, target_ids: Optional[Sequence[int]] = None, alternative_ids: Optional[Sequence[int]] = None,
                 label_ids: Optional[Sequence[Sequence[int]]] = None, keep_logprobs: bool = False):
        self.target_ids = None if target_ids is None else torch.tensor(list(target_ids))
        self.alternative_ids = None if alternative_ids is None else torch.tensor(list(alternative_ids))
        self.label_ids = None if label_ids is None else [tuple(x) for x in label_ids]
        self.keep_logprobs = keep_logprobs

    @classmethod
    def for_prompts(cls, prompts: Any, alternative_ids: Optional[Sequence[int]] = None,
                    keep_logprobs: bool = False) -> "AnswerMetrics":
        return cls(target_ids=prompts.target_ids,
                   alternative_ids=alternative_ids if alternative_ids is not None else prompts.alternative_ids,
                   label_ids=prompts.label_ids, keep_logprobs=keep_logprobs)

    def __call__(self, ablated: torch.Tensor, clean: torch.Tensor, indices: list[int]) -> dict[str, torch.Tensor]:
        """``ablated [n, P, n_ans, vocab]``, ``clean [P, n_ans, vocab]`` -> ``{name: [n, P]}``."""
        final = ablated[:, :, -1]  # [n, P, vocab]
        out = {"kl": kl_divergence(clean.unsqueeze(0), ablated).mean(-1)}
        top = final.argmax(-1)
        out["top_id"] = top
        out["top_prob"] = token_probability(final, top)
        if self.target_ids is not None:
            target = self.target_ids[indices]
            out["target_prob"] = token_probability(final, target)
            out["target_rank"] = token_rank(final, target)
        if self.alternative_ids is not None:
            alternative = self.alternative_ids[indices]
            out["alternative_prob"] = token_probability(final, alternative)
            out["alternative_rank"] = token_rank(final, alternative)
            out["alternative_margin"] = margin_over_rest(final, alternative)
            if self.target_ids is not None:
                out["logit_diff"] = logit_difference(final, self.target_ids[indices], alternative)
        if self.label_ids is not None:
            labels = torch.tensor([self.label_ids[i] for i in indices])  # [P, n_ans]
            out["loss"] = next_token_loss(ablated, labels)
        if self.keep_logprobs:
            out["logprobs"] = final.float().log_softmax(-1)
        return out

    def clean(self, clean: torch.Tensor, indices: list[int]) -> dict[str, torch.Tensor]:
        """The same metrics for the unablated run: ``{name: [P]}``."""
        return {k: v[0] for k, v in self(clean.unsqueeze(0), clean, indices).items()}


def clean_metrics(runner: Any, metrics: AnswerMetrics) -> dict[str, torch.Tensor]:
    """Metrics of the clean run for every prompt of ``runner``: ``{name: [n_prompts]}``."""
    out: dict[str, torch.Tensor] = {}
    for group in runner.groups:
        for name, value in metrics.clean(group.clean_logits, group.indices).items():
            if name not in out:
                out[name] = torch.zeros((len(runner.prompts),) + tuple(value.shape[1:]), dtype=value.dtype)
            out[name][group.indices] = value.cpu()
    return out


def prompt_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average ``{name: [n, P]}`` over prompts (skipping ids, which do not average): ``{name: [n]}``."""
    return {k: v.float().mean(1) for k, v in values.items() if k not in ("top_id", "logprobs")}


def top_k_table(model: Any, logits: torch.Tensor, k: int = 10) -> pd.DataFrame:
    """The ``k`` most likely next tokens from ``logits [vocab]``."""
    probs = logits.float().softmax(-1)
    values, ids = probs.topk(min(k, probs.shape[-1]))
    return pd.DataFrame({
        "rank": range(1, len(ids) + 1),
        "token": [model.to_single_str_token(int(i)) for i in ids],
        "token_id": [int(i) for i in ids],
        "probability": [float(v) for v in values],
        "logit": [float(logits[int(i)]) for i in ids],
    })


def prediction_shift(model: Any, clean_logits: torch.Tensor, ablated_logits: torch.Tensor,
                     k: int = 10) -> pd.DataFrame:
    """Tokens in the top ``k`` before or after an ablation, with their probability and rank in both."""
    before = clean_logits.float().softmax(-1)
    after = ablated_logits.float().softmax(-1)
    ids = list(dict.fromkeys(before.topk(k).indices.tolist() + after.topk(k).indices.tolist()))
    index = torch.tensor(ids)
    rank_before = token_rank(clean_logits.unsqueeze(0).expand(len(ids), -1), index) + 1
    rank_after = token_rank(ablated_logits.unsqueeze(0).expand(len(ids), -1), index) + 1
    table = pd.DataFrame({
        "token": [model.to_single_str_token(i) for i in ids],
        "token_id": ids,
        "prob_before": before[index].tolist(),
        "prob_after": after[index].tolist(),
        "rank_before": rank_before.tolist(),
        "rank_after": rank_after.tolist(),
    })
    table["change"] = table["prob_after"] - table["prob_before"]
    return table.sort_values("prob_after", ascending=False, ignore_index=True)
