"""Per-head attention-pattern metrics over a probe set, computed layer by layer.

Every metric is an average over query positions ``q >= 1`` (row 0 attends to
one key and says nothing about a head), pooled over all sequences of the
probe set. ``A[q, k]`` is one head's attention pattern on one sequence (rows
sum to 1, ``k <= q``), ``t`` the tokens of that sequence.

* ``previous_token``: mean of ``A[q, q-1]`` (Elhage et al. 2021; ARENA).
* ``induction``: on BOS + random tokens ``r`` repeated twice, mean over the
  second copy of the attention from each token to the token after its first
  occurrence, ``A[q, q - L + 1]`` for the ``L`` queries of the second copy
  (Olsson et al. 2022; the "induction stripe" of ARENA 1.2).
* ``duplicate_token``: ``sum_{k < q, t_k = t_q} A[q, k]``, averaged over the
  queries whose token occurred earlier in the sequence (Wang et al. 2022).
* ``attention_sink``: ``A[q, 0]``, attention to position 0 / BOS (Xiao et al.
  2023, "attention sinks").
* ``self_attention``: ``A[q, q]``, attention to the current token.
* ``entropy``: ``-sum_k A[q, k] log A[q, k] / log(min(q + 1, W))``, the entropy
  normalised by its maximum over the keys the query may see (``q + 1``, or the
  ``W`` of a sliding-window layer; 1 = uniform).
* ``mean_distance``: ``sum_k A[q, k] (q - k)``, in tokens.
* ``max_attention_no_bos``: ``max_{1 <= k <= q} A[q, k]``, the strongest
  single attention once the sink at position 0 is set aside (as HeadVis does).
* ``local_attention``: ``sum_{1 <= k, q - 3 <= k <= q} A[q, k]``, attention
  to the current token and the three before it (position 0 excluded).

The HeadVis set (Anthropic 2025, HeadVis ``compute_head_metrics``). From the
pre-softmax scores ``S[q, k]`` (``hook_attn_scores``) over the keys ``K(q)`` a
query may see (masked entries, causal or Gemma 3's sliding window, excluded),
averaged over queries ``q >= 1``:

* ``logit_std``: the population standard deviation of ``S[q, k]`` over ``K(q)``.
* ``top_logit_margin``: the largest minus the second largest ``S[q, k]`` over ``K(q)``.
* ``logit_z_score``: ``(max - mean) / std`` of ``S[q, k]`` over ``K(q)`` (0 where std is 0).

From the attention pairs ``(q, k)`` with ``k >= 1`` (the sink at position 0 set
aside), pooled over the probe set with the attention mass ``A[q, k]`` as weight:

* ``qk_distance``: ``sum A[q, k] (q - k) / sum A[q, k]``, the mass-weighted mean distance in tokens.
* ``qk_distance_variance``: ``sum A[q, k] (q - k - qk_distance)^2 / sum A[q, k]``.
* ``key_token_entropy`` / ``query_token_entropy``: the entropy in bits of the token ids at the
  *high-attention* pairs, keys and queries respectively. A pair is high-attention when
  ``A[q, k] >= HIGH_ATTENTION`` (0.3: the query puts at least 30% of its attention on that one
  non-BOS key, so at most three keys per query); each pair counts with weight ``A[q, k]``, and
  ``p(t)`` is the share of that mass whose key (query) token is ``t``. Low values: the head fires
  on a few specific tokens. NaN where a head has no high-attention pair.

Relation to TransformerLens ``head_detector.detect_head`` ("mul" measure, no
exclusions): for one prompt of ``n`` tokens detect_head divides the summed
attention on its detection pattern by ``sum A = n`` (all rows, row 0
included), while these metrics divide by the number of queries they average
over. So on one prompt, ``detect_head("previous_token_head") =
previous_token * (n - 1) / n`` and ``detect_head("duplicate_token_head") =
duplicate_token * n_dup / n``; on BOS + distinct random tokens repeated,
``detect_head("induction_head") = induction * L / (2L + 1)``. The tests check
these identities to 1e-5.

The induction pass hooks only ``blocks.{l}.attn.hook_pattern``; a text pass
adds ``hook_attn_scores`` (and, for the direct copying score of
:mod:`headvis_core.atlas.direct_copying`, ``hook_z`` and the norms' scales).
Each layer's tensors are reduced to running sums inside their hooks and
dropped, so no activation cache of all layers is ever held. The pass stops at
the last hook it needs (never running the unembedding).
"""


