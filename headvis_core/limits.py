"""A memory guard: estimate what a request needs from its shape, and refuse it before it runs if it will not fit.

The app serves every browser session from one process, so one request that
takes all the memory takes the server down for everyone. Each request that
runs the model calls :func:`check_forward` (or :func:`check_memory`) with its
shape before its first forward pass; one that would take the process past the
cap is refused with a :class:`MemoryLimitError` giving the estimate and the
limit.

The cap bounds the whole process: the memory it holds now (model weights,
stored results, the Python runtime: its resident set size) plus the request's
estimate must stay under it. It is, in order of precedence, the ``cap_gb``
argument, ``$HEADVIS_MEMORY_CAP_GB``, or :data:`DEFAULT_CAP_GB`.

The estimate of one forward pass is deliberately on the high side (it adds
up peaks that do not all coincide):

* attention: ``batch x heads x tokens^2`` per copy, one layer at a time
  (eager attention holds the scores and the pattern, and a hook reducing
  the pattern makes temporaries of its size: :data:`PATTERN_COPIES`,
  measured on the atlas, the request with the most such temporaries);
* the MLP's hidden activations, ``batch x tokens x d_mlp`` (3 copies for a
  gated MLP), and a few residual-stream tensors ``batch x tokens x d_model``;
* logits, ``batch x positions x vocab`` (2 copies: logits and a log-softmax),
  only where the request computes them;
* ``extra_bytes`` for what the caller keeps across layers (captured
  activations, a replay cache).
"""

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from headvis_core.errors import InputError

# A few GB: Gemma 3 270M's atlas peaks at 2.7 GB of resident memory (measured), a 262k-token
# vocabulary costing most of it; the requests that took the server down needed 12-150 GB.
DEFAULT_CAP_GB = 6.0
PATTERN_COPIES = 4
MLP_COPIES = 3
RESIDUAL_COPIES = 6
LOGIT_COPIES = 2
# The scan's score statistics (atlas/metrics.py score_metric_sums) reduce each layer's scores in float32
# next to the attention's own copies: 2.26 score-sized float32 temporaries measured by ru_maxrss on
# [8, 9, 1025, 1025] scores (4.52 before the in-place reduction); rounded up.
SCORE_REDUCTION_COPIES = 2.5
FLOAT32_BYTES = 4
GIB = 2**30


class MemoryLimitError(InputError):
    """A request whose estimated memory is over the cap (raised before it runs)."""


def memory_cap_bytes(cap_gb: Optional[float] = None) -> int:
    """The cap in bytes: ``cap_gb``, else ``$HEADVIS_MEMORY_CAP_GB``, else :data:`DEFAULT_CAP_GB`."""
    if cap_gb is None:
        raw = os.environ.get("HEADVIS_MEMORY_CAP_GB", "").strip()
        try:
            cap_gb = float(raw) if raw else DEFAULT_CAP_GB
        except ValueError:
            raise InputError(f"HEADVIS_MEMORY_CAP_GB={raw!r} is not a number of gigabytes.") from None
    if not (math.isfinite(cap_gb) and cap_gb > 0):
        raise InputError(f"The memory cap must be a positive number of gigabytes, not {cap_gb}.")
    return int(cap_gb * GIB)


