"""Q-, K- and V-composition scores between attention heads (Elhage et al. 2021, "A Mathematical
Framework for Transformer Circuits").

A head A in an earlier layer writes ``x W_OV^A`` into the residual stream (``W_OV = W_V W_O``,
``[d_model, d_model]`` in TransformerLens's row-vector convention). A later head B reads the
stream through three matrices, one per input:

* Q-composition: ``W_QK^B = W_Q W_K^T`` (A's output feeds B's queries),
* K-composition: ``(W_QK^B)^T = W_K W_Q^T`` (A's output feeds B's keys),
* V-composition: ``W_OV^B`` (A's output feeds B's values).

The composition score is ``||W_OV^A R^B||_F / (||W_OV^A||_F ||R^B||_F)`` with ``R^B`` the reading
matrix of the kind. It is 1 when A writes exactly into what B reads and near ``1/sqrt(d_model)``
scale for unrelated random matrices, so scores are read against a random baseline
(:func:`random_baseline`): "times above chance" and a z-score.

Fast path (equal to TransformerLens's ``TransformerBridge.all_composition_scores``, see
``tests/circuits/test_composition.py`` and ``bench/composition.py``): ``||M N||_F^2 = <M^T M, N N^T>_F``,
so every head gets one ``[d_model, d_model]`` Gram matrix per role (writer, Q/K/V reader) and all
scores of one kind are a single matrix product of the flattened Grams. Per pair that costs
``d_model^2 / 2`` multiply-adds instead of ``d_head^2 d_model`` for the factored products, and
never materialises the all-pairs broadcast that makes the TransformerLens version need
``n_pairs * d_head * d_model`` floats of memory.

Layer norm: TransformerLens 4 bridges hold the raw Hugging Face weights unless
``process_weights()``/``enable_compatibility_mode()`` was called. :func:`head_weights` folds the
receiving layer's ``ln1`` scale into ``W_Q/W_K/W_V`` (and, for LayerNorm models, centres the
reading and writing weights) without touching the shared model, matching what ``process_weights``
would give; :attr:`HeadWeights.folding_note` says what was done.

GQA: key/value heads are repeated to the query heads that share them (query head ``h`` reads KV
head ``h // (n_heads / n_kv_heads)``), as ``TransformerBridge._expand_kv_heads`` does.
"""


import functools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.progress import ProgressCallback, report
from headvis_core.weights import expand_kv_heads, fold_ln1, ln1_gains, qk_norm_gains

KINDS = ("q", "k", "v")
KIND_NAMES = {"q": "Q-composition", "k": "K-composition", "v": "V-composition"}
DEFAULT_BASELINE_HEADS = 48  # random heads per side: 48 x 48 = 2304 random pairs per kind


