"""Attribution patching: every head's ablation effect estimated from one forward and one backward pass.

Attribution patching (Nanda 2023, "Attribution patching: activation patching
at industrial scale"; Syed, Rager & Conmy 2023, "Attribution patching
outperforms automated circuit discovery") replaces one ablated forward pass
per head by a Taylor expansion around the clean run. With ``z`` a head's
output at ``hook_z`` (``[pos, d_head]`` per prompt) and ``z'`` what the
ablation puts there (zero, the mean, or the corrupted prompt's value):

    metric(ablated) - metric(clean) ~= grad_z metric(clean) . (z' - z)

summed over positions and ``d_head``, and averaged over prompts. One forward
pass with a zero "patch" tensor added at every ``hook_z`` and one backward
pass of the metric give the gradient for every head at once.

KL(clean || ablated) has zero gradient at the clean run (it is a minimum),
so its first-order term vanishes for every head. Its leading term is second
order: with ``delta_t`` the (linearised) change of logit ``t``,
``KL ~= 1/2 Var_{t ~ p}(delta_t)`` (the Fisher information metric). The
estimate computes ``delta_t = grad_z logit_t . (z' - z)`` for the ``fisher_tokens``
most likely next tokens of the clean run (one backward pass each) and takes
their variance under ``p`` renormalised to those tokens; with every token of
the vocabulary it equals the exact second-order term.

TransformerLens 4.3's ``transformer_lens.tools.analysis.attribution_patching``
scores nodes by ``(a_clean - a_corrupt) . grad`` for a pair of *token*
inputs, one prompt at a time. That is resample ablation only: zero and mean
ablation replace activations with values no prompt produces, and its
per-example loop runs a prompt set in ``2 x n_prompts`` passes, not two.
Its edge granularity also refuses grouped-query attention (SmolLM2 has 3
key/value heads for 9 query heads). ``tests/ablation/test_estimate.py`` checks
that both agree exactly on resample ablation, where they overlap.

Signs follow :mod:`headvis_core.ablation.ranking`: the importance is the KL,
the drop of the logit difference, or the rise of the loss.
"""

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy.stats import spearmanr

from headvis_core import hooks
from headvis_core.ablation.metrics import logit_difference, next_token_loss
from headvis_core.ablation.ranking import HeadRanking, check_metric, rank_heads_by_ablation
from headvis_core.ablation.values import Ablation, check_hookable, zero_ablation
from headvis_core.data.prompt_pairs import PromptPairs
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.hooks import z_hook
from headvis_core.progress import ProgressCallback, report, scaled

DEFAULT_FISHER_TOKENS = 16
DEFAULT_TOP_K = 10


@dataclass
class HeadEstimate:
    """Every head's estimated ablation effect (attribution patching)."""

    metric: str  # kl | logit_diff | loss
    kind: str  # zero | mean | resample
    importance: np.ndarray  # [n_layers, n_heads], the sign convention of HeadRanking.importance
    clean: dict[str, float]  # the clean run's metric, averaged over prompts
    n_prompts: int
    passes: str  # forward/backward passes run, in words
    seconds: float = 0.0
    note: str = ""

    @property
    def table(self) -> pd.DataFrame:
        """``rank, label, layer, head, estimate``, most important first."""
        n_layers, n_heads = self.importance.shape
        rows = [{"label": f"{layer}.{head}", "layer": layer, "head": head,
                 "estimate": float(self.importance[layer, head])}
                for layer in range(n_layers) for head in range(n_heads)]
        table = pd.DataFrame(rows).sort_values("estimate", ascending=False, kind="stable", ignore_index=True)
        table.insert(0, "rank", range(1, len(table) + 1))
        return table

    def top_heads(self, n: int) -> list[HeadRef]:
        return [HeadRef(int(r.layer), int(r.head)) for r in self.table.head(max(0, int(n))).itertuples()]


