"""Norms frozen at their actual input, and RoPE, as linear maps on stacks of component vectors.

A layer norm ``LN(x) = (x - mean(x)) / s(x) * w + b`` (RMSNorm: no centring, no ``b``) is not
linear in ``x`` because its scale ``s(x) = sqrt(mean(x_c^2) + eps)`` depends on ``x``. Freezing
``s`` at its value on the prompt (read from the bridge's ``hook_scale``, which holds this
denominator) makes it linear, so it distributes over a sum of components: the component ``c``
maps to ``(c - mean(c)) / s * w`` and the bias ``b`` is carried by the ``bias`` component. The
sum over components is then exactly the model's own normalised vector. This is the standard
"frozen layer norm" linearisation of direct logit attribution (Elhage et al. 2021, "A
Mathematical Framework for Transformer Circuits"; Nanda's attribution notes).

RoPE (Su et al. 2021, "RoFormer") multiplies each (pair of) query/key coordinate(s) by a
rotation that depends only on the position, so it is linear per position:
``rope(x) = x * cos + rotate_half(x) * sin`` with the ``cos``/``sin`` the bridge fires at
``blocks.L.attn.hook_cos/hook_sin``.
"""


from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float

from headvis_core.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class FrozenNorm:
    """One norm at one position (or a batch of them) with its scale frozen.

    ``scale``: the denominator ``s`` (broadcastable to the rows it is applied to);
    ``weight``: the effective gain (``1 + w`` for Gemma's offset weights); ``bias``: LayerNorm's
    additive bias or ``None``; ``centre``: whether the norm subtracts the mean (LayerNorm).
    """

    scale: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    centre: bool

    def apply(self, rows: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        """The linear part applied to component vectors (the bias is not added: see :attr:`bias`)."""
        if self.centre:
            rows = rows - rows.mean(dim=-1, keepdim=True)
        rows = rows / self.scale
        return rows * self.weight if self.weight is not None else rows


def norm_parameters(norm: Any) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], bool]:
    """``(effective weight, bias, centres)`` of a TransformerLens normalisation bridge, in float64."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().double()
        if getattr(norm, "uses_weight_offset", False):
            weight = weight + 1.0
    else:
        weight = None
    rms = bool(getattr(norm, "uses_rms_norm", True))
    bias = getattr(getattr(norm, "original_component", None), "bias", None)
    bias = bias.detach().double() if isinstance(bias, torch.Tensor) and not rms else None
    return weight, bias, not rms


def frozen_norm(norm: Any, scale: torch.Tensor) -> FrozenNorm:
    """``norm`` (a normalisation bridge) frozen at ``scale`` (its captured ``hook_scale``)."""
    weight, bias, centre = norm_parameters(norm)
    return FrozenNorm(scale=scale.double(), weight=weight, bias=bias, centre=centre)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in halves of the last dim (Llama's RoPE convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_convention(model: Any) -> None:
    """Refuse RoPE layouts other than Llama's rotate-half (the one applied by :func:`apply_rope`)."""
    cfg = model.cfg
    for flag in ("rotary_interleaved_cos_sin", "rotary_adjacent_pairs"):
        if getattr(cfg, flag, False):
            raise UnsupportedArchitectureError(
                f"Edge attribution handles Llama-style RoPE only; this model rotates adjacent pairs ({flag}).")


def apply_rope(rows: Float[torch.Tensor, "n d_head"], cos: Float[torch.Tensor, "*n rot"],
               sin: Float[torch.Tensor, "*n rot"], full_rotation: bool = False) -> Float[torch.Tensor, "n d_head"]:
    """RoPE applied to each row; ``cos``/``sin`` as the bridge fires them, of one position (shared by
    the rows) or one per row.

    ``full_rotation``: the cos/sin halves are not duplicated (GPT-OSS), so they are concatenated
    first. When ``cos`` is shorter than the head (partial rotary, e.g. GPT-NeoX) only the leading
    coordinates rotate.
    """
    cos, sin = cos.double(), sin.double()
    if full_rotation:
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    rotary = cos.shape[-1]
    if rotary >= rows.shape[-1]:
        return rows * cos + rotate_half(rows) * sin
    head, tail = rows[..., :rotary], rows[..., rotary:]
    return torch.cat([head * cos + rotate_half(head) * sin, tail], dim=-1)