def parse_kinds(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"q,k"`` or ``["Q", "v"]`` -> ``("q", "k")``; unknown kinds raise :class:`InputError`."""
    parts = [p.strip().lower() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if not parts:
        raise InputError("No composition kinds given: choose from q, k and v (for example q,k,v).")
    bad = [p for p in parts if p not in KINDS]
    if bad:
        raise InputError(f"Unknown composition kind(s) {', '.join(map(repr, bad))}: choose from q, k and v.")
    return tuple(k for k in KINDS if k in parts)


@dataclass(frozen=True)
class HeadWeights:
    """Per-head weights in TransformerLens layout, KV heads repeated to query heads.

    ``W_Q, W_K, W_V``: ``[layer, head, d_model, d_head]``; ``W_O``: ``[layer, head, d_head, d_model]``.
    """

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor
    ln_folded: bool
    folding_note: str
    n_kv_heads: int

    @property
    def n_layers(self) -> int:
        return int(self.W_Q.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.W_Q.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.W_Q.shape[2])

    @property
    def d_head(self) -> int:
        return int(self.W_Q.shape[3])


def head_weights(model: Any, fold_ln: bool = True, dtype: torch.dtype = torch.float32) -> HeadWeights:
    """Stack ``W_Q, W_K, W_V, W_O`` of every head of a ``TransformerBridge``.

    With ``fold_ln`` the ``ln1`` gain of each layer is multiplied into that layer's reading weights
    and, for LayerNorm (not RMSNorm) models, reading weights are centred over ``d_model`` and
    ``W_O`` is centred over its output, as ``process_weights(fold_ln=True,
    center_writing_weights=True)`` does. The model itself is not modified.
    """
    cfg = model.cfg
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    with torch.no_grad():
        W_Q = model.W_Q.detach().to(dtype)
        W_K_raw = model.W_K.detach().to(dtype)
        W_V_raw = model.W_V.detach().to(dtype)
        W_O = model.W_O.detach().to(dtype)
        n_kv = int(W_K_raw.shape[1])
        W_K, W_V = expand_kv_heads(W_K_raw, n_heads), expand_kv_heads(W_V_raw, n_heads)
        already = bool(getattr(model, "_weights_processed", False))
        norm_type = str(getattr(cfg, "normalization_type", "") or "")
        is_layernorm = norm_type in ("LN", "LNPre")
        if already:
            note = ("Layer norm is folded: this model's weights were processed by TransformerLens "
                    "(process_weights / compatibility mode).")
            folded = True
        elif not fold_ln:
            note = ("Layer norm is NOT folded: scores use the raw Hugging Face weights, so each layer's "
                    "ln1 gain is ignored.")
            folded = False
        else:
            scales = ln1_gains(model)
            if scales is None:
                note = ("Layer norm could not be folded (no readable ln1 weight); scores use the raw "
                        "weights.")
                folded = False
            else:
                W_Q, W_K, W_V, W_O = fold_ln1(W_Q, W_K, W_V, W_O, scales.to(dtype), is_layernorm)
                if is_layernorm:
                    what = "ln1 gains folded into W_Q/W_K/W_V, reading and writing weights centred"
                else:
                    what = "ln1 (RMSNorm) gains folded into W_Q/W_K/W_V"
                note = (f"Layer norm is folded here ({what}), as TransformerLens process_weights would; "
                        "the shared model keeps its raw weights.")
                folded = True
            W_Q, W_K, qk_note = _fold_qk_norm(model, W_Q, W_K)
            note += qk_note
        if any(hasattr(block, "ln1_post") for block in model.blocks):
            note += (" The attention output passes a norm before the residual stream (Gemma); its per-token "
                     "scale is not modelled, so V-composition is approximate.")
    return HeadWeights(W_Q=W_Q.contiguous(), W_K=W_K.contiguous(), W_V=W_V.contiguous(),
                       W_O=W_O.contiguous(), ln_folded=folded, folding_note=note, n_kv_heads=n_kv)


def _fold_qk_norm(model: Any, W_Q: torch.Tensor, W_K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """QK-norm's gains folded into ``W_Q``/``W_K`` (``[layer, head, d_model, d_head]``), with what it leaves out.

    QK-norm also divides each query and key by its own RMS, token by token, which no weight-only score can
    model: Q/K composition then says whether one head writes into the subspace another head's queries or
    keys read, not how strongly it moves that head's attention (edge attribution measures that).
    """
    gains = qk_norm_gains(model)
    if gains is None:
        return W_Q, W_K, ""
    q_gain, k_gain = (g.to(W_Q.dtype)[:, None, None, :] for g in gains)  # [layer, 1, 1, d_head]
    note = (" QK-norm gains are folded into W_Q/W_K; its per-token division of queries and keys is not, so "
            "Q/K composition shows which heads write into the subspace a head reads, not how strongly they move "
            "its attention (edge attribution measures that).")
    return W_Q * q_gain, W_K * k_gain, note


def _reading_factors(weights: HeadWeights, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, Y)`` with the reading matrix ``R = X @ Y``: ``X [layer, head, d_model, d_head]``,
    ``Y [layer, head, d_head, d_model]``."""
    if kind == "q":
        return weights.W_Q, weights.W_K.transpose(-1, -2)
    if kind == "k":
        return weights.W_K, weights.W_Q.transpose(-1, -2)
    if kind == "v":
        return weights.W_V, weights.W_O
    raise InputError(f"Unknown composition kind {kind!r}: choose from q, k and v.")


def composition_score_reference(weights: HeadWeights, kind: str, sender: HeadRef, receiver: HeadRef) -> float:
    """The definition, for one pair, in float64 with the full ``[d_model, d_model]`` matrices (slow)."""
    ov = (weights.W_V[sender.layer, sender.head].double() @ weights.W_O[sender.layer, sender.head].double())
    x, y = _reading_factors(weights, kind)
    reader = x[receiver.layer, receiver.head].double() @ y[receiver.layer, receiver.head].double()
    return float(torch.linalg.norm(ov @ reader) / (torch.linalg.norm(ov) * torch.linalg.norm(reader)))


def _grams(x: torch.Tensor, y: torch.Tensor, side: str) -> torch.Tensor:
    """Gram matrices of ``M = x @ y`` for a batch of heads.

    ``x [n, d_model, d_head]``, ``y [n, d_head, d_model]``. ``side="write"``: ``M^T M``;
    ``side="read"``: ``M M^T``; both ``[n, d_model, d_model]``.
    """
    if side == "write":  # M^T M = y^T (x^T x) y
        inner = x.transpose(-1, -2) @ x
        return y.transpose(-1, -2) @ (inner @ y)
    inner = y @ y.transpose(-1, -2)  # M M^T = x (y y^T) x^T
    return (x @ inner) @ x.transpose(-1, -2)


class _TriangleFlattener:
    """Flattens symmetric ``[d, d]`` matrices to their upper triangle so that the Frobenius inner
    product of two symmetric matrices is a plain dot product (off-diagonal terms doubled on one side)."""

    def __init__(self, d: int, device: torch.device):
        rows, cols = torch.triu_indices(d, d, device=device)
        self.index = rows * d + cols
        self.weight = torch.where(rows == cols, 1.0, 2.0).to(device)

    def __call__(self, grams: torch.Tensor, weighted: bool) -> torch.Tensor:
        flat = grams.reshape(grams.shape[0], -1).index_select(1, self.index)
        return flat * self.weight if weighted else flat


def _flat_grams(x: torch.Tensor, y: torch.Tensor, side: str, layers: range, n_heads: int,
                flatten: "_TriangleFlattener", progress: Optional[ProgressCallback] = None,
                label: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened Grams ``[len(layers) * n_heads, d_model (d_model + 1) / 2]`` and Frobenius norms of
    ``M = x @ y`` for the heads of ``layers`` (``x [n, d_model, d_head]``, ``y [n, d_head, d_model]``,
    heads in layer-major order), built a layer at a time to bound memory."""
    flat = torch.empty(len(layers) * n_heads, flatten.index.numel(), dtype=x.dtype)
    norms = torch.empty(len(layers) * n_heads, dtype=torch.float64)
    for i, layer in enumerate(layers):
        rows, out = slice(layer * n_heads, (layer + 1) * n_heads), slice(i * n_heads, (i + 1) * n_heads)
        grams = _grams(x[rows], y[rows], side)
        flat[out] = flatten(grams, weighted=side == "write")
        norms[out] = torch.diagonal(grams, dim1=-2, dim2=-1).sum(-1).double().clamp_min(0).sqrt()
        report(progress, (i + 1) / len(layers), f"{label}, layer {layer}")
    return flat, norms


def all_composition_scores(weights: HeadWeights, kinds: Sequence[str] = KINDS,
                           progress: Optional[ProgressCallback] = None) -> dict[str, torch.Tensor]:
    """Scores of each kind: ``[sender_layer, sender_head, receiver_layer, receiver_head]``.

    Entries with ``receiver_layer <= sender_layer`` are 0 (no composition within a layer or
    backwards), as in TransformerLens. The senders' writing Grams are shared by the kinds. Float32
    throughout: MKL's blocked summation keeps the ``d_model^2 / 2``-term dot products within about
    2e-6 of float64 on SmolLM2 (checked against the float64 per-pair definition in the tests).
    """
    kinds = parse_kinds(kinds)
    n_layers, n_heads, d_model, d_head = weights.W_Q.shape
    n = n_layers * n_heads
    if n_layers < 2:
        return {kind: torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=weights.W_Q.dtype) for kind in kinds}
    flatten = _TriangleFlattener(d_model, weights.W_Q.device)
    steps = 1 + len(kinds)
    write_flat, write_norms = _flat_grams(
        weights.W_V.reshape(n, d_model, d_head), weights.W_O.reshape(n, d_head, d_model), "write",
        range(n_layers - 1), n_heads, flatten, progress=None if progress is None else
        (lambda f, m: progress(f / steps, m)), label="writing Grams")
    results = {}
    for index, kind in enumerate(kinds):
        sub = None if progress is None else (lambda f, m, i=index: progress((i + 1 + f) / steps, m))
        x, y = (t.reshape(n, *t.shape[2:]) for t in _reading_factors(weights, kind))
        read_flat, read_norms = _flat_grams(x, y, "read", range(1, n_layers), n_heads, flatten,
                                            progress=sub, label=f"{KIND_NAMES[kind]}: reading Grams")
        scores = torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=torch.float64)
        for layer in range(n_layers - 1):  # sender layer -> receivers in layers layer+1 .. L-1 only
            senders, receivers = slice(layer * n_heads, (layer + 1) * n_heads), slice(layer * n_heads, None)
            squared = (write_flat[senders] @ read_flat[receivers].T).double().clamp_min(0)
            block = squared.sqrt() / (write_norms[senders, None] * read_norms[None, receivers]).clamp_min(1e-300)
            scores[layer, :, layer + 1:, :] = block.reshape(n_heads, n_layers - layer - 1, n_heads)
        results[kind] = scores.to(weights.W_Q.dtype)
    return results


def composition_scores_from_weights(weights: HeadWeights, kind: str,
                                    progress: Optional[ProgressCallback] = None) -> torch.Tensor:
    """All scores of one kind (see :func:`all_composition_scores`)."""
    return all_composition_scores(weights, (kind,), progress=progress)[kind]


@dataclass(frozen=True)
class Baseline:
    """Composition scores of random Gaussian weights with the model's shapes (one kind)."""

    kind: str
    mean: float
    std: float
    n_pairs: int
    d_model: int
    d_head: int

    def z(self, score: torch.Tensor | float) -> torch.Tensor | float:
        return (score - self.mean) / self.std

    def ratio(self, score: torch.Tensor | float) -> torch.Tensor | float:
        return score / self.mean


@functools.lru_cache(maxsize=16)
def _random_scores(d_model: int, d_head: int, n_heads: int, seed: int) -> torch.Tensor:
    """``[n_heads * n_heads]`` scores of random senders against random receivers (Gaussian factors)."""
    generator = torch.Generator().manual_seed(seed)

    def gaussian(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    weights = HeadWeights(W_Q=gaussian(2, n_heads, d_model, d_head), W_K=gaussian(2, n_heads, d_model, d_head),
                          W_V=gaussian(2, n_heads, d_model, d_head), W_O=gaussian(2, n_heads, d_head, d_model),
                          ln_folded=False, folding_note="random", n_kv_heads=n_heads)
    return composition_scores_from_weights(weights, "v")[0, :, 1, :].flatten().double()


def random_baseline(d_model: int, d_head: int, kind: str, n_heads: int = DEFAULT_BASELINE_HEADS,
                    seed: int = 0) -> Baseline:
    """Mean and standard deviation of the score for i.i.d. Gaussian ``W_Q, W_K, W_V, W_O`` of the
    model's shapes: ``n_heads`` random senders against ``n_heads`` random receivers.

    For Gaussian factors the reading matrices of the three kinds (``W_Q W_K^T``, ``W_K W_Q^T``,
    ``W_V W_O``) all have the distribution of a product of two independent Gaussian matrices, so one
    sample (cached) serves every kind. The score does not depend on the entries' scale.
    """
    pairs = _random_scores(int(d_model), int(d_head), int(n_heads), int(seed))
    return Baseline(kind=kind, mean=float(pairs.mean()), std=float(pairs.std()), n_pairs=int(pairs.numel()),
                    d_model=d_model, d_head=d_head)


@dataclass
class CompositionResult:
    """Scores of the chosen kinds for every (earlier head, later head) pair, with baselines."""

    scores: dict[str, torch.Tensor]  # kind -> [sender_layer, sender_head, receiver_layer, receiver_head]
    baselines: dict[str, Baseline]
    ln_folded: bool
    folding_note: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if k in self.scores)

    def z_scores(self, kind: str) -> Float[torch.Tensor, "layer head layer2 head2"]:
        return self.baselines[kind].z(self.scores[kind])

    def ratios(self, kind: str) -> Float[torch.Tensor, "layer head layer2 head2"]:
        return self.baselines[kind].ratio(self.scores[kind])

    def edges_table(self, kinds: Optional[Sequence[str]] = None) -> pd.DataFrame:
        """One row per (sender, receiver, kind) with ``receiver_layer > sender_layer``:
        ``sender, receiver, sender_layer, sender_head, receiver_layer, receiver_head, kind, score,
        ratio`` (score / random mean) and ``z`` (standard deviations above the random mean)."""
        frames = []
        L, H = self.n_layers, self.n_heads
        sl, sh, rl, rh = np.meshgrid(np.arange(L), np.arange(H), np.arange(L), np.arange(H), indexing="ij")
        later = (rl > sl).ravel()
        for kind in kinds or self.kinds:
            score = self.scores[kind].double().numpy().ravel()[later]
            base = self.baselines[kind]
            frames.append(pd.DataFrame({
                "sender_layer": sl.ravel()[later], "sender_head": sh.ravel()[later],
                "receiver_layer": rl.ravel()[later], "receiver_head": rh.ravel()[later], "kind": kind,
                "score": score, "ratio": score / base.mean, "z": (score - base.mean) / base.std}))
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["sender_layer", "sender_head", "receiver_layer", "receiver_head", "kind", "score", "ratio", "z"])
        table.insert(0, "receiver", table["receiver_layer"].astype(str) + "." + table["receiver_head"].astype(str))
        table.insert(0, "sender", table["sender_layer"].astype(str) + "." + table["sender_head"].astype(str))
        return table

    def top_edges_into(self, receiver: HeadRef, kind: str, k: int = 5) -> pd.DataFrame:
        """The ``k`` strongest edges of ``kind`` into ``receiver`` (by score)."""
        table = self.edges_table([kind])
        table = table[(table.receiver_layer == receiver.layer) & (table.receiver_head == receiver.head)]
        return table.nlargest(k, "score").reset_index(drop=True)


def check_composable(n_layers: int) -> None:
    if n_layers < 2:
        raise InputError("This model has a single layer, so no head can compose with an earlier one: "
                         "composition scores need at least two layers.")


def compute_composition(model: Any, kinds: Sequence[str] = KINDS, fold_ln: bool = True,
                        baseline_heads: int = DEFAULT_BASELINE_HEADS, seed: int = 0,
                        progress: Optional[ProgressCallback] = None) -> CompositionResult:
    """Composition scores of ``kinds`` for all head pairs of ``model``, with random baselines."""
    kinds = parse_kinds(kinds)
    check_composable(int(model.cfg.n_layers))
    report(progress, 0.0, "reading the weights")
    weights = head_weights(model, fold_ln=fold_ln)
    scores = all_composition_scores(weights, kinds, progress=None if progress is None else
                                    (lambda f, m: progress(0.9 * f, m)))
    report(progress, 0.9, "random baseline")
    baselines = {kind: random_baseline(weights.d_model, weights.d_head, kind, n_heads=baseline_heads, seed=seed)
                 for kind in kinds}
    report(progress, 1.0, "composition scores done")
    return CompositionResult(scores=scores, baselines=baselines, ln_folded=weights.ln_folded,
                             folding_note=weights.folding_note, n_layers=weights.n_layers,
                             n_heads=weights.n_heads, n_kv_heads=weights.n_kv_heads,
                             d_model=weights.d_model, d_head=weights.d_head)


def transformer_lens_scores(model: Any, kind: str) -> Float[torch.Tensor, "layer head layer2 head2"]:
    """TransformerLens's own ``all_composition_scores`` (raw weights), ``[L, H, L, H]``, for comparison."""
    return model.all_composition_scores(kind.upper()).scores.detach()


def suggest_threshold(values: Sequence[float] | np.ndarray, n_edges: int = 50) -> Optional[float]:
    """A threshold that keeps about ``n_edges`` of ``values`` (None if there are none)."""
    values = np.sort(np.asarray(values, dtype=float))[::-1]
    if values.size == 0:
        return None
    value = values[min(n_edges, values.size) - 1]
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))) if value else 2)
    return math.floor(value * 10 ** digits) / 10 ** digits


