"""The residual stream entering a layer, at one position, as a sum of labelled components.

After ``L`` layers the residual stream at position ``p`` is exactly

    embed[p] + pos_embed[p] + sum_{l<L} ( sum_h z_{l,h}[p] W_O^{l,h} + b_O^l ) + sum_{l<L} mlp_out_l[p]

(Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits", section 2: the residual
stream is a sum of what every earlier component wrote). Each head's write is its own ``hook_z``
times its slice of ``W_O``, the way the workbench ablates heads. Gemma 2/3 put a norm
(``ln1_post``) on the attention output before it joins the stream; its scale is frozen at its value
on the prompt (see :mod:`headvis_core.attribution.linearise`), so each head's write is
``z W_O / s * w`` and the sum is still exact. All output biases go into one ``bias`` component.

Every activation needed by an edge attribution, for any number of edges on one prompt, comes from
ONE forward pass (:func:`capture_edge_activations`) with just the hooks listed by
:func:`edge_hook_names`.
"""


from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from jaxtyping import Float

from headvis_core.attribution.linearise import frozen_norm
from headvis_core.hooks import capture
from headvis_core.tokens import visible

BIAS = "bias"


def optional_parameter(module: Any, name: str) -> Optional[torch.Tensor]:
    """A weight or bias of a bridge component as float64, or ``None`` where the checkpoint has none."""
    try:
        value = getattr(module, name)
    except AttributeError:  # bias-free projections raise instead of returning None
        return None
    return value.detach().double() if isinstance(value, torch.Tensor) else None


def has_submodule(module: Any, name: str) -> bool:
    return name in getattr(module, "_modules", {}) and module._modules[name] is not None


def uses_learned_positions(model: Any) -> bool:
    return str(getattr(model.cfg, "positional_embedding_type", "")) == "standard"


def edge_hook_names(model: Any, edge_layers: Iterable[int]) -> list[str]:
    """The hooks one pass must capture to attribute edges of heads in ``edge_layers``.

    Every layer: the heads' ``hook_z`` and ``hook_pattern`` (components and their labels), the MLP
    output, ``ln1``'s scale and the Q/K/V inputs (how later heads read an edge); the edge layers also
    give their pre-softmax scores, RoPE cos/sin and QK-norm scales; plus the final norm's scale.
    """
    names = ["hook_embed", "ln_final.hook_scale"]
    if uses_learned_positions(model):
        names.append("hook_pos_embed")
    edge_layers = set(edge_layers)
    for layer, block in enumerate(model.blocks):
        prefix = f"blocks.{layer}"
        names += [f"{prefix}.attn.hook_z", f"{prefix}.attn.hook_pattern", f"{prefix}.hook_mlp_out",
                  f"{prefix}.ln1.hook_scale", f"{prefix}.attn.hook_q", f"{prefix}.attn.hook_k",
                  f"{prefix}.attn.hook_v"]
        if has_submodule(block, "ln1_post"):
            names.append(f"{prefix}.ln1_post.hook_scale")
        if layer in edge_layers:
            names += [f"{prefix}.hook_resid_pre", f"{prefix}.attn.hook_attn_scores", f"{prefix}.hook_attn_out"]
            for optional in ("attn.hook_cos", "attn.hook_sin", "attn.q_norm.hook_scale", "attn.k_norm.hook_scale"):
                if f"{prefix}.{optional}" in model.hook_dict:
                    names.append(f"{prefix}.{optional}")
    return names


@dataclass
class EdgeActivations:
    """What one forward pass captured, batch dimension dropped: ``acts[hook_name]``.

    It also keeps the float64 copies of the attention weights the algebra uses
    (:meth:`attention_parameter`), made once per batch of edges rather than once per edge.
    """

    token_ids: list[int]
    str_tokens: list[str]
    acts: dict[str, torch.Tensor]
    _parameters: dict[tuple[int, str], Optional[torch.Tensor]] = field(default_factory=dict, repr=False)

    def attention_parameter(self, model: Any, layer: int, name: str) -> Optional[torch.Tensor]:
        """``W_Q``, ``b_Q``, ``W_O``... of ``layer``'s attention in float64 (``None`` where absent)."""
        key = (layer, name)
        if key not in self._parameters:
            self._parameters[key] = optional_parameter(model.blocks[layer].attn, name)
        return self._parameters[key]

    def stacked_parameter(self, model: Any, name: str) -> torch.Tensor:
        """``name`` (a weight every layer has, e.g. ``W_O``) of all layers stacked, float64: ``[layer, ...]``."""
        key = (-2, name)
        if key not in self._parameters:
            self._parameters[key] = torch.stack([getattr(block.attn, name).detach().double()
                                                 for block in model.blocks])
        return self._parameters[key]

    def stacked_reader(self, model: Any, name: str) -> torch.Tensor:
        """``W_Q``/``W_K``/``W_V`` of all layers as float32 ``[layer, d_model, head * d_head]``, so that one
        batched matmul reads a residual vector into every head of every layer (float32: the shares
        it feeds are ratios shown to 2-3 digits, and it halves the memory)."""
        key = (-3, name)
        if key not in self._parameters:
            self._parameters[key] = torch.stack([getattr(block.attn, name).detach().float().permute(1, 0, 2)
                                                 .reshape(int(model.cfg.d_model), -1) for block in model.blocks])
        return self._parameters[key]

    def unembedding(self, model: Any) -> torch.Tensor:
        """``W_U`` in float32 (kept once: the bridge builds it on each access)."""
        key = (-1, "W_U")
        if key not in self._parameters:
            self._parameters[key] = model.W_U.detach().float()
        return self._parameters[key]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.acts[name]

    def __contains__(self, name: str) -> bool:
        return name in self.acts

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def capture_edge_activations(model: Any, tokens: torch.Tensor, edge_layers: Iterable[int]) -> EdgeActivations:
    """One hooked forward pass of ``tokens`` (``[1, pos]`` or ``[pos]``) through ``headvis_core.hooks``."""
    tokens = tokens.reshape(1, -1).to(model.cfg.device)
    _, acts = capture(model, tokens, edge_hook_names(model, edge_layers))
    ids = tokens[0].tolist()
    return EdgeActivations(token_ids=ids, str_tokens=list(model.to_str_tokens(tokens[0])),
                           acts={name: value[0] for name, value in acts.items()})


