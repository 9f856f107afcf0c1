"""What an ablated head's output is replaced with: zero, mean or resample ablation at ``hook_z``.

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

:func:`variant_hooks` applies an :class:`Ablation` to a batch holding many
variants (sets of heads ablated together), variant-major.
"""

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from headvis_core import hooks
from headvis_core.data.prompt_pairs import PromptPairs
from headvis_core.errors import InputError, UnsupportedArchitectureError
from headvis_core.heads import HeadRef
from headvis_core.hooks import z_hook
from headvis_core.progress import ProgressCallback, report

ABLATION_KINDS = ("zero", "mean", "resample")

Variant = tuple[HeadRef, ...]


def check_hookable(model: Any) -> None:
    """Raise a readable error if heads of ``model`` cannot be ablated at ``hook_z``."""
    hook_dict = getattr(model, "hook_dict", {})
    if not hasattr(model, "blocks") or z_hook(0) not in hook_dict:
        raise UnsupportedArchitectureError(
            "This model's attention cannot be hooked per head (it has no blocks.0.attn.hook_z), so its "
            "heads cannot be ablated one by one. Try another model.")


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


def capture_z(model: Any, batches: Iterable[torch.Tensor], layers: Sequence[int],
               progress: Optional[ProgressCallback] = None) -> list[dict[int, torch.Tensor]]:
    """``hook_z`` of ``layers`` for each ``[batch, pos]`` tensor: ``[{layer: [batch, pos, heads, d_head]}]``."""
    names = {layer: z_hook(layer) for layer in layers}
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


def mean_ablation(model: Any, reference: PromptPairs, progress: Optional[ProgressCallback] = None) -> Ablation:
    """Each head's mean ``hook_z`` over ``reference`` (prompts of one length), per position and overall."""
    check_hookable(model)
    length = reference.require_one_length("Mean ablation (the mean is taken position by position)")
    layers = list(range(int(model.cfg.n_layers)))
    sums: dict[int, torch.Tensor] = {}
    n = 0
    for start in range(0, len(reference), 32):
        batch = torch.stack(reference.tokens[start:start + 32]).to(model.cfg.device)
        (z,) = capture_z(model, [batch], layers)
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


def resample_ablation(model: Any, prompts: PromptPairs,
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
        (z,) = capture_z(model, [batch], layers)
        for layer in layers:
            values[layer].extend(z[layer].unbind(0))
        report(progress, min(1.0, (start + 32) / len(prompts)), "corrupted activations")
    return Ablation("resample", int(model.cfg.n_heads), int(model.cfg.d_head), resample_values=values,
                    description=f"resampled from {len(prompts)} corrupted prompts, position-aligned")


def make_ablation(model: Any, kind: str, prompts: PromptPairs, reference: Optional[PromptPairs] = None,
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


def layer_masks(variants: Sequence[Variant], n_layers: int, n_heads: int) -> dict[int, torch.Tensor]:
    """``{layer: [n_variants, n_heads] bool}`` for the layers some variant ablates."""
    masks: dict[int, torch.Tensor] = {}
    for v, variant in enumerate(variants):
        for head in variant:
            if head.layer not in masks:
                masks[head.layer] = torch.zeros(len(variants), n_heads, dtype=torch.bool)
            masks[head.layer][v, head.head] = True
    return masks


def variant_hooks(model: Any, ablation: Ablation, masks: dict[int, torch.Tensor], prompt_indices: list[int],
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

        result.append((z_hook(layer), hook))
    return result
