"""Ablating attention heads at ``hook_z``: zero, mean and resample ablation, batched.

A head is ablated by replacing its own output before the output projection,
``blocks.{l}.attn.hook_z[:, :, h]`` (``[batch, pos, n_heads, d_head]``, one slot
per *query* head, so under grouped-query attention the query heads sharing a
key/value head are still ablated one by one). Never the attention output
after W_O, which has already summed the heads. The replacement is:

- ``zero``: 0, which equals deleting the head's rows of W_O;
- ``mean``: the head's mean output over a reference prompt set (Wang et al.
  2022 mean-ablate over the ABC distribution), per position when the prompt
  has the reference prompts' length, else averaged over all their positions;
- ``resample``: the head's output on a corrupted prompt of the same length,
  position by position (resample ablation, Chan et al. 2022 "Causal
  scrubbing"), e.g. the IOI prompt with a third name.

:class:`AblationRunner` runs the clean prompts once and then evaluates any
number of ablated *variants* (each a set of heads ablated together) in few
batched passes. A variant whose lowest head is in layer ``l`` starts from the
clean residual stream entering block ``l``, so the blocks below are never
recomputed. TransformerBridge's own ``forward(start_at_layer=l)`` accepts
that residual but still executes blocks ``0..l-1`` internally (it discards
their output), so the runner drives the bridge's blocks itself, replaying the
exact arguments each block received in a clean pass, and checks the replay
against the full forward before relying on it. Variants starting at
different layers share one pass: rows join the batch at their start block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from headvis_core import hooks
from headvis_core.errors import InputError, UnsupportedArchitectureError
from headvis_core.heads import HeadRef
from headvis_core.progress import ProgressCallback, report, scaled
from headvis_core.tokens import single_token_id, tokenize_prompt

ABLATION_KINDS = ("zero", "mean", "resample")
ENGINES = ("replay", "forward", "loop")
# Rows x positions per batched pass: bounds activation memory (the final
# logits are bounded separately by LOGIT_BUDGET floats).
DEFAULT_BATCH_TOKENS = 8192
LOGIT_BUDGET = 2 ** 25
ATTENTION_BUDGET = 2 ** 24

Variant = tuple[HeadRef, ...]
# metric_fn(ablated [n, P, n_ans, vocab], clean [P, n_ans, vocab], prompt indices) -> {name: [n, P, ...]}
MetricFn = Callable[[torch.Tensor, torch.Tensor, list[int]], dict[str, torch.Tensor]]


def z_hook_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def resid_pre_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def check_hookable(model: Any) -> None:
    """Raise a readable error if heads of ``model`` cannot be ablated at ``hook_z``."""
    hook_dict = getattr(model, "hook_dict", {})
    if not hasattr(model, "blocks") or z_hook_name(0) not in hook_dict:
        raise UnsupportedArchitectureError(
            "This model's attention cannot be hooked per head (it has no blocks.0.attn.hook_z), so its "
            "heads cannot be ablated one by one. Try another model.")


# ---------------------------------------------------------------------------------------------
# Prompt sets


@dataclass(frozen=True)
class AblationPrompts:
    """Prompts to ablate on, tokenized, with what the metrics look at.

    ``answer_positions[i]`` are the positions of prompt ``i`` whose predictions
    are scored (default: the last token); ``label_ids[i]`` the true next token
    at each of them (for the loss). ``target_ids``/``alternative_ids`` give
    the logit difference ``target - alternative`` (IOI: IO minus S).
    """

    texts: list[str]
    tokens: list[torch.Tensor]  # each [pos_i]
    answer_positions: list[tuple[int, ...]]
    target_ids: Optional[list[int]] = None
    alternative_ids: Optional[list[int]] = None
    label_ids: Optional[list[tuple[int, ...]]] = None
    corrupted_tokens: Optional[list[torch.Tensor]] = None  # each [pos_i], for resample ablation
    corrupted_texts: Optional[list[str]] = None
    name: str = "prompts"
    skipped_names: tuple[str, ...] = ()  # IOI names dropped because they are not one token
    notes: tuple[str, ...] = ()  # shown to the user beside the results

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> list[int]:
        return [int(t.shape[-1]) for t in self.tokens]

    def subset(self, indices: Sequence[int]) -> "AblationPrompts":
        def pick(values):
            return None if values is None else [values[i] for i in indices]

        return replace(self, texts=pick(self.texts), tokens=pick(self.tokens),
                       answer_positions=pick(self.answer_positions), target_ids=pick(self.target_ids),
                       alternative_ids=pick(self.alternative_ids), label_ids=pick(self.label_ids),
                       corrupted_tokens=pick(self.corrupted_tokens), corrupted_texts=pick(self.corrupted_texts))

    def with_alternatives(self, alternative_ids: Sequence[int]) -> "AblationPrompts":
        return replace(self, alternative_ids=[int(i) for i in alternative_ids])

    def length_groups(self) -> list[list[int]]:
        """Indices of prompts that can share a batch: same length and answer positions."""
        groups: dict[tuple, list[int]] = {}
        for i, (tokens, positions) in enumerate(zip(self.tokens, self.answer_positions)):
            groups.setdefault((int(tokens.shape[-1]), positions), []).append(i)
        return list(groups.values())

    def require_one_length(self, why: str) -> int:
        lengths = sorted(set(self.lengths))
        if len(lengths) > 1:
            shown = ", ".join(str(n) for n in lengths[:8]) + (", ..." if len(lengths) > 8 else "")
            raise InputError(
                f"{why} needs prompts of one length, but these prompts have {shown} tokens. Use prompts "
                "that tokenize to the same length (for IOI, one template), or zero ablation.")
        return lengths[0]


def _ids(model: Any, tokens: Optional[Sequence[Optional[str]]], n: int, what: str) -> Optional[list[int]]:
    if tokens is None or all(t is None or t == "" for t in tokens):
        return None
    if len(tokens) != n or any(t is None or t == "" for t in tokens):
        raise InputError(f"Give a {what} token for every prompt, or for none.")
    return [single_token_id(model, t) for t in tokens]


def prompts_from_texts(model: Any, texts: Sequence[str], targets: Optional[Sequence[Optional[str]]] = None,
                       alternatives: Optional[Sequence[Optional[str]]] = None,
                       corrupted: Optional[Sequence[str]] = None, name: str = "prompts",
                       max_tokens: Optional[int] = None) -> AblationPrompts:
    """Tokenize prompts scored at their last token (empty or too-long prompts raise :class:`InputError`)."""
    texts = list(texts)
    if not texts:
        raise InputError("No prompts given: type a prompt or choose a prompt set.")
    tokens = []
    for i, text in enumerate(texts):
        try:
            tokens.append(tokenize_prompt(model, text, max_tokens=max_tokens).tokens[0])
        except InputError as err:
            raise InputError(f"Prompt {i + 1}: {err}" if len(texts) > 1 else str(err)) from err
    corrupted_tokens = None
    if corrupted is not None:
        corrupted = list(corrupted)
        if len(corrupted) == 1 and len(texts) > 1:
            corrupted = corrupted * len(texts)
        if len(corrupted) != len(texts):
            raise InputError(f"Give one corrupted prompt per prompt ({len(texts)}), not {len(corrupted)}.")
        corrupted_tokens = []
        for i, (text, clean) in enumerate(zip(corrupted, tokens)):
            tok = tokenize_prompt(model, text, max_tokens=max_tokens).tokens[0]
            if tok.shape[-1] != clean.shape[-1]:
                raise InputError(
                    f"Corrupted prompt {i + 1} has {tok.shape[-1]} tokens but its clean prompt has "
                    f"{clean.shape[-1]}: resample ablation replaces activations position by position, "
                    "so both must tokenize to the same length.")
            corrupted_tokens.append(tok)
    return AblationPrompts(
        texts=texts, tokens=tokens, answer_positions=[(int(t.shape[-1]) - 1,) for t in tokens],
        target_ids=_ids(model, targets, len(texts), "target"),
        alternative_ids=_ids(model, alternatives, len(texts), "alternative"),
        corrupted_tokens=corrupted_tokens, corrupted_texts=None if corrupted is None else list(corrupted),
        name=name)


def ioi_prompts(model: Any, n_prompts: int = 8, seed: int = 0, template: Optional[str] = None) -> AblationPrompts:
    """IOI prompts (Wang et al. 2022) with their ABC corruptions; metric ``logit(IO) - logit(S)``."""
    from headvis_core.data.ioi import generate_ioi

    dataset = generate_ioi(model, n_prompts, seed=seed, templates=[template] if template else None)
    prompts = prompts_from_texts(model, dataset.clean_texts, targets=[p.io for p in dataset.prompts],
                                 alternatives=[p.s for p in dataset.prompts], name="IOI",
                                 corrupted=dataset.corrupted_texts)
    return replace(prompts, skipped_names=tuple(dataset.skipped_names))


def induction_prompts(model: Any, n_seqs: int = 8, half_len: int = 20, seed: int = 0) -> AblationPrompts:
    """Repeated random tokens (Olsson et al. 2022): scored by the loss on the second copy.

    Answer positions are those predicting the second copy's tokens 2..n (its
    first token cannot be inferred from the first copy).
    """
    from headvis_core.data.probes import random_token_range, repeated_random_tokens
    from headvis_core.tokens import bos_token_id

    if n_seqs < 1 or half_len < 2:
        raise InputError("The induction preset needs at least one sequence and a half length of at least 2.")
    bos = bos_token_id(model)
    low, high = random_token_range(model)
    tokens = repeated_random_tokens(n_seqs, half_len, high, bos, seed=seed, low=low)
    start = (0 if bos is None else 1) + half_len  # first position of the second copy
    positions = tuple(range(start, start + half_len - 1))
    labels = [tuple(int(x) for x in row[start + 1:start + half_len]) for row in tokens]
    texts = [f"repeated random tokens #{i + 1} ({half_len} x 2)" for i in range(n_seqs)]
    return AblationPrompts(texts=texts, tokens=list(tokens), answer_positions=[positions] * n_seqs,
                           label_ids=labels, name="induction")


def library_prompts(model: Any, key: str) -> AblationPrompts:
    """A prompt set from ``prompts/`` with its answer/alternative tokens where every prompt has them."""
    from headvis_core.data.prompt_library import load_prompt_set

    prompt_set = load_prompt_set(key)
    answers = [p.answer for p in prompt_set.prompts]
    alternatives = [p.alternative for p in prompt_set.prompts]
    prompts = prompts_from_texts(model, prompt_set.texts, name=prompt_set.name)
    if not (all(answers) and all(alternatives)):
        return prompts
    try:
        return replace(prompts, target_ids=_ids(model, answers, len(answers), "target"),
                       alternative_ids=_ids(model, alternatives, len(alternatives), "alternative"))
    except InputError as err:
        # Still usable for KL and targeted ablation; only the logit difference needs the tokens.
        return replace(prompts, notes=(f"The set's answer tokens are not usable with this model ({err}), "
                                       "so the logit difference is not available.",))


# ---------------------------------------------------------------------------------------------
# Ablation values


@dataclass
class Ablation:
    """What an ablated head's ``hook_z`` slot is replaced with, per layer."""

    kind: str
    n_heads: int
    d_head: int
    position_means: Optional[dict[int, torch.Tensor]] = None  # layer -> [pos, n_heads, d_head]
    token_means: Optional[dict[int, torch.Tensor]] = None  # layer -> [n_heads, d_head]
    reference_length: Optional[int] = None
    resample_values: Optional[dict[int, list[torch.Tensor]]] = None  # layer -> per prompt [pos, n_heads, d_head]
    description: str = ""

    def replacement(self, layer: int, prompt_indices: Sequence[int], pos: int,
                    like: torch.Tensor) -> torch.Tensor:
        """Values broadcastable to ``[len(prompt_indices), pos, n_heads, d_head]``."""
        if self.kind == "zero":
            return torch.zeros((), dtype=like.dtype, device=like.device)
        if self.kind == "mean":
            if self.reference_length == pos:
                return self.position_means[layer].to(like)[None]
            return self.token_means[layer].to(like)[None, None]
        if self.kind == "resample":
            values = self.resample_values[layer]
            return torch.stack([values[i] for i in prompt_indices]).to(like)
        raise InputError(f"Unknown ablation kind {self.kind!r}; choose one of {', '.join(ABLATION_KINDS)}.")