from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from headvis_core.atlas.direct_copying import DirectCopyingSums
from headvis_core.attribution.edge import sliding_window
from headvis_core.data.probes import InductionProbe
from headvis_core.errors import InputError
from headvis_core.hooks import pattern_hook, run_with_hooks
from headvis_core.progress import ProgressCallback, report, scaled

TEXT_METRICS = ("previous_token", "duplicate_token", "attention_sink", "self_attention", "entropy",
                "mean_distance", "max_attention_no_bos", "local_attention")
SCORE_METRICS = ("logit_std", "top_logit_margin", "logit_z_score")
PAIR_METRICS = ("qk_distance", "qk_distance_variance", "query_token_entropy", "key_token_entropy")
ATTENTION_METRICS = ("previous_token", "induction") + TEXT_METRICS[1:] + SCORE_METRICS
TEXT_SUM_METRICS = tuple(name for name in ATTENTION_METRICS if name != "induction")  # summed on real text
DEFAULT_SHARD_SEQUENCES = 64  # real-text sequences per shard: the atlas's default probe is one shard
LOCAL_WINDOW = 4  # current token and the three before it
HIGH_ATTENTION = 0.3  # a (query, key >= 1) pair at or above this attention counts for the token entropies


# ---------------------------------------------------------------------------
# Per-layer reductions: patterns [batch, head, query, key] -> sums [head]
# ---------------------------------------------------------------------------