@dataclass
class Agreement:
    """How well an estimate ranks the heads that were also computed exactly."""

    spearman: float  # rank correlation over the heads computed exactly; NaN if fewer than 3 or constant
    top_k_overlap: int  # heads in both the estimate's and the exact top k (among those heads)
    top_k: int
    n_heads: int  # heads compared

    @property
    def summary(self) -> str:
        rho = "undefined" if not np.isfinite(self.spearman) else f"{self.spearman:.2f}"
        return (f"Spearman {rho} over {self.n_heads} heads computed exactly; "
                f"{self.top_k_overlap} of the top {self.top_k} in common")

    def to_dict(self) -> dict[str, Any]:
        return {"spearman": None if not np.isfinite(self.spearman) else float(self.spearman),
                "top_k_overlap": self.top_k_overlap, "top_k": self.top_k, "n_heads": self.n_heads}


@dataclass
class RefinedEstimate:
    """An estimate for every head, the exact values of its top heads, and their agreement."""

    estimate: HeadEstimate
    exact: HeadRanking  # computed for the estimate's top heads only
    agreement: Agreement

    @property
    def table(self) -> pd.DataFrame:
        """The estimate's table with an ``exact`` column (NaN for heads not refined)."""
        table = self.estimate.table
        table["exact"] = [float(self.exact.importance[r.layer, r.head]) for r in table.itertuples()]
        return table


def _metric_values(metric: str, logits: torch.Tensor, prompts: PromptPairs, indices: list[int]
                   ) -> torch.Tensor:
    """Per-prompt metric ``[P]`` from answer-position logits ``[P, n_ans, vocab]`` (not for KL)."""
    if metric == "logit_diff":
        target = torch.tensor([prompts.target_ids[i] for i in indices])
        alternative = torch.tensor([prompts.alternative_ids[i] for i in indices])
        return logit_difference(logits[:, -1], target, alternative)
    labels = torch.tensor([prompts.label_ids[i] for i in indices])
    return next_token_loss(logits, labels)


def _metric_readout(logits: torch.Tensor, metric: str, prompts: PromptPairs, indices: list[int],
                    out: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """One scalar: the metric summed over prompts (rows are independent, so each row gets its own gradient)."""
    values = _metric_values(metric, logits, prompts, indices)
    out["clean"] = values.detach()
    return [values.sum()]


def _top_logits_readout(logits: torch.Tensor, n_tokens: int, out: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """One scalar per (answer position, rank m): the clean run's m-th most likely logit, summed over prompts."""
    probs = logits.detach().softmax(-1)  # [P, n_ans, vocab]
    out["probs"], out["ids"] = probs.topk(n_tokens, dim=-1)
    rows = torch.arange(logits.shape[0])
    return [logits[rows, j, out["ids"][:, j, m]].sum() for j in range(logits.shape[1]) for m in range(n_tokens)]


def head_output_gradients(model: Any, tokens: torch.Tensor, positions: Sequence[int],
                          readout: Any) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], torch.Tensor]:
    """Clean ``hook_z`` of every layer and the gradients of ``readout``'s scalars with respect to them.

    ``readout(logits [P, n_ans, vocab])`` returns a list of scalars; each gets
    one backward pass. Returns ``(z, grads, logits)``: ``z[layer]`` and
    ``grads[i][layer]`` are ``[P, pos, n_heads, d_head]``.
    """
    n_layers = int(model.cfg.n_layers)
    patches: list[Optional[torch.Tensor]] = [None] * n_layers
    clean_z: list[Optional[torch.Tensor]] = [None] * n_layers

    def patch_hook(layer: int):
        # The zero patch added here is the leaf whose gradient is grad_z of the readout.
        def add_patch(z: torch.Tensor, hook: Any) -> torch.Tensor:
            clean_z[layer] = z.detach()
            patches[layer] = torch.zeros_like(z, requires_grad=True)
            return z + patches[layer]
        return add_patch

    fwd_hooks = [(z_hook(layer), patch_hook(layer)) for layer in range(n_layers)]
    # hooks.exclusive would switch gradients off, so hold the model's lock directly.
    with hooks.model_lock(model), torch.enable_grad():
        try:
            logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)[:, list(positions)].float()
            scalars = readout(logits)
            grads = []
            for i, scalar in enumerate(scalars):
                grads.append(list(torch.autograd.grad(scalar, patches, retain_graph=i + 1 < len(scalars))))
        finally:
            model.reset_hooks(including_permanent=False)
    return clean_z, grads, logits.detach()