def _capture_z(model: Any, batches: Iterable[torch.Tensor], layers: Sequence[int],
               progress: Optional[ProgressCallback] = None) -> list[dict[int, torch.Tensor]]:
    """``hook_z`` of ``layers`` for each ``[batch, pos]`` tensor: ``[{layer: [batch, pos, heads, d_head]}]``."""
    names = {layer: z_hook_name(layer) for layer in layers}
    batches = list(batches)
    out = []
    for i, tokens in enumerate(batches):
        stop = max(layers) + 1
        _, cache = hooks.capture(model, tokens, list(names.values()),
                                 stop_at_layer=stop if stop < int(model.cfg.n_layers) else None)
        out.append({layer: cache[names[layer]] for layer in layers})
        report(progress, (i + 1) / len(batches), "reference activations")
    return out


def zero_ablation(model: Any) -> Ablation:
    return Ablation("zero", int(model.cfg.n_heads), int(model.cfg.d_head), description="zero ablation")


def mean_ablation(model: Any, reference: AblationPrompts, progress: Optional[ProgressCallback] = None) -> Ablation:
    """Each head's mean ``hook_z`` over ``reference`` (prompts of one length), per position and overall."""
    check_hookable(model)
    length = reference.require_one_length("Mean ablation (the mean is taken position by position)")
    layers = list(range(int(model.cfg.n_layers)))
    sums: dict[int, torch.Tensor] = {}
    n = 0
    for start in range(0, len(reference), 32):
        batch = torch.stack(reference.tokens[start:start + 32]).to(model.cfg.device)
        (z,) = _capture_z(model, [batch], layers)
        for layer in layers:
            total = z[layer].float().sum(0)
            sums[layer] = total if layer not in sums else sums[layer] + total
        n += batch.shape[0]
        report(progress, min(1.0, (start + 32) / len(reference)), "mean activations")
    position_means = {layer: s / n for layer, s in sums.items()}
    token_means = {layer: m.mean(0) for layer, m in position_means.items()}
    return Ablation("mean", int(model.cfg.n_heads), int(model.cfg.d_head), position_means=position_means,
                    token_means=token_means, reference_length=length,
                    description=f"mean over {n} reference prompts of {length} tokens (per position where the "
                                f"prompt has {length} tokens, else over all positions)")


