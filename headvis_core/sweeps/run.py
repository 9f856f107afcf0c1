"""Running a prompt sweep: head attention and model answers for every value of a template's slots.

For each value of a :class:`~headvis_core.sweeps.plan.SweepPlan` this measures

* ``attn L.H``: the attention probability of head ``L.H`` from the query
  position to the key position (one entry of ``blocks.L.attn.hook_pattern``);
* ``p[ANSWER]`` and ``logit[ANSWER]`` of each chosen answer token at the
  answer position, ``logit_diff`` (first answer minus second) when there are two;
* ``top_token`` and ``top_prob``: the model's most likely next token there;
* ``greater_than`` (Hanna et al. 2023, "How does GPT-2 compute greater-than?"),
  when the plan names a reference number: ``P(answer > ref) - P(answer <= ref)``
  over the numbers with as many digits as the reference (``p_above`` and
  ``p_at_or_below`` give the two parts). See :func:`greater_than_score` for
  how this is computed for tokenizers with whole two-digit tokens (GPT-2) and
  for those that split numbers into single digits (SmolLM2).

Values are run in batches: prompts with the same token count are stacked and
cut into chunks, only the ``hook_pattern`` layers of the chosen heads are
captured, and logits are computed for the answer positions only. The tokens
every prompt shares at the start (``The war lasted from the year`` before the
slot) are run once, and their keys and values are reused by every chunk
(the model's own KV cache), so each chunk only runs the part after them. With
no predictions wanted, the pass stops after the last chosen head's layer.
:func:`run_sweep_loop` is the one-prompt-at-a-time reference the tests and the
benchmark compare against.

:func:`detect_ranges` finds the maximal runs of slot values where a curve is at
or above a level, e.g. "head 4.4 attends strongly for years 1000-1986".
"""

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from headvis_core.attribution.edge import sliding_window
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.hooks import capture, exclusive, pattern_hook
from headvis_core.progress import ProgressCallback, report
from headvis_core.sweeps.greater_than import NumberTokens, greater_than_extension, greater_than_score, number_tokens
from headvis_core.sweeps.plan import SweepPlan
from headvis_core.sweeps.result import SweepResult, attention_column, logit_column, prob_column

DEFAULT_BATCH_TOKENS = 2048  # tokens per forward pass: large enough to fill the CPU, small for memory
MAX_BATCH = 256


# ----------------------------------------------------------------------------- the passes