def _head_dot(grad: torch.Tensor, change: torch.Tensor) -> Float[torch.Tensor, "batch head"]:  # noqa: F722
    """``sum over positions and d_head of grad * change`` for each prompt and head."""
    return (grad.float() * change.float()).sum(dim=(1, 3))


def estimate_heads(model: Any, prompts: PromptPairs, ablation: Optional[Ablation] = None,
                   metric: str = "kl", fisher_tokens: int = DEFAULT_FISHER_TOKENS,
                   progress: Optional[ProgressCallback] = None) -> HeadEstimate:
    """Attribution-patching estimate of every head's ablation importance (see the module docstring).

    ``logit_diff`` and ``loss``: one forward and one backward pass per group
    of same-length prompts. ``kl``: one forward and ``fisher_tokens`` backward
    passes per answer position (the second-order term over the clean run's
    ``fisher_tokens`` most likely tokens).
    """
    started = time.perf_counter()
    check_hookable(model)
    check_metric(metric, prompts)
    if len(prompts) == 0:
        raise InputError("No prompts to estimate on.")
    if metric == "kl" and int(fisher_tokens) < 2:
        raise InputError("The KL estimate needs at least 2 tokens of the clean prediction (fisher_tokens).")
    ablation = ablation or zero_ablation(model)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    total = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    clean_sum = 0.0
    backward_passes = 0
    groups = prompts.length_groups()
    kept_mass: list[float] = []
    for g, indices in enumerate(groups):
        tokens = torch.stack([prompts.tokens[i] for i in indices]).to(model.cfg.device)
        positions = prompts.answer_positions[indices[0]]
        n_answers = len(positions)
        top: dict[str, torch.Tensor] = {}
        if metric == "kl":
            n_tokens = min(int(fisher_tokens), int(model.cfg.d_vocab))
            readout = partial(_top_logits_readout, n_tokens=n_tokens, out=top)
        else:
            readout = partial(_metric_readout, metric=metric, prompts=prompts, indices=indices, out=top)
        clean_z, grads, _ = head_output_gradients(model, tokens, positions, readout)
        backward_passes += len(grads)
        changes = [ablation.replacement(layer, indices, tokens.shape[1], clean_z[layer]) - clean_z[layer]
                   for layer in range(n_layers)]
        if metric == "kl":
            weights = top["probs"]  # [P, n_ans, M]
            kept_mass.append(float(weights.sum(-1).mean()))
            weights = weights / weights.sum(-1, keepdim=True)
            group_kl = torch.zeros(len(indices), n_layers, n_heads, dtype=torch.float64)
            for j in range(n_answers):
                # delta[m]: [P, n_layers, n_heads], the linearised change of the m-th top logit (on the CPU, as
                # the totals are: under a device_map split each layer's gradients live on their own device)
                delta = torch.stack([torch.stack([_head_dot(grads[j * n_tokens + m][layer], changes[layer]).cpu()
                                                  for layer in range(n_layers)], dim=1)
                                     for m in range(n_tokens)]).double()
                w = weights[:, j].T.double()[:, :, None, None]  # [M, P, 1, 1]
                mean = (w * delta).sum(0)
                group_kl += 0.5 * (w * (delta - mean) ** 2).sum(0)
            total += (group_kl / n_answers).sum(0)
        else:
            change = torch.stack([_head_dot(grads[0][layer], changes[layer]).cpu()
                                  for layer in range(n_layers)],
                                 dim=1).double()  # [P, n_layers, n_heads]
            sign = -1.0 if metric == "logit_diff" else 1.0  # the drop of the logit difference, the rise of the loss
            total += sign * change.sum(0)
            clean_sum += float(top["clean"].sum())
        report(progress, (g + 1) / len(groups), f"{g + 1}/{len(groups)} prompt groups")
    importance = (total / len(prompts)).numpy()
    clean = {} if metric == "kl" else {metric: clean_sum / len(prompts)}
    passes = f"{len(groups)} forward and {backward_passes} backward passes"
    if metric == "kl":
        note = (f"KL's first-order term is zero at the clean run; second-order (Fisher) estimate over the "
                f"{min(int(fisher_tokens), int(model.cfg.d_vocab))} most likely tokens, which hold "
                f"{100 * float(np.mean(kept_mass)):.0f}% of the clean probability")
    else:
        note = "first-order (attribution patching)"
    return HeadEstimate(metric=metric, kind=ablation.kind, importance=importance, clean=clean,
                        n_prompts=len(prompts), passes=passes, seconds=time.perf_counter() - started, note=note)