def process_bytes() -> int:
    """The resident set size of this process now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    bytes_per_value: int = 4

    @classmethod
    def of(cls, model: Any) -> "ModelDims":
        """The dimensions of a ``TransformerBridge`` or a ``LoadedModel``."""
        if hasattr(model, "info") and hasattr(model, "model"):  # a LoadedModel (a bridge's .model is the HF model)
            model = model.model
        cfg = model.cfg
        d_model = int(cfg.d_model)
        d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d_model)
        dtype = getattr(cfg, "dtype", None)
        size = getattr(dtype, "itemsize", 4) if dtype is not None else 4
        # 16-bit activations still count 4 bytes a value: eager attention takes its softmax in float32
        # (HF's ``softmax(..., dtype=torch.float32)``) and the scan and atlas reduce patterns in float32
        # or float64, so the per-pattern temporaries are float32 whatever the model's dtype. The
        # weights (``weight_bytes``) count at their own size.
        return cls(n_layers=int(cfg.n_layers), n_heads=int(cfg.n_heads), d_model=d_model, d_mlp=d_mlp,
                   d_vocab=int(cfg.d_vocab), n_ctx=int(cfg.n_ctx), bytes_per_value=max(4, int(size)))


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters (a ``TransformerBridge`` or a ``LoadedModel``)."""
    if hasattr(model, "info") and hasattr(model, "model"):
        model = model.model
    module = getattr(model, "original_model", None) or model
    return int(sum(p.numel() * p.element_size() for p in module.parameters()))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a request needs, by part."""

    what: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        shown = sorted(((name, b) for name, b in self.parts.items() if b >= 2**20), key=lambda p: -p[1])
        return ", ".join(f"{name} {gib(b)}" for name, b in shown) or "under 1 MiB"


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= 0.1 * GIB else f"{n_bytes / 2**20:.0f} MiB"


def forward_estimate(dims: ModelDims, batch: int, tokens: int, logit_positions: Optional[int] = None,
                     extra_bytes: int = 0, what: str = "this request",
                     extra_label: str = "kept activations") -> MemoryEstimate:
    """What one forward pass of ``batch`` sequences of ``tokens`` tokens needs (see the module docstring).

    ``logit_positions``: positions per sequence whose logits are computed (default every
    position; 0 for a pass that stops before the unembedding).
    """
    b, t, size = int(batch), int(tokens), dims.bytes_per_value
    positions = t if logit_positions is None else int(logit_positions)
    parts = {
        "attention patterns": b * dims.n_heads * t * t * size * PATTERN_COPIES,
        "MLP activations": b * t * dims.d_mlp * size * MLP_COPIES,
        "residual stream": b * t * dims.d_model * size * RESIDUAL_COPIES,
        "logits": b * positions * dims.d_vocab * size * LOGIT_COPIES,
    }
    if extra_bytes:
        parts[extra_label] = int(extra_bytes)
    return MemoryEstimate(what=what, parts=parts)


def check_memory(estimate: MemoryEstimate, cap_gb: Optional[float] = None, hint: str = "") -> None:
    """Raise :class:`MemoryLimitError` where the process plus ``estimate`` would pass the cap."""
    cap = memory_cap_bytes(cap_gb)
    held = process_bytes()
    if held + estimate.total <= cap:
        return
    raise MemoryLimitError(
        f"{estimate.what[:1].upper() + estimate.what[1:]} needs about {gib(estimate.total)} of memory "
        f"({estimate.describe()}) on top of the {gib(held)} this process holds, over the limit of {gib(cap)} "
        f"(set HEADVIS_MEMORY_CAP_GB to change it). {hint}".strip())


def largest_tokens(dims: ModelDims, batch: int, budget: int, logits: bool = True, extra_per_token: int = 0) -> int:
    """The longest sequence whose :func:`forward_estimate` at ``batch`` fits in ``budget`` bytes (0 if none)."""
    low, high = 0, max(1, dims.n_ctx)
    while low < high:
        mid = (low + high + 1) // 2
        estimate = forward_estimate(dims, batch, mid, None if logits else 0, extra_per_token * mid * batch)
        if estimate.total <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def check_forward(model: Any, batch: int, tokens: int, what: str, logits: bool = True,
                  logit_positions: Optional[int] = None, extra_bytes: int = 0,
                  cap_gb: Optional[float] = None, extra_label: str = "kept activations") -> MemoryEstimate:
    """Refuse a forward pass of ``batch x tokens`` on ``model`` that would pass the memory cap.

    The message says how long a sequence fits at this batch size. Returns the estimate where it fits.
    """
    dims = ModelDims.of(model)
    positions = (logit_positions if logit_positions is not None else None) if logits else 0
    estimate = forward_estimate(dims, batch, tokens, positions, extra_bytes, what, extra_label)
    budget = memory_cap_bytes(cap_gb) - process_bytes()
    per_token = extra_bytes // max(1, batch * tokens)
    fits = largest_tokens(dims, batch, budget, logits=logits, extra_per_token=per_token) if budget > 0 else 0
    if fits >= 2:
        hint = (f"At {batch} sequence{'s' if batch != 1 else ''} per pass, sequences of up to about {fits} tokens "
                "fit" + ("; a smaller batch size fits longer ones." if batch > 1 else "."))
    else:
        hint = "Nothing of this size fits: free memory (close other models) or raise the cap."
    check_memory(estimate, cap_gb, hint=hint)
    return estimate


# ---------------------------------------------------------------------------------------------
# The workbench's requests, by shape (pages and CLI call these before running)


def check_atlas_memory(model: Any, n_seqs: int, seq_len: int, n_induction_seqs: Optional[int] = None,
                       batch_size: int = 16, cap_gb: Optional[float] = None) -> MemoryEstimate:
    """The head atlas: batches of probe and induction sequences; the pass stops after the last pattern.

    The copying score reads the weights through TransformerLens's stacked weight views (``W_V``,
    ``W_O``, ``W_U``...), which are copies: counted as 1.5 copies of the weights. Measured on SmolLM2
    (peak RSS of ``atlas --n-seqs 4 --batch-size 4 --n-induction-seqs 4``, 0.55 GiB after loading):
    1.22 GiB at 16 tokens (estimate 1.3), 1.84 GiB at 1024 (estimate 2.0), 2.71 GiB at 2048 (3.8).
    With the HeadVis score metrics and the direct copying score (issue 11), ``bench/atlas.py`` measured
    +631 MiB above the loaded model at 16 sequences x 128 tokens; the estimate there is 1.17 GB. Gemma 3
    270M (262k vocabulary) at the defaults: +1.76 GiB measured (2.72 GiB peak), 2.4 GB estimated.
    """
    dims = ModelDims.of(model)
    tokens = min(int(seq_len), dims.n_ctx)
    n_induction = n_induction_seqs or max(4, int(n_seqs) // 4)
    batch = min(int(batch_size), max(int(n_seqs), n_induction))
    # The HeadVis score metrics reduce one layer's pre-softmax scores in float64 (about four
    # [batch, head, query, key] temporaries), and the direct copying score holds one float32
    # [batch, head, query, key] logit table plus the unembedding rows with the final norm's gain
    # folded in (float32; the bridge's W_U view is counted among the weight copies).
    per_layer = batch * dims.n_heads * tokens * tokens * (4 * 8 + 2 * 4)
    unembedding = dims.d_vocab * dims.d_model * 4
    return check_forward(model, batch, tokens, f"the atlas ({batch} sequences of {tokens} tokens per pass)",
                         logits=False, extra_bytes=weight_bytes(model) * 3 // 2 + per_layer + unembedding,
                         extra_label="weight copies and score temporaries", cap_gb=cap_gb)


def check_scan_memory(model: Any, window_len: int, batch_size: int, max_windows: Optional[int] = None,
                      cap_gb: Optional[float] = None) -> MemoryEstimate:
    """A dataset scan: batches of BOS + window; patterns reduced in their hooks, no unembedding."""
    batch = min(int(batch_size), int(max_windows)) if max_windows else int(batch_size)
    tokens = int(window_len) + 1
    dims = ModelDims.of(model)
    score_reduction = int(batch * dims.n_heads * tokens * tokens * FLOAT32_BYTES * SCORE_REDUCTION_COPIES)
    return check_forward(model, batch, tokens, f"the scan ({batch} windows of {tokens} tokens per pass)",
                         logits=False, extra_bytes=score_reduction, cap_gb=cap_gb,
                         extra_label="score statistics (float32 temporaries)")


def check_ablation_memory(model: Any, prompts: Any, mode: str = "kl", batch_tokens: int = 8192,
                          cap_gb: Optional[float] = None) -> MemoryEstimate:
    """Ablation of ``prompts`` (a ``PromptPairs``): ``mode`` ``kl``/``targeted`` (exact) or ``estimate``.

    Exact ablation runs up to ``batch_tokens`` tokens per pass and keeps the residual stream entering
    every block for its replay; the estimate (attribution patching) runs each group of same-length
    prompts as one batch and keeps every layer's activations, patterns included, for the backward pass.
    """
    dims = ModelDims.of(model)
    longest = max(int(t.shape[-1]) for t in prompts.tokens)
    if mode == "estimate":
        batch = max(len(group) for group in prompts.length_groups())
        kept = dims.n_layers * batch * longest * (dims.n_heads * longest + 4 * dims.d_model) * dims.bytes_per_value
    else:
        batch = max(1, min(len(prompts.tokens), int(batch_tokens) // longest))
        kept = 2 * dims.n_layers * batch * longest * dims.d_model * dims.bytes_per_value
    return check_forward(model, batch, longest, f"the ablation ({batch} prompt(s) of {longest} tokens per pass)",
                         extra_bytes=kept, cap_gb=cap_gb)


def check_sweep_memory(model: Any, plan: Any, batch_tokens: int, predictions: bool = True, max_batch: int = 256,
                       cap_gb: Optional[float] = None) -> MemoryEstimate:
    """A prompt sweep (a ``SweepPlan``): batches of ``batch_tokens`` tokens (two more steps for greater-than)."""
    longest = max(len(ids) for ids in plan.token_ids) + 2
    batch = max(1, min(int(max_batch), int(batch_tokens) // longest, len(plan.token_ids)))
    return check_forward(model, batch, longest, f"the sweep ({batch} prompts of up to {longest} tokens per pass)",
                         logits=predictions, cap_gb=cap_gb)


def check_prompt_memory(model: Any, n_tokens: int, cap_gb: Optional[float] = None) -> MemoryEstimate:
    """One prompt through the model with every pattern visible (the Prompt lab)."""
    return check_forward(model, 1, int(n_tokens), f"this prompt ({int(n_tokens)} tokens)", cap_gb=cap_gb)