def resample_ablation(model: Any, prompts: AblationPrompts,
                      progress: Optional[ProgressCallback] = None) -> Ablation:
    """Each head's ``hook_z`` on prompt ``i``'s corrupted counterpart, position-aligned."""
    check_hookable(model)
    if prompts.corrupted_tokens is None:
        raise InputError("Resample ablation needs corrupted prompts (for example the IOI preset's ABC prompts, "
                         "or a corrupted prompt typed beside the clean one).")
    prompts.require_one_length("Resample ablation (activations are swapped position by position)")
    layers = list(range(int(model.cfg.n_layers)))
    values: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(prompts), 32):
        batch = torch.stack(prompts.corrupted_tokens[start:start + 32]).to(model.cfg.device)
        (z,) = _capture_z(model, [batch], layers)
        for layer in layers:
            values[layer].extend(z[layer].unbind(0))
        report(progress, min(1.0, (start + 32) / len(prompts)), "corrupted activations")
    return Ablation("resample", int(model.cfg.n_heads), int(model.cfg.d_head), resample_values=values,
                    description=f"resampled from {len(prompts)} corrupted prompts, position-aligned")


def make_ablation(model: Any, kind: str, prompts: AblationPrompts, reference: Optional[AblationPrompts] = None,
                  progress: Optional[ProgressCallback] = None) -> Ablation:
    """The ablation of ``kind``; mean ablation averages over ``reference`` (default: ``prompts`` themselves)."""
    check_hookable(model)
    if kind == "zero":
        return zero_ablation(model)
    if kind == "mean":
        if len(reference or prompts) < 2:
            raise InputError("Mean ablation needs at least two prompts to average over: with one prompt the "
                             "mean is the prompt's own activation and ablating changes nothing. Use a prompt "
                             "set, or zero ablation.")
        if reference is None:
            prompts.require_one_length("Mean ablation over this prompt set (the mean is taken per position)")
        return mean_ablation(model, reference or prompts, progress=progress)
    if kind == "resample":
        return resample_ablation(model, prompts, progress=progress)
    raise InputError(f"Unknown ablation kind {kind!r}; choose one of {', '.join(ABLATION_KINDS)}.")