@dataclass
class IOScores:
    """Composition of the token embedding into every head's Q/K/V input, and of every head's output
    with the unembedding (direct path to the logits), by the same formula: ``||W_E R^B|| / (||W_E||
    ||R^B||)`` and ``||W_OV^A W_U|| / (||W_OV^A|| ||W_U||)``, each against a random baseline of the
    same shapes.

    ``embed``: kind -> ``[layer, head]``; ``logits``: ``[layer, head]``.
    """

    embed: dict[str, torch.Tensor]
    logits: torch.Tensor
    baselines: dict[str, Baseline]  # "embed-q", "embed-k", "embed-v", "logits"


def _full_gram(matrix: torch.Tensor) -> torch.Tensor:
    """``M^T M`` for ``M [rows, d_model]``, ``[d_model, d_model]``."""
    m = matrix.float()
    return m.T @ m


def _scores_against_gram(x: torch.Tensor, y: torch.Tensor, gram: torch.Tensor, side: str) -> torch.Tensor:
    """``[n]`` scores of low-rank matrices ``M = x @ y`` (``x [n, d_model, d_head]``,
    ``y [n, d_head, d_model]``) against one full-rank matrix given by its Gram ``[d_model, d_model]``.

    ``side="read"``: ``M`` reads what the full matrix writes (Gram ``W^T W``):
    ``||W M||^2 = <W^T W, x (y y^T) x^T> = sum((x^T G x) * (y y^T))``.
    ``side="write"``: ``M`` writes into what the full matrix reads (Gram ``W W^T``):
    ``||M W||^2 = sum((x^T x) * (y G y^T))``. The ``[d_model, d_model]`` Gram of ``M`` is never built.
    """
    if side == "read":
        outer, inner = x.transpose(-1, -2) @ gram @ x, y @ y.transpose(-1, -2)
        own = (x.transpose(-1, -2) @ x).double()
    else:
        outer, inner = x.transpose(-1, -2) @ x, y @ gram @ y.transpose(-1, -2)
        own = (y @ y.transpose(-1, -2)).double()
    squared = (outer.double() * inner.double()).sum(dim=(-2, -1)).clamp_min(0)
    m_norm = (own * (inner if side == "read" else outer).double()).sum(dim=(-2, -1)).clamp_min(0).sqrt()
    full_norm = torch.trace(gram.double()).clamp_min(0).sqrt()
    return squared.sqrt() / (m_norm * full_norm).clamp_min(1e-300)