def agreement(estimate: np.ndarray, exact: np.ndarray, top_k: int = DEFAULT_TOP_K) -> Agreement:
    """Spearman correlation and top-``k`` overlap over the heads where ``exact`` is known (not NaN).

    Both matrices are ``[n_layers, n_heads]`` importances (larger = more
    important); the top ``k`` are taken among the compared heads.
    """
    known = np.isfinite(exact) & np.isfinite(estimate)
    est, ex = estimate[known], exact[known]
    k = min(int(top_k), int(known.sum()))
    if len(ex) >= 3 and np.ptp(ex) > 0 and np.ptp(est) > 0:
        rho = float(spearmanr(est, ex).statistic)
    else:
        rho = float("nan")
    top_est = set(np.argsort(-est, kind="stable")[:k].tolist())
    top_ex = set(np.argsort(-ex, kind="stable")[:k].tolist())
    return Agreement(spearman=rho, top_k_overlap=len(top_est & top_ex), top_k=k, n_heads=int(known.sum()))


def refine_estimate(model: Any, prompts: PromptPairs, estimate: HeadEstimate, top_n: int,
                    ablation: Optional[Ablation] = None, top_k: int = DEFAULT_TOP_K,
                    progress: Optional[ProgressCallback] = None, **rank_kwargs: Any) -> RefinedEstimate:
    """Ablate the estimate's ``top_n`` heads exactly (``rank_heads_by_ablation``) and measure the agreement."""
    if int(top_n) < 1:
        raise InputError("Refine at least one head exactly (top N must be 1 or more).")
    heads = estimate.top_heads(int(top_n))
    exact = rank_heads_by_ablation(model, prompts, ablation=ablation, metric=estimate.metric, heads=heads,
                       progress=scaled(progress, 0.0, 1.0), **rank_kwargs)
    report(progress, 1.0, "done")
    return RefinedEstimate(estimate=estimate, exact=exact,
                           agreement=agreement(estimate.importance, exact.importance, top_k))


