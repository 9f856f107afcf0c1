"""The ablation runner: a clean pass once, then many ablated variants in few batched passes.

:class:`AblationRunner` runs the clean prompts once and then evaluates any
number of ablated *variants* (each a set of heads ablated together, with the
values of :mod:`headvis_core.ablation.values`) in few batched passes. A
variant whose lowest head is in layer ``l`` starts from the clean residual
stream entering block ``l``, so the blocks below are never recomputed
(:mod:`headvis_core.ablation.replay`). Variants starting at different layers
share one pass: rows join the batch at their start block.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from headvis_core import hooks
from headvis_core.ablation.replay import BlockReplay
from headvis_core.ablation.values import Ablation, Variant, check_hookable, layer_masks, variant_hooks
from headvis_core.data.prompt_pairs import PromptPairs
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.hooks import resid_pre_hook
from headvis_core.progress import ProgressCallback, report, scaled

ENGINES = ("replay", "forward", "loop")
# Rows x positions per batched pass: bounds activation memory (the final
# logits are bounded separately by LOGIT_BUDGET floats).
DEFAULT_BATCH_TOKENS = 8192
LOGIT_BUDGET = 2 ** 25
ATTENTION_BUDGET = 2 ** 24

# metric_fn(ablated [n, P, n_ans, vocab], clean [P, n_ans, vocab], prompt indices) -> {name: [n, P, ...]}
MetricFn = Callable[[torch.Tensor, torch.Tensor, list[int]], dict[str, torch.Tensor]]


@dataclass
class _Group:
    indices: list[int]  # prompt indices
    tokens: torch.Tensor  # [P, pos]
    positions: tuple[int, ...]
    clean_logits: torch.Tensor  # [P, n_ans, vocab] (float32)
    resid_pre: Optional[list[torch.Tensor]] = None  # per layer [P, pos, d_model]
    replay: Optional[BlockReplay] = None


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
    prompts: PromptPairs
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
        layer_names = [resid_pre_hook(l) for l in range(self.n_layers)]
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

    def _checked_replay(self, group: _Group) -> Optional[BlockReplay]:
        try:
            replay = BlockReplay(self.model, group.tokens[:1])
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
        fwd_hooks = variant_hooks(self.model, self.ablation, layer_masks([base], self.n_layers, self.n_heads),
                                   group.indices)
        names = [resid_pre_hook(l) for l in range(self.n_layers)]
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
        masks = layer_masks(variants, self.n_layers, self.n_heads)
        fwd_hooks = variant_hooks(self.model, self.ablation, masks, group.indices)
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
        masks = layer_masks(variants, self.n_layers, self.n_heads)
        fwd_hooks = variant_hooks(self.model, self.ablation, masks, group.indices)
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