@dataclass
class Components:
    """Residual-stream components at one position: ``vectors.sum(0)`` is the stream.

    ``names`` are the stable identifiers (``embed``, ``pos_embed``, ``L3H1``, ``L3MLP``, ``bias``,
    ``F12`` and ``error`` for a dictionary); ``labels`` say more (the token, or the token a head
    mostly attended to). The ``bias`` row is also where later biases (a norm's, ``b_Q``...) go.
    """

    names: list[str]
    labels: list[str]
    vectors: Float[torch.Tensor, "component d_model"]
    position: int
    layer: int
    reconstruction_error: float  # max |sum of components - the model's own residual stream|

    @property
    def bias_index(self) -> int:
        return self.names.index(BIAS)


def post_attention_norm(model: Any, acts: EdgeActivations, layer: int, position: int):
    block = model.blocks[layer]
    if not has_submodule(block, "ln1_post"):
        return None
    return frozen_norm(block.ln1_post, acts[f"blocks.{layer}.ln1_post.hook_scale"][position])


def head_writes(model: Any, acts: EdgeActivations, layers: int,
                position: int) -> tuple[Float[torch.Tensor, "layer head d_model"], torch.Tensor]:
    """Each head of layers ``0..layers-1``: its write into the stream at ``position``, and the sum of
    those layers' output biases (post-attention norm frozen and applied where the model has one)."""
    d_model = int(model.cfg.d_model)
    bias = torch.zeros(d_model, dtype=torch.float64)
    if layers == 0:
        return torch.zeros(0, int(model.cfg.n_heads), d_model, dtype=torch.float64), bias
    # to one device: under a device_map split each layer's activations live on its own device
    z = torch.stack([acts[f"blocks.{layer}.attn.hook_z"][position].to(model.cfg.device)
                     for layer in range(layers)]).double()
    W_O = acts.stacked_parameter(model, "W_O")[:layers]  # [layer, head, d_head, d_model]
    n_heads, d_head = W_O.shape[1], W_O.shape[2]
    # per layer and head z_h @ W_O[h], as one batched matmul over layers of [head, head*d_head] blocks
    block = torch.zeros(layers, n_heads, n_heads * d_head, dtype=torch.float64)
    for head in range(n_heads):
        block[:, head, head * d_head:(head + 1) * d_head] = z[:, head]
    writes = torch.bmm(block, W_O.reshape(layers, n_heads * d_head, d_model))
    for layer in range(layers):
        layer_bias = acts.attention_parameter(model, layer, "b_O")
        post = post_attention_norm(model, acts, layer, position)
        if post is not None:
            writes[layer] = post.apply(writes[layer])
            layer_bias = post.apply(layer_bias) if layer_bias is not None else None
            if post.bias is not None:
                layer_bias = post.bias if layer_bias is None else layer_bias + post.bias
        if layer_bias is not None:
            bias = bias + layer_bias
    return writes, bias


def residual_components(model: Any, acts: EdgeActivations, layer: int, position: int) -> Components:
    """The stream entering ``layer`` at ``position`` as embed, pos_embed, every earlier head, every
    earlier MLP and one bias, checked against ``blocks.{layer}.hook_resid_pre``."""
    tokens = acts.str_tokens
    names = ["embed"]
    labels = [f"embed {visible(tokens[position])!r}"]
    rows = [acts["hook_embed"][position].double()]
    if "hook_pos_embed" in acts:
        names.append("pos_embed")
        labels.append(f"pos_embed {position}")
        rows.append(acts["hook_pos_embed"][position].double())
    writes, bias = head_writes(model, acts, layer, position)
    for earlier in range(layer):
        pattern = acts[f"blocks.{earlier}.attn.hook_pattern"][:, position, :position + 1]  # [head, key]
        attended = pattern.argmax(dim=-1).tolist()
        for head, key in enumerate(attended):
            names.append(f"L{earlier}H{head}")
            labels.append(f"L{earlier}H{head} \u2192 {visible(tokens[key])!r}@{key}")
        rows.extend(writes[earlier])
        names.append(f"L{earlier}MLP")
        labels.append(f"L{earlier}MLP")
        rows.append(acts[f"blocks.{earlier}.hook_mlp_out"][position].double())
    names.append(BIAS)
    labels.append(BIAS)
    rows.append(bias)
    vectors = torch.stack(rows)
    error = float("nan")
    resid_name = f"blocks.{layer}.hook_resid_pre"
    if resid_name in acts:
        error = float((vectors.sum(0) - acts[resid_name][position].double()).abs().max())
    return Components(names=names, labels=labels, vectors=vectors, position=position, layer=layer,
                      reconstruction_error=error)