def _query_input_gradients(model: Any, tokens: torch.Tensor, receiver_layers: Sequence[int],
                           sender_layers: Sequence[int], readout: Any
                           ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Clean ``hook_z`` of ``sender_layers`` and the readout's gradient at ``hook_q_input`` of ``receiver_layers``.

    ``hook_q_input`` (``[batch, pos, n_heads, d_model]``, one residual copy per
    query head, before ``ln1``) only exists while the bridge's split Q/K/V
    input is on; the flags are restored afterwards.
    """
    cfg = model.cfg
    saved_split = bool(getattr(cfg, "use_split_qkv_input", False))
    saved_attn_in = bool(getattr(cfg, "use_attn_in", False))
    patches: dict[int, torch.Tensor] = {}
    clean_z: dict[int, torch.Tensor] = {}

    def add_patch(layer: int):
        def hook(fork: torch.Tensor, hook: Any) -> torch.Tensor:
            patches[layer] = torch.zeros_like(fork, requires_grad=True)
            return fork + patches[layer]
        return hook

    def keep_z(layer: int):
        def hook(z: torch.Tensor, hook: Any) -> None:
            clean_z[layer] = z.detach()
        return hook

    fwd_hooks = ([(f"blocks.{layer}.attn.hook_q_input", add_patch(layer)) for layer in receiver_layers]
                 + [(z_hook(layer), keep_z(layer)) for layer in sender_layers])
    with hooks.model_lock(model), torch.enable_grad():
        try:
            if saved_attn_in:
                model.set_use_attn_in(False)
            model.set_use_split_qkv_input(True)
            logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
            layers = sorted(patches)
            grads = torch.autograd.grad(readout(logits), [patches[layer] for layer in layers])
        finally:
            model.reset_hooks(including_permanent=False)
            model.set_use_split_qkv_input(saved_split)
            if saved_attn_in:
                model.set_use_attn_in(True)
    return clean_z, dict(zip(layers, grads))


def estimate_query_edges(model: Any, prompts: PromptPairs, receivers: Sequence[HeadRef]) -> pd.DataFrame:
    """Attribution patching of every edge ``sender -> receiver (Q)`` on the logit difference, noising.

    The path-patching effect of an edge (Wang et al. 2022: the sender's write
    ``z W_O`` from the corrupted run added to the receiver's query input
    only) is estimated as ``sum over positions of (dz_s W_O^s) . grad_{q_input of r} LD``,
    averaged over prompts: one forward and one backward pass for every edge
    into every receiver. Only the query input: under grouped-query attention
    a key/value input is shared by several query heads, so its gradient does
    not belong to one receiver. Returns ``sender, receiver, kind, estimate``.
    """
    padded = prompts.padded()
    device = model.cfg.device
    receiver_layers = sorted({r.layer for r in receivers})
    sender_layers = list(range(max(receiver_layers)))
    if not sender_layers:
        raise InputError("The receivers are in the first layer: no head writes into their queries.")
    last = padded.last.to(device)
    rows = torch.arange(padded.n_prompts, device=device)

    def readout(logits: torch.Tensor) -> torch.Tensor:
        final = logits[rows, last].float()
        return (final[rows, padded.answer.to(device)] - final[rows, padded.alternative.to(device)]).sum()

    # The senders sit below the top receiver's layer: the corrupted pass stops there (a block index < n_layers).
    _, corrupted = hooks.capture(model, padded.corrupted.to(device), [z_hook(layer) for layer in sender_layers],
                                 stop_at_layer=max(receiver_layers))
    clean_z, grads = _query_input_gradients(model, padded.clean.to(device), receiver_layers, sender_layers, readout)
    records = []
    for layer in sender_layers:
        W_O = model.blocks[layer].attn.W_O.detach()  # [head, d_head, d_model]
        dz = corrupted[z_hook(layer)].float() - clean_z[layer].float()  # [batch, pos, head, d_head]
        writes = torch.einsum("bphd,hdm->bphm", dz, W_O.float())  # [batch, pos, head, d_model]
        for receiver in receivers:
            if receiver.layer <= layer:
                continue
            grad = grads[receiver.layer][:, :, receiver.head].float()  # [batch, pos, d_model]
            values = torch.einsum("bphm,bpm->h", writes, grad) / padded.n_prompts
            for head, value in enumerate(values.tolist()):
                records.append({"sender": f"{layer}.{head}", "receiver": str(receiver), "kind": "q",
                                "estimate": value})
    return pd.DataFrame(records, columns=["sender", "receiver", "kind", "estimate"])
