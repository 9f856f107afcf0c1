"""Per-head weights as analysis reads them: KV heads expanded to query heads, layer norms folded in.

TransformerLens 4 bridges hold the raw Hugging Face weights unless
``process_weights()`` / ``enable_compatibility_mode()`` was called, and the
model is shared between browser sessions, so nothing here modifies it: every
function returns folded copies.

* Grouped-query attention: query head ``h`` reads key/value head
  ``h // (n_heads // n_kv_heads)``, as ``TransformerBridge._expand_kv_heads`` does.
* Layer norm: a norm's gain (``ln1`` before a layer's attention, ``ln_final``
  before the unembedding) is multiplied into the weights that read its output;
  for LayerNorm (not RMSNorm) the reading and writing weights are also centred
  over ``d_model``, as ``process_weights(fold_ln=True, center_writing_weights=True)``
  does (Elhage et al. 2021 fold layer norms the same way).
"""


from typing import Any, Optional

import torch
from jaxtyping import Float

from headvis_core.errors import InputError


def expand_kv_heads(w: Float[torch.Tensor, "layer kv_head ..."],
                    n_heads: int) -> Float[torch.Tensor, "layer head ..."]:
    """``[layer, kv_head, ...]`` -> ``[layer, head, ...]``: query head ``h`` reads KV head ``h // group``."""
    n_kv = w.shape[1]
    if n_kv == n_heads:
        return w
    if n_heads % n_kv:
        raise InputError(f"{n_heads} query heads cannot share {n_kv} key/value heads evenly.")
    return w.repeat_interleave(n_heads // n_kv, dim=1)


def norm_module(component: Any) -> Any:
    """The HF norm module inside a bridge component.

    Call this one, never the bridge wrapper: the bridge's ln1 carries a pre-hook that stores its input on the
    attention module (for the next forward), and given an ``nn.Parameter`` it even registers it there.
    """
    original = getattr(component, "original_component", None)
    return component if original is None else original


def is_layer_norm(module: Any) -> bool:
    """LayerNorm (centres, then scales) rather than RMSNorm (scales only)."""
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.lower().endswith("layernorm")


def norm_eps(module: Any) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 1e-5


def norm_weight(module: Any, d_model: int) -> Float[torch.Tensor, " d_model"]:
    """The norm's gain in float64 on the CPU (ones where the module has none)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return torch.ones(d_model, dtype=torch.float64)
    return weight.detach().double().cpu()


def normalised_rows(x: Float[torch.Tensor, "n d_model"], layer_norm: bool,
                    eps: float) -> Float[torch.Tensor, "n d_model"]:
    """Rows of ``x`` centred (LayerNorm only) and divided by their RMS / standard deviation."""
    if layer_norm:
        x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def ln1_gains(model: Any) -> Optional[Float[torch.Tensor, "layer d_model"]]:
    """Effective ``ln1`` gains of every block, or ``None`` when a block has no readable ``ln1``.

    Gemma-style RMSNorms scale by ``1 + weight`` (``cfg.rmsnorm_uses_offset``).
    """
    uses_offset = bool(getattr(model.cfg, "rmsnorm_uses_offset", False))
    scales = []
    for block in model.blocks:
        module = norm_module(getattr(block, "ln1", None))
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 1:
            return None
        weight = weight.detach().float()
        scales.append(weight + 1.0 if uses_offset else weight)
    return torch.stack(scales)


def post_attention_norm_gains(model: Any) -> Optional[Float[torch.Tensor, "layer d_model"]]:
    """Gains of the norm that the attention output passes before it joins the residual stream
    (``ln1_post``, Gemma 2/3; ``1 + weight`` for Gemma-style norms), or ``None`` where there is none."""
    gains = []
    for block in model.blocks:
        norm = block._modules.get("ln1_post")
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 1:
            return None
        offset = getattr(norm, "uses_weight_offset", None)
        if offset is None:
            offset = bool(getattr(model.cfg, "rmsnorm_uses_offset", False))
        gain = weight.detach().float()
        gains.append(gain + 1.0 if offset else gain)
    return torch.stack(gains)


def qk_norm_gains(model: Any) -> Optional[tuple[Float[torch.Tensor, "layer d_head"],
                                                  Float[torch.Tensor, "layer d_head"]]]:
    """Effective gains of the query and key norms (QK-norm, as in Gemma 3), or ``None`` where the model
    has none (or per-head ones this folding does not handle).

    QK-norm rescales each head's query and key by a gain over ``d_head`` (``1 + weight`` for Gemma-style
    norms) after dividing them by their own per-token RMS. The gain is a fixed linear map and folds into
    ``W_Q``/``W_K``; the per-token division does not (see :func:`headvis_core.circuits.composition.head_weights`).
    """
    d_head = int(model.cfg.d_head)
    per_layer: dict[str, list[torch.Tensor]] = {"q": [], "k": []}
    for block in model.blocks:
        attn = block.attn
        per_head = getattr(attn, "_qk_norm_per_head", False)
        if per_head or getattr(attn, "_qk_norm_phase", "post_reshape") != "post_reshape":
            return None
        for side in ("q", "k"):
            norm = attn._modules.get(f"{side}_norm")
            weight = getattr(norm, "weight", None)
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (d_head,):
                return None
            offset = getattr(norm, "uses_weight_offset", None)
            if offset is None:
                offset = bool(getattr(model.cfg, "rmsnorm_uses_offset", False))
            gain = weight.detach().float()
            per_layer[side].append(gain + 1.0 if offset else gain)
    return torch.stack(per_layer["q"]), torch.stack(per_layer["k"])


def fold_ln1(W_Q: Float[torch.Tensor, "layer head d_model d_head"],
             W_K: Float[torch.Tensor, "layer head d_model d_head"],
             W_V: Float[torch.Tensor, "layer head d_model d_head"],
             W_O: Float[torch.Tensor, "layer head d_head d_model"],
             gains: Float[torch.Tensor, "layer d_model"], layer_norm: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ln1`` gains multiplied into the reading weights; for LayerNorm, reading and writing weights centred."""
    gain = gains.to(W_Q.dtype)[:, None, :, None]  # [layer, 1, d_model, 1]
    W_Q, W_K, W_V = W_Q * gain, W_K * gain, W_V * gain
    if layer_norm:
        W_Q, W_K, W_V = (w - w.mean(dim=2, keepdim=True) for w in (W_Q, W_K, W_V))
        W_O = W_O - W_O.mean(dim=-1, keepdim=True)
    return W_Q, W_K, W_V, W_O


