"""Attention patterns of chosen heads, captured with only the hooks they need."""


from typing import Any, Sequence

import torch
from jaxtyping import Float, Int

from headvis_core.heads import HeadRef
from headvis_core.hooks import capture, pattern_hook


def head_patterns(model: Any, tokens: Int[torch.Tensor, "batch pos"],
                  heads: Sequence[HeadRef]) -> Float[torch.Tensor, "batch selected query key"]:
    """Attention patterns ``[batch, len(heads), query, key]`` of ``heads`` on ``tokens [batch, pos]``.

    One forward pass, hooking only the layers of ``heads`` and stopping after
    the last of them.
    """
    layers = sorted({h.layer for h in heads})
    _, cache = capture(model, tokens, [pattern_hook(l) for l in layers], stop_at_layer=layers[-1] + 1)
    # each layer's pattern to the CPU first: under a device_map split the layers live on different devices
    return torch.stack([cache[pattern_hook(h.layer)][:, h.head].float().cpu() for h in heads], dim=1)