# ---------------------------------------------------------------------------------------------
# Hooks


def _layer_masks(variants: Sequence[Variant], n_layers: int, n_heads: int) -> dict[int, torch.Tensor]:
    """``{layer: [n_variants, n_heads] bool}`` for the layers some variant ablates."""
    masks: dict[int, torch.Tensor] = {}
    for v, variant in enumerate(variants):
        for head in variant:
            if head.layer not in masks:
                masks[head.layer] = torch.zeros(len(variants), n_heads, dtype=torch.bool)
            masks[head.layer][v, head.head] = True
    return masks


def _variant_hooks(model: Any, ablation: Ablation, masks: dict[int, torch.Tensor], prompt_indices: list[int],
                   ) -> list[tuple[str, Callable]]:
    """Hooks ablating variant ``v``'s heads in rows ``v*P .. v*P+P-1`` (``P = len(prompt_indices)``).

    Rows are variant-major; a pass may hold only the first variants' rows
    (rows join at their start block), so each hook reads the batch size.
    """
    n_prompts = len(prompt_indices)
    n_heads = ablation.n_heads
    result = []
    for layer, mask in masks.items():
        def hook(z: torch.Tensor, hook: Any, layer: int = layer, mask: torch.Tensor = mask) -> torch.Tensor:
            if z.ndim != 4 or z.shape[2] != n_heads:
                raise UnsupportedArchitectureError(
                    f"hook_z of this model has shape {tuple(z.shape)}, not [batch, pos, {n_heads} heads, "
                    "d_head], so its heads cannot be ablated one by one.")
            n_variants = z.shape[0] // n_prompts
            present = mask[:n_variants].to(z.device)
            if not bool(present.any()):
                return z
            pos = z.shape[1]
            values = ablation.replacement(layer, prompt_indices, pos, z)
            grouped = z.view(n_variants, n_prompts, pos, n_heads, z.shape[-1])
            ablated = torch.where(present[:, None, None, :, None], values, grouped)
            return ablated.view_as(z)

        result.append((z_hook_name(layer), hook))
    return result