def _unembed_and_embed(model: Any, weights: HeadWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_E [vocab, d_model]`` and ``W_U [d_model, vocab]``, folded like the head weights."""
    W_E = model.W_E.detach().float()
    W_U = model.W_U.detach().float()
    if weights.ln_folded and not getattr(model, "_weights_processed", False):
        norm = getattr(model, "ln_final", None)
        gain = getattr(getattr(norm, "original_component", norm), "weight", None)
        if isinstance(gain, torch.Tensor) and gain.ndim == 1:
            gain = gain.detach().float() + (1.0 if getattr(model.cfg, "rmsnorm_uses_offset", False) else 0.0)
            W_U = W_U * gain[:, None]
        if str(getattr(model.cfg, "normalization_type", "")) in ("LN", "LNPre"):
            W_U = W_U - W_U.mean(dim=0, keepdim=True)
            W_E = W_E - W_E.mean(dim=-1, keepdim=True)
    return W_E, W_U


def io_scores(model: Any, weights: HeadWeights, kinds: Sequence[str] = KINDS, seed: int = 0,
              baseline_heads: int = DEFAULT_BASELINE_HEADS) -> IOScores:
    """Embedding -> head (per kind) and head -> logits composition scores, with baselines."""
    kinds = parse_kinds(kinds)
    L, H, d_model, d_head = weights.n_layers, weights.n_heads, weights.d_model, weights.d_head
    n = L * H
    W_E, W_U = _unembed_and_embed(model, weights)
    embed_gram, unembed_gram = _full_gram(W_E), _full_gram(W_U.T)
    generator = torch.Generator().manual_seed(seed + 10)
    # W^T W of a Gaussian [vocab, d_model] and W W^T of a Gaussian [d_model, vocab] have the same
    # distribution, so one random Gram serves both baselines.
    random_gram = _full_gram(torch.randn(W_E.shape, generator=generator))

    def baseline(name: str, side: str) -> Baseline:
        x = torch.randn(baseline_heads, d_model, d_head, generator=generator)
        y = torch.randn(baseline_heads, d_head, d_model, generator=generator)
        scores = _scores_against_gram(x, y, random_gram, side)
        return Baseline(kind=name, mean=float(scores.mean()), std=float(scores.std()), n_pairs=baseline_heads,
                        d_model=d_model, d_head=d_head)

    embed, baselines = {}, {}
    for kind in kinds:
        x, y = _reading_factors(weights, kind)
        embed[kind] = _scores_against_gram(x.reshape(n, d_model, d_head), y.reshape(n, d_head, d_model),
                                           embed_gram, "read").reshape(L, H).float()
        baselines[f"embed-{kind}"] = baseline(f"embed-{kind}", "read")
    logits = _scores_against_gram(weights.W_V.reshape(n, d_model, d_head), weights.W_O.reshape(n, d_head, d_model),
                                  unembed_gram, "write").reshape(L, H).float()
    baselines["logits"] = baseline("logits", "write")
    return IOScores(embed=embed, logits=logits, baselines=baselines)