def earlier_occurrences(tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch query key"]:
    """``[batch, query, key]`` float mask: 1 where key < query holds the same token as the query."""
    pos = torch.arange(tokens.shape[-1], device=tokens.device)
    return ((tokens[:, :, None] == tokens[:, None, :]) & (pos[:, None] > pos[None, :])).float()


def text_metric_sums(pattern: Float[torch.Tensor, "batch head query key"], tokens: Int[torch.Tensor, "batch pos"],
                     earlier_same: Optional[Float[torch.Tensor, "batch query key"]] = None,
                     window: Optional[int] = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Sums over (batch, query >= 1) of each text metric, ``{name: [head]}``, and how many queries each summed.

    Args:
        pattern: ``[batch, head, query, key]`` attention of one layer on ``tokens``.
        tokens: ``[batch, pos]``, the same sequences.
        earlier_same: :func:`earlier_occurrences` of ``tokens`` (computed here if not given; pass it to
            reuse it across layers).
        window: the layer's sliding window (keys a query may see), or ``None`` for full causal attention.
    """
    A = pattern.float()
    batch, _, n, _ = A.shape
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    if n < 2:
        for name in TEXT_METRICS:
            sums[name], counts[name] = A.new_zeros(A.shape[1]), 0.0
        return sums, counts
    queries = float(batch * (n - 1))
    pos = torch.arange(n, device=A.device)
    offset = (pos[:, None] - pos[None, :]).to(A.dtype)  # q - k: [query, key]
    # Metrics that weigh A by a fixed [query, key] matrix only need the pattern summed over the batch.
    summed = A[:, :, 1:, :].sum(0)  # [head, query >= 1, key]
    offset_rows = offset[1:]
    keys = pos[None, :].expand_as(offset_rows)
    weights = {
        "previous_token": (offset_rows == 1),
        "self_attention": (offset_rows == 0),
        "attention_sink": (keys == 0),
        "mean_distance": offset_rows.clamp(min=0),
        "local_attention": (offset_rows >= 0) & (offset_rows < LOCAL_WINDOW) & (keys >= 1),
    }
    for name, weight in weights.items():
        sums[name] = (summed * weight.to(A.dtype)).sum((1, 2))
    visible = (pos[1:] + 1).to(A.dtype)  # keys query q >= 1 may see: q + 1, or the sliding window
    inv_log_keys = 1.0 / torch.log(visible if window is None else visible.clamp(max=float(window)))
    rows = A[:, :, 1:, :]
    sums["entropy"] = -(torch.special.xlogy(rows, rows).sum(-1) * inv_log_keys).sum((0, 2))
    sums["max_attention_no_bos"] = rows[..., 1:].amax(-1).sum((0, 2))
    for name in ("previous_token", "self_attention", "attention_sink", "entropy", "mean_distance",
                 "max_attention_no_bos", "local_attention"):
        counts[name] = queries
    if earlier_same is None:
        earlier_same = earlier_occurrences(tokens)
    earlier_same = earlier_same.to(device=A.device, dtype=A.dtype)
    n_heads = A.shape[1]
    sums["duplicate_token"] = (A.reshape(batch, n_heads, n * n) @ earlier_same.reshape(batch, n * n, 1)).sum((0, 2))
    counts["duplicate_token"] = float((earlier_same.sum(-1) > 0).sum())
    return sums, counts


def induction_sums(pattern: Float[torch.Tensor, "batch head query key"], half_len: int,
                   prefix_len: int) -> tuple[Float[torch.Tensor, " head"], float]:
    """Sum over the second copy of the induction stripe ``A[q, q - L + 1]``, ``[head]``, and the query count.

    Args:
        pattern: ``[batch, head, query, key]`` on an :class:`InductionProbe` (``prefix + 2L`` tokens).
    """
    stripe = pattern.float().diagonal(offset=-(half_len - 1), dim1=-2, dim2=-1)
    # diagonal element i sits at query L - 1 + i; the second copy starts at query prefix + L
    second_copy = stripe[:, :, prefix_len + 1:]
    return second_copy.sum((0, 2)), float(second_copy.shape[0] * second_copy.shape[2])


def received_attention(pattern: Float[torch.Tensor, "batch head query key"],
                       token_index: Int[torch.Tensor, "batch pos"], n_ids: int) -> Float[torch.Tensor, "head n_ids"]:
    """``[head, n_ids]``: attention each token id received as a key (positions >= 1), summed over queries.

    Args:
        pattern: ``[batch, head, query, key]``.
        token_index: ``[batch, pos]`` the tokens as indices into ``range(n_ids)`` (token ids, or positions in a
            compact list of the ids that occur).
    """
    received = pattern.float()[:, :, 1:, 1:].sum(2)  # [batch, head, key >= 1]
    n_heads = received.shape[1]
    out = received.new_zeros(n_heads, n_ids)
    index = token_index[:, 1:].reshape(-1).to(received.device)
    out.index_add_(1, index, received.permute(1, 0, 2).reshape(n_heads, -1))
    return out


def allowed_keys(scores: Float[torch.Tensor, "batch head query key"]) -> torch.Tensor:
    """``[batch, head, query, key]`` bool: the keys the mask lets each query see.

    The bridge's attention fills masked scores (causal, sliding window) with the dtype's most
    negative value before ``hook_attn_scores`` fires; ``-inf`` is treated the same way.
    """
    return scores > torch.finfo(scores.dtype).min / 2


def score_metric_sums(scores: Float[torch.Tensor, "batch head query key"], dtype: torch.dtype = torch.float64
                      ) -> tuple[dict[str, torch.Tensor], float]:
    """Sums over (batch, query >= 1) of ``logit_std``, ``top_logit_margin``, ``logit_z_score``, ``{name: [head]}``.

    Args:
        scores: one layer's pre-softmax scores (``hook_attn_scores``), masked entries at the dtype's minimum.
        dtype: the precision of the reduction (the dataset scan uses float32: half the work per layer).
    Returns:
        the sums and the number of queries summed.
    """
    n_batch, n_heads = scores.shape[:2]
    if scores.shape[2] <= 1:
        return {name: scores.new_zeros(n_heads, dtype=dtype) for name in SCORE_METRICS}, 0.0
    queries = scores[:, :, 1:]
    hidden = queries <= torch.finfo(scores.dtype).min / 2  # not allowed_keys (one pass, not two)
    n_keys = hidden.shape[-1] - torch.count_nonzero(hidden, dim=-1)
    n_allowed = n_keys.clamp(min=1).to(dtype)
    # one working copy, reused in place (the reduction ran ~8 passes over float32 copies before):
    # masked keys at -inf, then every score relative to the row's top score
    work = torch.where(hidden, -torch.inf, queries.to(dtype))  # a new tensor: the scores stay untouched
    top, top_key = work.max(-1)
    work.sub_(top[..., None])
    # the second largest score (a topk(2) costs ten times more on the CPU): the largest once one top key
    # is dropped, so where two keys share the top score it is that score again. The dropped key (0 once
    # centred) adds nothing to the centred sum below, so the copy serves both.
    second = work.scatter_(-1, top_key[..., None], -torch.inf).amax(-1)  # second largest minus the top
    # a query that sees a single key has no second score: its margin is 0
    margin = torch.where(n_keys >= 2, -second, torch.zeros_like(top))
    # two-pass variance without cancellation: the mean of the centred scores, then the spread about it
    centred = work.nan_to_num_(neginf=0.0)  # masked and top keys 0 (a top key is 0 once centred)
    mean_below_top = centred.sum(-1) / n_allowed
    centred.sub_(mean_below_top[..., None]).masked_fill_(hidden, 0.0)
    std = torch.linalg.vector_norm(centred, dim=-1) / n_allowed.sqrt()
    z_score = torch.where(std > 0, -mean_below_top / std.clamp(min=torch.finfo(dtype).tiny),
                          torch.zeros_like(top))
    sums = {"logit_std": std.sum((0, 2)), "top_logit_margin": margin.sum((0, 2)),
            "logit_z_score": z_score.sum((0, 2))}
    return sums, float(n_batch * (scores.shape[2] - 1))


def distance_moments(pattern: Float[torch.Tensor, "batch head query key"]) -> Float[torch.Tensor, "3 head"]:
    """``[3, head]``: ``sum A[q, k]``, ``sum A[q, k] (q - k)`` and ``sum A[q, k] (q - k)^2`` over keys ``k >= 1``."""
    A = pattern.double()[..., 1:].sum(0)  # [head, query, key >= 1]
    n = pattern.shape[-1]
    pos = torch.arange(n, device=pattern.device, dtype=torch.float64)
    distance = (pos[:, None] - pos[None, 1:]).clamp(min=0)  # [query, key >= 1]; A is 0 where k > q
    return torch.stack([A.sum((1, 2)), (A * distance).sum((1, 2)), (A * distance ** 2).sum((1, 2))])


def distance_mean_variance(moments: Float[torch.Tensor, "3 ..."]) -> tuple[torch.Tensor, torch.Tensor]:
    """``qk_distance`` and ``qk_distance_variance`` from summed :func:`distance_moments` ``[3, ...]``; NaN
    where there is no mass."""
    mass, first, second = moments.double().unbind(0)
    mean = torch.where(mass > 0, first / mass.clamp(min=1e-300), torch.nan)
    variance = torch.where(mass > 0, (second / mass.clamp(min=1e-300) - mean ** 2).clamp(min=0), torch.nan)
    return mean, variance


def high_attention_token_mass(pattern: Float[torch.Tensor, "batch head query key"],
                              token_index: Int[torch.Tensor, "batch pos"],
                              n_ids: int) -> tuple[Float[torch.Tensor, "head n_ids"],
                                                   Float[torch.Tensor, "head n_ids"]]:
    """``(query side, key side)``, each ``[head, n_ids]``: the attention mass of the high-attention pairs
    (``A[q, k] >= HIGH_ATTENTION``, ``k >= 1``) per token id at the query, and at the key."""
    by_query, by_key = high_attention_position_mass(pattern)
    n_heads = by_query.shape[1]
    index = token_index.to(by_query.device)
    key_mass = by_key.new_zeros(n_heads, n_ids).index_add_(1, index[:, 1:].reshape(-1),
                                                           by_key.permute(1, 0, 2).reshape(n_heads, -1))
    query_mass = by_query.new_zeros(n_heads, n_ids).index_add_(1, index[:, 1:].reshape(-1),
                                                               by_query.permute(1, 0, 2).reshape(n_heads, -1))
    return query_mass, key_mass


def high_attention_position_mass(pattern: Float[torch.Tensor, "batch head query key"]
                                 ) -> tuple[Float[torch.Tensor, "batch head pos_after_0"],
                                            Float[torch.Tensor, "batch head pos_after_0"]]:
    """``(query side, key side)``, each ``[batch, head, position >= 1]``: the attention mass of the
    high-attention pairs (``A[q, k] >= HIGH_ATTENTION``, ``k >= 1``) at each query position, and at each
    key position (before it is pooled by token id)."""
    A = pattern.float()[..., 1:]
    # A where A >= HIGH_ATTENTION, else 0, in one fused pass (threshold keeps values strictly above its
    # threshold: the float32 just below HIGH_ATTENTION)
    just_below = torch.nextafter(torch.tensor(HIGH_ATTENTION, dtype=A.dtype), torch.tensor(-1.0, dtype=A.dtype))
    high = torch.nn.functional.threshold(A, float(just_below), 0.0)  # [batch, head, query, key >= 1]
    by_key = high.sum(2)  # [batch, head, key >= 1]
    by_query = high[:, :, 1:].sum(3)  # [batch, head, query >= 1]: query 0 sees no key >= 1
    return by_query, by_key


def entropy_bits(mass: Float[torch.Tensor, "... n"]) -> Float[torch.Tensor, "..."]:
    """Entropy in bits of the distribution ``mass / mass.sum(-1)``; NaN where the mass is all zero."""
    mass = mass.double()
    total = mass.sum(-1, keepdim=True)
    p = mass / total.clamp(min=1e-300)
    entropy = -torch.special.xlogy(p, p).sum(-1) / np.log(2.0)
    return torch.where(total[..., 0] > 0, entropy, torch.nan)


# ---------------------------------------------------------------------------
# Running the model
# ---------------------------------------------------------------------------

class _AllPatternsSeen(Exception):
    """Raised in the last layer's pattern hook: nothing after it is needed."""


def for_each_layer_pattern(model: Any, tokens: Int[torch.Tensor, "batch pos"], on_pattern: Callable,
                           layers: Optional[Iterable[int]] = None) -> None:
    """Run ``tokens`` and call ``on_pattern(layer, pattern [batch, head, q, k])`` for each layer, then stop.

    Only the pattern hooks are added; the forward pass is cut short after the
    last requested layer's pattern, so later blocks and the unembedding never run.
    """
    layers = sorted(set(range(model.cfg.n_layers) if layers is None else layers))
    last = layers[-1]

    def hook(pattern: torch.Tensor, hook: Any, layer: int) -> None:
        on_pattern(layer, pattern.detach())
        if layer == last:
            raise _AllPatternsSeen()

    hooks = [(pattern_hook(layer), partial(hook, layer=layer)) for layer in layers]
    try:
        run_with_hooks(model, tokens.to(model.cfg.device), hooks, return_type=None)
    except _AllPatternsSeen:
        pass


@dataclass
class AttentionMetrics:
    """Per-head means ``{metric: [layer, head]}`` and where the attention went, over a probe set."""

    values: dict[str, np.ndarray]
    n_queries: dict[str, float]  # queries averaged over, per metric (per head)
    top_token_ids: np.ndarray  # [layer, head, k] token ids receiving most attention (positions >= 1)
    top_token_shares: np.ndarray  # [layer, head, k] their share of the head's attention outside position 0
    notes: list[str] = field(default_factory=list)


def length_batches(sequences: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Group ``[1, pos]`` / ``[batch, pos]`` tensors by length and cut them into ``[<=batch_size, pos]`` batches."""
    by_len: dict[int, list[torch.Tensor]] = {}
    for seq in sequences:
        seq = seq if seq.ndim == 2 else seq[None]
        by_len.setdefault(int(seq.shape[-1]), []).append(seq)
    out = []
    for length in sorted(by_len, reverse=True):
        stacked = torch.cat(by_len[length], dim=0)
        out.extend(stacked[i:i + batch_size] for i in range(0, stacked.shape[0], batch_size))
    return out


class _StopPass(Exception):
    """Raised in the last hook a pass needs: nothing after it is computed."""


def run_until(model: Any, tokens: Int[torch.Tensor, "batch pos"], hooks: dict[str, Callable[[torch.Tensor], None]],
              last: str) -> None:
    """Run ``tokens`` calling ``hooks[name](activation)`` at each named hook, and stop after ``last`` fires."""
    def fire(activation: torch.Tensor, hook: Any, name: str) -> None:
        hooks[name](activation.detach())
        if name == last:
            raise _StopPass()

    try:
        run_with_hooks(model, tokens.to(model.cfg.device), [(name, partial(fire, name=name)) for name in hooks],
                       return_type=None)
    except _StopPass:
        pass


class MetricSums:
    """Per-layer sums and query counts of every attention metric, and attention received per token id.

    The real-text part (every sum but the induction stripe's) is also the partial result of a text
    shard: :meth:`take_text_partial` hands it out as arrays and starts the next shard from zero,
    :meth:`load_text` puts the merged partials back before :meth:`finish`.
    """

    def __init__(self, model: Any, seen_ids: torch.Tensor, direct_copying: bool = True):
        n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
        self.n_layers = n_layers
        self.sums = {name: torch.zeros(n_layers, n_heads, dtype=torch.float64) for name in ATTENTION_METRICS}
        self.counts = {name: torch.zeros(n_layers, dtype=torch.float64) for name in ATTENTION_METRICS}
        self.seen_ids = seen_ids
        self.received = torch.zeros(n_layers, n_heads, len(seen_ids), dtype=torch.float32)
        self.moments = torch.zeros(n_layers, 3, n_heads, dtype=torch.float64)
        self.high_query = torch.zeros(n_layers, n_heads, len(seen_ids), dtype=torch.float32)
        self.high_key = torch.zeros(n_layers, n_heads, len(seen_ids), dtype=torch.float32)
        self.copying = DirectCopyingSums(model) if direct_copying else None

    def text_tensors(self) -> dict[str, torch.Tensor]:
        """The real-text accumulators by name (the tensors themselves, not copies)."""
        tensors = {}
        for name in TEXT_SUM_METRICS:
            tensors[f"sum.{name}"], tensors[f"count.{name}"] = self.sums[name], self.counts[name]
        tensors.update(received=self.received, moments=self.moments, high_query=self.high_query,
                       high_key=self.high_key)
        if self.copying is not None:
            tensors.update(copying_numerator=self.copying.numerator, copying_mass=self.copying.mass)
        return tensors

    def reset_text(self) -> None:
        for tensor in self.text_tensors().values():
            tensor.zero_()

    def take_text_partial(self) -> dict[str, np.ndarray]:
        """The real-text sums so far, as arrays (a shard's partial result); the sums start again from zero."""
        partial = {name: tensor.numpy().copy() for name, tensor in self.text_tensors().items()}
        self.reset_text()
        return partial

    def load_text(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the real-text sums to ``tensors`` (merged partials; same names and shapes)."""
        own = self.text_tensors()
        if set(own) != set(tensors):
            raise ValueError(f"text partial has {sorted(tensors)}, expected {sorted(own)}")
        for name, tensor in own.items():
            tensor.copy_(tensors[name])

    def add_text(self, model: Any, tokens: torch.Tensor) -> None:
        """One hooked pass over a batch of real text: every text metric and the attention received."""
        earlier_same = earlier_occurrences(tokens)
        token_index = torch.searchsorted(self.seen_ids, tokens)

        def on_scores(layer: int, scores: torch.Tensor) -> None:
            layer_sums, n_queries = score_metric_sums(scores)
            for name, value in layer_sums.items():
                self.sums[name][layer] += value.cpu()
                self.counts[name][layer] += n_queries

        def on_pattern(layer: int, pattern: torch.Tensor) -> None:
            layer_sums, layer_counts = text_metric_sums(pattern, tokens, earlier_same,
                                                        window=sliding_window(model, layer))
            for name, value in layer_sums.items():
                self.sums[name][layer] += value.double().cpu()
                self.counts[name][layer] += layer_counts[name]
            self.received[layer] += received_attention(pattern, token_index, len(self.seen_ids)).cpu()
            self.moments[layer] += distance_moments(pattern).cpu()
            query_mass, key_mass = high_attention_token_mass(pattern, token_index, len(self.seen_ids))
            self.high_query[layer] += query_mass.cpu()
            self.high_key[layer] += key_mass.cpu()
            if self.copying is not None:
                self.copying.on_pattern(layer, pattern)

        hooks: dict[str, Callable[[torch.Tensor], None]] = {}
        for layer in range(self.n_layers):
            hooks[f"blocks.{layer}.attn.hook_attn_scores"] = partial(on_scores, layer)
            hooks[pattern_hook(layer)] = partial(on_pattern, layer)
        last = pattern_hook(self.n_layers - 1)
        if self.copying is not None:
            self.copying.begin(tokens)
            for layer in range(self.n_layers):
                hooks[f"blocks.{layer}.attn.hook_z"] = partial(self.copying.on_z, layer)
                if self.copying.post[layer] is not None:
                    hooks[f"blocks.{layer}.ln1_post.hook_scale"] = partial(self.copying.on_post_scale, layer)
            hooks["ln_final.hook_scale"] = self.copying.on_final_scale
            last = "ln_final.hook_scale"
        run_until(model, tokens, hooks, last)

    def add_induction(self, model: Any, tokens: torch.Tensor, probe: InductionProbe) -> None:
        """One hooked pass over a batch of the induction probe: the induction stripe."""
        def on_induction(layer: int, pattern: torch.Tensor) -> None:
            stripe, n_queries = induction_sums(pattern, probe.half_len, probe.prefix_len)
            self.sums["induction"][layer] += stripe.double().cpu()
            self.counts["induction"][layer] += n_queries

        for_each_layer_pattern(model, tokens, on_induction)

    def pair_metrics(self) -> dict[str, np.ndarray]:
        mean, variance = distance_mean_variance(self.moments.transpose(0, 1))  # each [layer, head]
        return {"qk_distance": mean.numpy(), "qk_distance_variance": variance.numpy(),
                "query_token_entropy": entropy_bits(self.high_query).numpy(),
                "key_token_entropy": entropy_bits(self.high_key).numpy()}

    def finish(self, top_k: int, had_text: bool) -> AttentionMetrics:
        values = {}
        for name in ATTENTION_METRICS:
            n = self.counts[name][:, None]
            values[name] = torch.where(n > 0, self.sums[name] / n.clamp(min=1), torch.nan).numpy()
        values.update(self.pair_metrics())
        if self.copying is not None:
            values["direct_copying"] = self.copying.finish()
        k = min(top_k, len(self.seen_ids))
        total_received = self.received.sum(-1, keepdim=True).clamp(min=1e-12)
        shares, index = (self.received / total_received).topk(k, dim=-1)
        notes = []
        if had_text and self.counts["duplicate_token"].max() == 0:
            notes.append("No token repeats within a probe sequence, so duplicate-token scores are undefined (NaN).")
        return AttentionMetrics(values=values, n_queries={n: float(c[0]) for n, c in self.counts.items()},
                                top_token_ids=self.seen_ids[index].numpy(), top_token_shares=shares.numpy(),
                                notes=notes)


@dataclass(frozen=True)
class TextShardPlan:
    """The real-text batches of a probe, cut into shards of whole batches (the unit of parallel work).

    The batches are :func:`length_batches` of the probe's sequences; shard ``i`` is the batches
    ``shards[i]``: consecutive batches, a new shard begun where the next batch would take it past
    ``shard_sequences`` sequences. The plan depends only on the probe, the batch size and
    ``shard_sequences``, never on who runs the shards. ``seen_ids`` are the token ids of the whole
    probe (the columns of the attention received per token), the same for every shard.
    """

    batches: list[torch.Tensor]
    shards: list[range]
    seen_ids: torch.Tensor

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def shard_batches(self, index: int) -> list[torch.Tensor]:
        return [self.batches[i] for i in self.shards[index]]


def plan_text_shards(text_sequences: Sequence[torch.Tensor], batch_size: int,
                     shard_sequences: int = DEFAULT_SHARD_SEQUENCES) -> TextShardPlan:
    """The :class:`TextShardPlan` of ``text_sequences`` (``[pos]`` or ``[batch, pos]`` tensors)."""
    if batch_size < 1 or shard_sequences < 1:
        raise InputError(f"Batches and shards need at least one sequence (batch size {batch_size}, "
                         f"shard size {shard_sequences}).")
    batches = length_batches(text_sequences, batch_size)
    shards, start, held = [], 0, 0
    for index, batch in enumerate(batches):
        if held and held + batch.shape[0] > shard_sequences:
            shards.append(range(start, index))
            start, held = index, 0
        held += batch.shape[0]
    if batches:
        shards.append(range(start, len(batches)))
    # Attention received is kept per token id that occurs in the probe, not per vocabulary entry.
    if batches:
        seen_ids = torch.unique(torch.cat([b[:, 1:].reshape(-1) for b in batches]))
    else:
        seen_ids = torch.zeros(1, dtype=torch.long)
    return TextShardPlan(batches=batches, shards=shards, seen_ids=seen_ids)


def text_shard_partial(model: Any, metric_sums: MetricSums, batches: Sequence[torch.Tensor],
                       on_batch: Optional[Callable[[int], None]] = None) -> dict[str, np.ndarray]:
    """One text shard's partial sums (:meth:`MetricSums.take_text_partial`), computed from zero.

    ``on_batch(batches done)`` is called after every batch (progress). Where the shard runs (here or
    on a Ray worker) does not change the result: the same batches in the same order.
    """
    metric_sums.reset_text()  # from zero, whatever an earlier, failed shard left
    for done, tokens in enumerate(batches):
        metric_sums.add_text(model, tokens)
        if on_batch is not None:
            on_batch(done + 1)
    return metric_sums.take_text_partial()


# Runs every shard of a plan somewhere else (e.g. :class:`headvis_core.atlas.distributed.RayTextShards`):
# ``runner(plan, direct_copying, merge, progress)`` calls ``merge(partial)`` once per shard, in shard order.
TextShardRunner = Callable[[TextShardPlan, bool, Callable[[dict[str, np.ndarray]], None],
                            Optional[ProgressCallback]], None]


def attention_metrics(model: Any, text_sequences: Sequence[torch.Tensor], induction: Optional[InductionProbe],
                      batch_size: int = 16, top_k: int = 10, direct_copying: bool = True,
                      progress: Optional[ProgressCallback] = None,
                      shard_sequences: int = DEFAULT_SHARD_SEQUENCES,
                      text_shards: Optional[TextShardRunner] = None) -> AttentionMetrics:
    """All attention-pattern metrics for every head, from one hooked pass per batch.

    ``values`` holds :data:`ATTENTION_METRICS`, :data:`PAIR_METRICS` and (with ``direct_copying``)
    ``direct_copying`` (:mod:`headvis_core.atlas.direct_copying`), each ``[layer, head]``.

    The real text runs shard by shard (:func:`plan_text_shards`): each shard's sums start from
    zero and the shards' partial sums are added up in shard order. ``text_shards`` runs the shards
    elsewhere (Ray workers); the result is the same, bit for bit, because the plan and the order of
    the additions are. The induction probe runs here, after the text.

    Args:
        text_sequences: token tensors ``[pos]`` or ``[batch, pos]`` of real text (BOS first); sequences of
            equal length are batched together, so no padding is needed.
        induction: the repeated-random-token probe, or ``None`` to leave ``induction`` as NaN.
        batch_size: sequences per forward pass (bounds the memory of one layer's pattern).
        shard_sequences: real-text sequences per shard (whole batches).
        text_shards: where to run the text shards (default: here, one after the other).
    """
    plan = plan_text_shards(text_sequences, batch_size, shard_sequences)
    metric_sums = MetricSums(model, plan.seen_ids, direct_copying=direct_copying)
    merged = {name: torch.zeros_like(tensor) for name, tensor in metric_sums.text_tensors().items()}

    def merge(shard_sums: dict[str, np.ndarray]) -> None:
        if set(shard_sums) != set(merged):
            raise ValueError(f"text partial has {sorted(shard_sums)}, expected {sorted(merged)}")
        for name, tensor in merged.items():
            array = shard_sums[name]  # read-only when it comes from Ray's object store: torch wants a copy then
            tensor += torch.from_numpy(array if array.flags.writeable else array.copy())

    induction_batches = [] if induction is None else length_batches([induction.tokens], batch_size)
    n_text = len(plan.batches)
    total = max(1, n_text + len(induction_batches))
    text_progress = scaled(progress, 0.0, n_text / total)
    if text_shards is not None:
        text_shards(plan, direct_copying, merge, text_progress)
    else:
        done = 0
        for index in range(plan.n_shards):
            def on_batch(in_shard: int, before: int = done) -> None:
                report(text_progress, (before + in_shard) / max(n_text, 1),
                       f"real text: batch {before + in_shard} of {n_text}")

            report(text_progress, done / max(n_text, 1), f"real text: batch {done + 1} of {n_text}")
            merge(text_shard_partial(model, metric_sums, plan.shard_batches(index), on_batch))
            done += len(plan.shards[index])
    metric_sums.load_text(merged)
    for i, tokens in enumerate(induction_batches):
        report(progress, (n_text + i) / total, f"induction probe: batch {i + 1} of {len(induction_batches)}")
        metric_sums.add_induction(model, tokens, induction)
    report(progress, 1.0, "attention metrics done")
    return metric_sums.finish(top_k, bool(plan.batches))


def layer_patterns(model: Any, tokens: Int[torch.Tensor, "1 pos"]) -> Float[torch.Tensor, "layer head query key"]:
    """``[layer, head, query, key]`` patterns of every head on one short sequence ``tokens [1, pos]``."""
    patterns: dict[int, torch.Tensor] = {}
    for_each_layer_pattern(model, tokens, lambda layer, p: patterns.__setitem__(layer, p[0].float().cpu()))
    return torch.stack([patterns[layer] for layer in sorted(patterns)])