# ---------------------------------------------------------------------------------------------
# Block replay: running blocks l..L-1 from a residual stream without recomputing the blocks below


class _BlockReplay:
    """Calls the bridge's blocks with the arguments they received in a clean pass.

    The recorded arguments (attention mask, rotary position embeddings,
    position ids) depend only on the sequence length, so one recording per
    length serves any batch size; the KV cache object is dropped so the
    replay neither reads nor grows a cache.
    """

    def __init__(self, model: Any, tokens_1: torch.Tensor):
        from transformers.cache_utils import Cache

        self.model = model
        self.calls: dict[int, tuple[tuple, dict]] = {}

        def strip(value: Any) -> Any:
            return None if isinstance(value, Cache) else value

        def recorder(index: int):
            def record(module, args, kwargs):
                if index not in self.calls:
                    kwargs = {k: strip(v) for k, v in kwargs.items()}
                    if "use_cache" in kwargs:
                        kwargs["use_cache"] = False
                    self.calls[index] = (tuple(strip(a) for a in args[1:]), kwargs)
            return record

        # Under the model's lock, so no other session's pass is recorded.
        with hooks.exclusive(model):
            handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True)
                       for i, block in enumerate(model.blocks)]
            try:
                hooks.forward(model, tokens_1)
            finally:
                for handle in handles:
                    handle.remove()
        if len(self.calls) != len(model.blocks):
            raise RuntimeError("not every block was called with (hidden_states, ...)")

    def block(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.calls[index]
        out = self.model.blocks[index](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """``[rows, len(positions), vocab]`` from the final residual ``[rows, pos, d_model]``."""
        return self.model.unembed(self.model.ln_final(hidden[:, list(positions)]))


# ---------------------------------------------------------------------------------------------
# The runner


@dataclass
class _Group:
    indices: list[int]  # prompt indices
    tokens: torch.Tensor  # [P, pos]
    positions: tuple[int, ...]
    clean_logits: torch.Tensor  # [P, n_ans, vocab] (float32)
    resid_pre: Optional[list[torch.Tensor]] = None  # per layer [P, pos, d_model]
    replay: Optional[_BlockReplay] = None


def variant_start(variant: Variant, n_layers: int) -> int:
    return min((h.layer for h in variant), default=n_layers)


@dataclass
class AblationRunner:
    """Clean pass once, then batched evaluation of ablated variants.

    ``engine``: ``"replay"`` (default: batched, starting each variant at its
    lowest layer), ``"forward"`` (batched full forward passes through the
    bridge) or ``"loop"`` (one forward pass per variant: the slow reference).
    If the replay does not reproduce the full forward within float tolerance
    the runner falls back to ``"forward"`` and says so in ``engine_note``.
    """

    model: Any
    prompts: AblationPrompts
    ablation: Ablation
    engine: str = "replay"
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS
    progress: Optional[ProgressCallback] = None
    engine_note: str = ""
    groups: list[_Group] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_hookable(self.model)
        if self.engine not in ENGINES:
            raise InputError(f"Unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}.")
        if len(self.prompts) == 0:
            raise InputError("No prompts to ablate on.")
        self.n_layers = int(self.model.cfg.n_layers)
        self.n_heads = int(self.model.cfg.n_heads)
        device = self.model.cfg.device
        layer_names = [resid_pre_name(l) for l in range(self.n_layers)]
        index_groups = self.prompts.length_groups()
        for g, indices in enumerate(index_groups):
            tokens = torch.stack([self.prompts.tokens[i] for i in indices]).to(device)
            positions = self.prompts.answer_positions[indices[0]]
            wanted = layer_names if self.engine == "replay" else []
            logits, cache = hooks.capture(self.model, tokens, wanted)
            group = _Group(indices=indices, tokens=tokens, positions=positions,
                           clean_logits=logits[:, list(positions)].float())
            if self.engine == "replay":
                group.resid_pre = [cache[name] for name in layer_names]
                group.replay = self._checked_replay(group)
            self.groups.append(group)
            report(self.progress, (g + 1) / len(index_groups), "clean run")
        self.clean_logits = [None] * len(self.prompts)  # per prompt [n_ans, vocab]
        for group in self.groups:
            for row, i in enumerate(group.indices):
                self.clean_logits[i] = group.clean_logits[row]

    def _checked_replay(self, group: _Group) -> Optional[_BlockReplay]:
        try:
            replay = _BlockReplay(self.model, group.tokens[:1])
            with hooks.exclusive(self.model):
                hidden = group.resid_pre[0][:1]
                for layer in range(self.n_layers):
                    hidden = replay.block(layer, hidden)
                logits = replay.logits(hidden, group.positions).float()
        except Exception as err:  # an architecture whose blocks need more than the recorded arguments
            self._fall_back(f"block replay failed ({type(err).__name__}: {err})")
            return None
        reference = group.clean_logits[:1]
        scale = float(reference.abs().max()) + 1.0
        tolerance = (1e-4 if self._dtype_is_float32() else 2e-2) * scale
        error = float((logits - reference).abs().max())
        if not math.isfinite(error) or error > tolerance:
            self._fall_back(f"block replay differs from the full forward by {error:.2g}")
            return None
        return replay

    def _dtype_is_float32(self) -> bool:
        return next(self.model.parameters()).dtype == torch.float32

    def _fall_back(self, why: str) -> None:
        self.engine = "forward"
        self.engine_note = f"{why}; using batched full forward passes instead"
        for group in self.groups:
            group.resid_pre, group.replay = None, None

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, variants: Sequence[Sequence[HeadRef]], metric_fn: MetricFn,
                 progress: Optional[ProgressCallback] = None,
                 prompt_indices: Optional[Sequence[int]] = None,
                 base: Sequence[HeadRef] = ()) -> dict[str, torch.Tensor]:
        """Metrics of each variant (a set of heads ablated together): ``{name: [n_variants, n_prompts, ...]}``.

        ``prompt_indices`` restricts the run to some prompts (the result's
        prompt axis then follows their order). ``base``: heads every variant
        ablates (a greedy search's current set); the runner then computes the
        base-ablated residual stream once and starts each variant at the
        lowest layer of its *other* heads, which gives the same numbers for
        less work.
        """
        variants = [tuple(v) for v in variants]
        base = tuple(base)
        for variant in variants:
            for head in variant:
                head.check(self.n_layers, self.n_heads)
            if not set(base) <= set(variant):
                raise ValueError(f"variant {variant} does not contain the base heads {base}")
        wanted = list(range(len(self.prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
        column = {prompt: c for c, prompt in enumerate(wanted)}
        groups = [g for g in (self._subgroup(group, column) for group in self.groups) if g is not None]
        results: dict[str, torch.Tensor] = {}
        done = 0.0
        for group in groups:
            share = len(group.indices) / len(wanted)
            values = self._evaluate_group(group, variants, metric_fn, scaled(progress, done, done + share), base)
            columns = [column[i] for i in group.indices]
            for name, tensor in values.items():
                if name not in results:
                    results[name] = torch.zeros((len(variants), len(wanted)) + tuple(tensor.shape[2:]),
                                                dtype=tensor.dtype)
                results[name][:, columns] = tensor
            done += share
        report(progress, 1.0, "done")
        return results

    @staticmethod
    def _subgroup(group: _Group, wanted: dict[int, int]) -> Optional[_Group]:
        rows = [r for r, i in enumerate(group.indices) if i in wanted]
        if not rows:
            return None
        if len(rows) == len(group.indices):
            return group
        return _Group(indices=[group.indices[r] for r in rows], tokens=group.tokens[rows],
                      positions=group.positions, clean_logits=group.clean_logits[rows],
                      resid_pre=None if group.resid_pre is None else [x[rows] for x in group.resid_pre],
                      replay=group.replay)

    def _rows_per_pass(self, group: _Group) -> int:
        pos = group.tokens.shape[1]
        vocab = int(self.model.cfg.d_vocab)
        logit_positions = pos if self.engine != "replay" else len(group.positions)
        rows = min(self.max_batch_tokens // pos, ATTENTION_BUDGET // (self.n_heads * pos * pos),
                   LOGIT_BUDGET // (logit_positions * vocab))
        return max(1, rows)

    def _base_state(self, group: _Group, base: Variant) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residual stream entering each block, and answer logits, with ``base`` ablated: the start state."""
        if not base:
            return group.resid_pre, group.clean_logits
        fwd_hooks = _variant_hooks(self.model, self.ablation, _layer_masks([base], self.n_layers, self.n_heads),
                                   group.indices)
        names = [resid_pre_name(l) for l in range(self.n_layers)]
        logits, cache = hooks.capture(self.model, group.tokens, names, fwd_hooks=fwd_hooks)
        return [cache[name] for name in names], logits[:, list(group.positions)].float()

    def _evaluate_group(self, group: _Group, variants: list[Variant], metric_fn: MetricFn,
                        progress: Optional[ProgressCallback], base: Variant = ()) -> dict[str, torch.Tensor]:
        n_prompts = len(group.indices)
        if self.engine != "replay":
            base = ()
        base_set = set(base)

        def start(variant: Variant) -> int:
            return variant_start(tuple(h for h in variant if h not in base_set), self.n_layers)

        order = sorted(range(len(variants)), key=lambda v: start(variants[v]))
        state = self._base_state(group, base) if self.engine == "replay" else None
        per_pass = 1 if self.engine == "loop" else max(1, self._rows_per_pass(group) // n_prompts)
        chunks = [order[i:i + per_pass] for i in range(0, len(order), per_pass)]
        collected: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
        for c, chunk in enumerate(chunks):
            chunk_variants = [variants[v] for v in chunk]
            if self.engine == "replay":
                logits = self._replay_pass(group, chunk_variants, [start(v) for v in chunk_variants], state)
            else:
                logits = self._forward_pass(group, chunk_variants)
            logits = logits.view(len(chunk), n_prompts, len(group.positions), -1).float()
            for name, value in metric_fn(logits, group.clean_logits, group.indices).items():
                collected.setdefault(name, []).append((chunk, value.detach().cpu()))
            report(progress, (c + 1) / len(chunks), f"{min((c + 1) * per_pass, len(order))}/{len(order)} ablations")
        results = {}
        for name, parts in collected.items():
            shape = (len(variants),) + tuple(parts[0][1].shape[1:])
            out = torch.zeros(shape, dtype=parts[0][1].dtype)
            for chunk, value in parts:
                out[chunk] = value
            results[name] = out
        return results

    def _forward_pass(self, group: _Group, variants: list[Variant]) -> torch.Tensor:
        masks = _layer_masks(variants, self.n_layers, self.n_heads)
        fwd_hooks = _variant_hooks(self.model, self.ablation, masks, group.indices)
        tokens = group.tokens.repeat(len(variants), 1)
        logits = hooks.run_with_hooks(self.model, tokens, fwd_hooks)
        return logits[:, list(group.positions)]

    def _replay_pass(self, group: _Group, variants: list[Variant], starts: list[int],
                     state: tuple[list[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One pass for variants sorted by start layer; each joins the batch at its start block.

        ``state``: the residual stream entering each block and the answer
        logits of the run the variants branch off (clean, or base-ablated).
        """
        resid_pre, start_logits = state
        masks = _layer_masks(variants, self.n_layers, self.n_heads)
        fwd_hooks = _variant_hooks(self.model, self.ablation, masks, group.indices)
        unablated = [v for v, s in enumerate(starts) if s >= self.n_layers]
        hidden: Optional[torch.Tensor] = None
        with hooks.exclusive(self.model):
            try:
                with self.model.hooks(fwd_hooks=fwd_hooks):
                    for layer in range(min(starts), self.n_layers):
                        joining = sum(1 for s in starts if s == layer)
                        if joining:
                            fresh = resid_pre[layer].repeat(joining, 1, 1)
                            hidden = fresh if hidden is None else torch.cat([hidden, fresh])
                        if hidden is not None:
                            hidden = group.replay.block(layer, hidden)
                    logits = None if hidden is None else group.replay.logits(hidden, group.positions)
            finally:
                self.model.reset_hooks(including_permanent=False)
        if unablated:  # variants with nothing beyond the start state keep its logits
            parts = [] if logits is None else [logits]
            parts.append(start_logits.to(parts[0].dtype if parts else start_logits.dtype).repeat(len(unablated), 1, 1))
            logits = torch.cat(parts)
        return logits