def _accepts_logits_to_keep(model: Any) -> bool:
    original = getattr(model, "original_model", None)
    try:
        return original is not None and "logits_to_keep" in inspect.signature(original.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class _Outputs:
    """Measured arrays for all values, filled chunk by chunk."""

    attn: np.ndarray  # [value, head]
    probs: np.ndarray  # [value, answer]
    logits: np.ndarray  # [value, answer]
    top_ids: np.ndarray  # [value]
    top_probs: np.ndarray  # [value]
    p_above: np.ndarray  # [value]
    p_below: np.ndarray  # [value]

    @classmethod
    def empty(cls, n: int, n_heads: int, n_answers: int) -> "_Outputs":
        nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
        return cls(nan(n, n_heads), nan(n, n_answers), nan(n, n_answers), np.zeros(n, dtype=np.int64), nan(n),
                   nan(n), nan(n))


def _store_predictions(out: _Outputs, rows: np.ndarray, step_logits: list[torch.Tensor], plan: SweepPlan,
                       numbers: Optional[NumberTokens]) -> None:
    """Fill the answer columns from ``[rows, vocab]`` logits at the answer position (and digit steps after it)."""
    logits = step_logits[0].float()
    probs = torch.softmax(logits, dim=-1)
    if plan.answer_labels:
        ids = torch.as_tensor(plan.answer_ids[rows])
        out.probs[rows] = probs.gather(1, ids).numpy()
        out.logits[rows] = logits.gather(1, ids).numpy()
    top = probs.max(dim=-1)
    out.top_ids[rows] = top.indices.numpy()
    out.top_probs[rows] = top.values.numpy()
    if numbers is not None:
        step_probs = [probs] + [torch.softmax(l.float(), dim=-1) for l in step_logits[1:]]
        above, below = greater_than_score(step_probs, [plan.greater_than_refs[i] for i in rows], numbers)
        out.p_above[rows], out.p_below[rows] = above, below


def _needs(heads: Sequence[HeadRef], predictions: bool) -> None:
    if not heads and not predictions:
        raise InputError("Nothing to measure: choose at least one head, or turn on the model's predictions.")


def _setup_numbers(model: Any, plan: SweepPlan, predictions: bool) -> Optional[NumberTokens]:
    if not predictions or not plan.greater_than_refs:
        return None
    return number_tokens(model, len(plan.greater_than_refs[0]))


def _chunks(plan: SweepPlan, extra: int, batch_tokens: int, max_batch: int) -> list[np.ndarray]:
    """Value indices grouped by token count (so no padding is needed), cut to about ``batch_tokens`` per pass."""
    lengths = plan.lengths
    chunks = []
    for length in np.unique(lengths):
        members = np.flatnonzero(lengths == length)
        size = int(max(1, min(max_batch, batch_tokens // (int(length) + extra))))
        chunks += [members[i:i + size] for i in range(0, len(members), size)]
    return chunks


def shared_prefix_length(plan: SweepPlan, predictions: bool) -> int:
    """How many leading tokens every prompt shares and no query or answer position falls in.

    Keys may lie in the shared part: the attention of a later query to them is
    computed in the chunk's own pass.
    """
    first = plan.token_ids[0]
    length = min(len(ids) for ids in plan.token_ids) - 1  # at least one token left to run per chunk
    for ids in plan.token_ids[1:]:
        same = 0
        limit = min(length, len(ids))
        while same < limit and ids[same] == first[same]:
            same += 1
        length = same
        if length == 0:
            return 0
    length = min(length, int(plan.query_pos.min()))
    if predictions:
        length = min(length, int(plan.answer_pos.min()))
    return max(length, 0)


def _prefix_cache(model: Any, prefix: list[int]) -> Optional[Any]:
    """The model's KV cache after ``prefix`` (a HuggingFace cache object), or ``None`` if it has none."""
    original = getattr(model, "original_model", None)
    try:
        if original is None or "past_key_values" not in inspect.signature(original.forward).parameters:
            return None
    except (TypeError, ValueError):
        return None
    tokens = torch.tensor([prefix], dtype=torch.long, device=getattr(model.cfg, "device", "cpu"))
    with exclusive(model):
        output = model(tokens, return_type="logits_and_cache", use_cache=True)
    cache = output[1] if isinstance(output, tuple) and len(output) == 2 else None
    return cache if hasattr(cache, "batch_repeat_interleave") else None


def _chunk_cache_kwargs(prefix_cache: Optional[Any], n_rows: int) -> dict[str, Any]:
    """A copy of the shared prefix's KV cache for one chunk (the pass extends the cache it is given)."""
    if prefix_cache is None:
        return {}
    chunk_cache = copy.deepcopy(prefix_cache)
    chunk_cache.batch_repeat_interleave(n_rows)
    return {"past_key_values": chunk_cache}


def _read_attention(out: _Outputs, rows: np.ndarray, plan: SweepPlan, heads: list[HeadRef],
                    captured: dict[str, torch.Tensor], n_shared: int) -> None:
    """Each head's query-to-key attention for the chunk's values, from its layer's captured pattern."""
    # patterns cover the queries run in this pass and every key, shared ones included
    for j, head in enumerate(heads):
        pattern = captured[pattern_hook(head.layer)]  # [batch, head, query - shared, key]
        # indices on the pattern's own device: under a device_map split each layer has its own
        q = torch.as_tensor(plan.query_pos[rows] - n_shared, device=pattern.device)
        k = torch.as_tensor(plan.key_pos[rows], device=pattern.device)
        batch_index = torch.arange(len(rows), device=pattern.device)
        out.attn[rows, j] = pattern[batch_index, head.head, q, k].float().cpu().numpy()


def _answer_steps(logits: torch.Tensor, plan: SweepPlan, rows: np.ndarray, n_pos: int,
                  extra: int) -> list[torch.Tensor]:
    """``[batch, vocab]`` logits at the answer position and at each appended digit after it."""
    keep = logits.shape[1]
    at = torch.as_tensor(plan.answer_pos[rows]) - (n_pos - keep)
    batch_index = torch.arange(len(rows))
    return [logits[batch_index, at + k] for k in range(1 + extra)]


def run_sweep(model: Any, plan: SweepPlan, heads: Sequence[HeadRef], predictions: bool = True,
              batch_tokens: int = DEFAULT_BATCH_TOKENS, max_batch: int = MAX_BATCH, share_prefix: bool = True,
              progress: Optional[ProgressCallback] = None) -> SweepResult:
    """Measure every value of ``plan`` in batches (see the module docstring).

    Args:
        heads: heads whose query-to-key attention is read.
        predictions: also read the answers, top prediction and greater-than
            score (needs the full pass; without it the pass stops early).
        batch_tokens: about how many tokens go through the model at once.
        share_prefix: run the tokens all prompts start with once and reuse
            their keys and values (off: every chunk runs whole prompts).
    """
    heads = list(heads)
    _needs(heads, predictions)
    numbers = _setup_numbers(model, plan, predictions)
    extension = {}
    if numbers is not None:
        extension = {i: greater_than_extension(numbers, plan.greater_than_refs[i]) for i in range(plan.n_values)}
    extra = numbers.width - 1 if numbers is not None and numbers.method == "digits" else 0
    out = _Outputs.empty(plan.n_values, len(heads), len(plan.answer_labels))
    layers = sorted({h.layer for h in heads})
    hook_names = [pattern_hook(layer) for layer in layers]
    keep_supported = _accepts_logits_to_keep(model)
    device = getattr(model.cfg, "device", "cpu")
    n_shared = shared_prefix_length(plan, predictions) if share_prefix else 0
    windows = [w for w in (sliding_window(model, layer) for layer in range(int(model.cfg.n_layers))) if w]
    if windows and min(windows) < max(len(ids) for ids in plan.token_ids) + extra:
        n_shared = 0  # cached prefix keys escape the sliding-window mask (tests/models/test_gemma.py): run whole
    prefix_cache = _prefix_cache(model, plan.token_ids[0][:n_shared]) if n_shared >= 2 else None
    if prefix_cache is None:
        n_shared = 0
    done = 0
    report(progress, 0.0, f"0/{plan.n_values} values")
    for rows in _chunks(plan, extra, batch_tokens, max_batch):
        token_rows = [plan.token_ids[i] + extension.get(i, []) for i in rows]
        tokens = torch.tensor(token_rows, dtype=torch.long, device=device)  # [batch, pos]
        n_pos = tokens.shape[1]
        kwargs = _chunk_cache_kwargs(prefix_cache, len(rows))
        run_tokens = tokens[:, n_shared:]  # [batch, pos - shared]
        if predictions:
            keep = n_pos - int(plan.answer_pos[rows].min())
            if keep_supported:
                kwargs["logits_to_keep"] = keep
            logits, captured = capture(model, run_tokens, hook_names, **kwargs)
            logits = logits[:, -keep:].detach().float().cpu()  # [batch, keep, vocab]
            _store_predictions(out, rows, _answer_steps(logits, plan, rows, n_pos, extra), plan, numbers)
        else:
            _, captured = capture(model, run_tokens, hook_names, stop_at_layer=layers[-1] + 1, **kwargs)
        if heads:
            _read_attention(out, rows, plan, heads, captured, n_shared)
        done += len(rows)
        report(progress, done / plan.n_values, f"{done}/{plan.n_values} values")
    return _result(model, plan, heads, out, predictions, numbers)


def run_sweep_loop(model: Any, plan: SweepPlan, heads: Sequence[HeadRef], predictions: bool = True,
                   progress: Optional[ProgressCallback] = None) -> SweepResult:
    """The naive reference: one prompt at a time, a full forward pass each, full logits.

    For greater-than with a digit tokenizer each extra digit is another pass
    on the prompt with the tied digits appended, as one would write it by hand.
    """
    heads = list(heads)
    _needs(heads, predictions)
    numbers = _setup_numbers(model, plan, predictions)
    out = _Outputs.empty(plan.n_values, len(heads), len(plan.answer_labels))
    hook_names = [pattern_hook(layer) for layer in sorted({h.layer for h in heads})]
    device = getattr(model.cfg, "device", "cpu")
    for i in range(plan.n_values):
        tokens = torch.tensor([plan.token_ids[i]], dtype=torch.long, device=device)
        logits, cache = capture(model, tokens, hook_names)
        for j, head in enumerate(heads):
            pattern = cache[pattern_hook(head.layer)]
            out.attn[i, j] = float(pattern[0, head.head, plan.query_pos[i], plan.key_pos[i]])
        if predictions:
            steps = [logits[:, int(plan.answer_pos[i])].float().cpu()]
            if numbers is not None:
                extension = greater_than_extension(numbers, plan.greater_than_refs[i])
                for n_extra in range(1, len(extension) + 1):
                    longer = torch.tensor([plan.token_ids[i] + extension[:n_extra]], dtype=torch.long, device=device)
                    more_logits, _ = capture(model, longer, [])
                    steps.append(more_logits[:, -1].float().cpu())
            _store_predictions(out, np.array([i]), steps, plan, numbers)
        report(progress, (i + 1) / plan.n_values, f"{i + 1}/{plan.n_values} values")
    return _result(model, plan, heads, out, predictions, numbers)


def _result(model: Any, plan: SweepPlan, heads: list[HeadRef], out: _Outputs, predictions: bool,
            numbers: Optional[NumberTokens]) -> SweepResult:
    str_token = _str_token_lookup(model)
    columns: dict[str, Any] = {
        "prompt": plan.texts,
        "n_tokens": plan.lengths,
        "query_token": [f"{q}:{str_token(ids[q])}" for ids, q in zip(plan.token_ids, plan.query_pos)],
        "key_token": [f"{k}:{str_token(ids[k])}" for ids, k in zip(plan.token_ids, plan.key_pos)],
    }
    curves: list[str] = []
    for j, head in enumerate(heads):
        columns[attention_column(head)] = out.attn[:, j]
        curves.append(attention_column(head))
    if predictions:
        if numbers is not None:
            columns["greater_than"] = out.p_above - out.p_below
            columns["p_above"] = out.p_above
            columns["p_at_or_below"] = out.p_below
            curves = ["greater_than", "p_above", "p_at_or_below"] + curves
        for j, label in enumerate(plan.answer_labels):
            columns[prob_column(label)] = out.probs[:, j]
            columns[logit_column(label)] = out.logits[:, j]
            curves += [prob_column(label), logit_column(label)]
        if len(plan.answer_labels) == 2:
            columns["logit_diff"] = out.logits[:, 0] - out.logits[:, 1]
            curves.append("logit_diff")
        columns["top_token"] = [str_token(int(t)) for t in out.top_ids]
        columns["top_prob"] = out.top_probs
        curves.append("top_prob")
    measured = pd.DataFrame(columns, index=plan.values.index)
    table = pd.concat([plan.values.drop(columns=[c for c in columns if c in plan.values.columns]), measured], axis=1)
    return SweepResult(table=table, plan=plan, heads=heads, curves=curves,
                       greater_than_method=numbers.method if numbers is not None else None)


def _str_token_lookup(model: Any):
    cache: dict[int, str] = {}

    def lookup(token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in cache:
            cache[token_id] = model.to_single_str_token(token_id)
        return cache[token_id]

    return lookup
