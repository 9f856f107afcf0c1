"""The activation-based copying score: on real text, does the head's output raise the logit of what it attends to?

A name-mover head (Wang et al. 2022, "Interpretability in the Wild") attends to a name and
writes that name into the logits. On real text this is measured by direct logit attribution
(Elhage et al. 2021): the head's output at query ``q``, ``o_q = z_q W_O`` (through Gemma's
post-attention norm frozen at ``q`` where the model has one), through the final norm frozen at
``q`` and ``W_U``, gives the logit it adds to each token; for the token ``t_j`` at context
position ``j``::

    l[q, j] = FrozenNorm_final(q)(o_q) . W_U[:, t_j]

The score of a head is the attention-weighted rise of the attended token over the other context
tokens, pooled over the queries of the probe set::

    direct_copying = sum_{q, k >= 1} A[q, k] (l[q, k] - mean_{1 <= j <= q} l[q, j]) / sum_{q, k >= 1} A[q, k]

in logits (nats). Position 0 (BOS, the sink) is left out on both sides. A head that copies what
it attends to scores clearly above 0; a head whose output is unrelated to the attended token
scores about 0 whatever its OV eigenvalues (tied embeddings make the weight-based
:mod:`headvis_core.atlas.copying` score near 1 for many heads of SmolLM2).

This is computed inside the text passes of :mod:`headvis_core.atlas.metrics` from
``hook_z`` (one layer at a time, reduced to ``[batch, head, query]`` at once) and the norms'
``hook_scale``; the unembedding rows are gathered only for the tokens in the batch.
"""

from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int

from headvis_core.attribution.components import has_submodule
from headvis_core.attribution.linearise import norm_parameters


def final_unembedding_rows(model: Any) -> Float[torch.Tensor, "vocab d_model"]:
    """``[vocab, d_model]``: each token's unembedding row with the final norm's gain folded in
    (and centred over ``d_model`` where the final norm is a LayerNorm, which centres its input)."""
    weight, _, centre = norm_parameters(model.ln_final)
    rows = model.W_U.detach().float().T  # float32: a float64 copy of a 49k-token unembedding is 226 MB
    if weight is not None:
        rows = rows * weight.float()
    if centre:
        rows = rows - rows.mean(-1, keepdim=True)
    return rows.contiguous()


class DirectCopyingSums:
    """Running numerator and attention mass of :data:`direct_copying` per ``[layer, head]``.

    Use per batch: :meth:`begin`, then the hooks of :meth:`hooks` in the forward pass (the
    pattern of each layer is handed in with :meth:`on_pattern` before its ``hook_z`` fires).
    """

    def __init__(self, model: Any):
        self.n_layers, self.n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
        # on the CPU, where the hooks' activations are reduced (the model may be on a GPU or split over several)
        self.W_O = model.W_O.detach().float().cpu()  # [layer, head, d_head, d_model]; the bridge builds it per access
        self.unembed = final_unembedding_rows(model).cpu()
        self.post = []  # per layer: (gain, centres) of the post-attention norm, or None
        for block in model.blocks:
            if has_submodule(block, "ln1_post"):
                weight, _, centre = norm_parameters(block.ln1_post)
                self.post.append((None if weight is None else weight.float().cpu(), centre))
            else:
                self.post.append(None)
        self.numerator = torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64)
        self.mass = torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64)

    def hook_names(self) -> list[str]:
        names = [f"blocks.{layer}.attn.hook_z" for layer in range(self.n_layers)]
        names += [f"blocks.{layer}.ln1_post.hook_scale" for layer in range(self.n_layers) if self.post[layer]]
        return names + ["ln_final.hook_scale"]

    def begin(self, tokens: Int[torch.Tensor, "batch pos"]) -> None:
        self.rows = self.unembed[tokens.cpu()]  # [batch, pos, d_model]
        self.patterns: dict[int, torch.Tensor] = {}
        self.rises: dict[int, torch.Tensor] = {}  # layer -> [batch, head, query], before the norms' scales
        self.post_scales: dict[int, torch.Tensor] = {}

    def on_pattern(self, layer: int, pattern: torch.Tensor) -> None:
        self.patterns[layer] = pattern

    def on_z(self, layer: int, z: Float[torch.Tensor, "batch pos head d_head"]) -> None:
        A = self.patterns.pop(layer).float().cpu()[..., 1:]  # [batch, head, query, key >= 1]
        out = torch.einsum("bqhe,hed->bqhd", z.float().cpu(), self.W_O[layer])
        if self.post[layer] is not None:
            gain, centre = self.post[layer]
            out = out - out.mean(-1, keepdim=True) if centre else out
            out = out * gain if gain is not None else out
        logits = torch.einsum("bqhd,bjd->bhqj", out, self.rows[:, 1:])  # [batch, head, query, key >= 1]
        queries = torch.arange(logits.shape[2])
        keys = torch.arange(1, logits.shape[3] + 1)
        context = (keys[None, :] <= queries[:, None]).float()  # [query, key >= 1]: keys 1..q
        context_mean = (logits * context).sum(-1) / queries.clamp(min=1).float()
        attended = (A * logits).sum(-1)
        mass = A.sum(-1)
        self.rises[layer] = attended - mass * context_mean  # [batch, head, query]
        self.mass[layer] += mass.double().sum((0, 2))

    def on_post_scale(self, layer: int, scale: torch.Tensor) -> None:
        self.post_scales[layer] = scale.float().cpu()[..., 0]  # [batch, pos]

    def on_final_scale(self, scale: torch.Tensor) -> None:
        final = scale.float().cpu()[..., 0]  # [batch, pos]
        for layer, rise in self.rises.items():
            divisor = final * self.post_scales[layer] if layer in self.post_scales else final
            self.numerator[layer] += (rise / divisor[:, None, :]).double().sum((0, 2))
        self.rises.clear()
        self.post_scales.clear()

    def finish(self) -> np.ndarray:
        """``[layer, head]`` direct copying score (NaN for a head that never attended past position 0)."""
        return torch.where(self.mass > 0, self.numerator / self.mass.clamp(min=1e-300), torch.nan).numpy()