def effective_unembedding(model: Any,
                          token_ids: Optional[torch.Tensor] = None) -> Float[torch.Tensor, "d_model n_tokens"]:
    """``W_U`` with the final norm's gain folded in (centred over ``d_model`` for LayerNorm), float64.

    The gain is the norm's weight, or ``1 + weight`` for Gemma-style RMSNorms (``cfg.rmsnorm_uses_offset``).
    """
    ln_final = norm_module(model.ln_final)
    W_U = model.W_U.detach()
    W_U = (W_U if token_ids is None else W_U[:, token_ids]).double().cpu()
    gain = norm_weight(ln_final, W_U.shape[0])
    if getattr(model.cfg, "rmsnorm_uses_offset", False):
        gain = gain + 1.0
    U = gain[:, None] * W_U
    return U - U.mean(0, keepdim=True) if is_layer_norm(ln_final) else U


def effective_embedding(model: Any, layer: int,
                        token_ids: Optional[torch.Tensor] = None) -> Float[torch.Tensor, "n_tokens d_model"]:
    """Embeddings as layer ``layer``'s attention reads them (through ``ln1``, without its bias), float64."""
    W_E = model.W_E.detach()
    W_E = (W_E if token_ids is None else W_E[token_ids]).double().cpu()
    ln1 = norm_module(model.blocks[layer].ln1)
    return normalised_rows(W_E, is_layer_norm(ln1), norm_eps(ln1)) * norm_weight(ln1, W_E.shape[1])
