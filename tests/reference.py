"""Slow references shared by the tests: ablate heads by hand and run one plain forward pass."""

from typing import Any, Callable, Optional, Sequence

import torch

from headvis_core import hooks
from headvis_core.heads import HeadRef
from headvis_core.hooks import z_hook

# replacement(layer, z) -> a tensor shaped like z [batch, pos, head, d_head]; only the ablated heads' slots are read
Replacement = Callable[[int, torch.Tensor], torch.Tensor]


def ablated_logits(model: Any, tokens: torch.Tensor, heads: Sequence[HeadRef],
                   replacement: Optional[Replacement] = None) -> torch.Tensor:
    """Logits ``[batch, pos, vocab]`` of one forward pass with ``heads`` replaced at ``hook_z``.

    The plainest ablation there is: no batching of variants, no replay. ``replacement`` gives the values
    (zeros when ``None``: zero ablation).
    """
    by_layer: dict[int, list[int]] = {}
    for head in heads:
        by_layer.setdefault(head.layer, []).append(head.head)

    def make(layer: int, slots: list[int]) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            z[:, :, slots] = 0 if replacement is None else replacement(layer, z)[:, :, slots].to(z.dtype)
            return z
        return hook

    return hooks.run_with_hooks(model, tokens, [(z_hook(layer), make(layer, slots))
                                                for layer, slots in by_layer.items()])
