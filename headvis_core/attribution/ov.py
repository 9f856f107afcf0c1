"""OV attribution: what a head moves along one edge, and where it goes.

The head's output at the query position is ``sum_k A[q, k] v_k W_O`` (Elhage et al. 2021, "A
Mathematical Framework for Transformer Circuits": the OV circuit), so one edge ``(q, k)``
contributes ``e = A[q, k] v_k W_O`` to the residual stream (through the frozen post-attention norm
on Gemma 2/3). With ``ln1`` frozen at the key position, ``v_k`` is a sum over the key position's
components, so ``e`` is too (**value side**): each term is reported as its projection on ``e``
(the projections sum to ``|e|``) and its norm.

**Output side:**

* direct logit effect: ``e`` through the final norm frozen at the query position and ``W_U``
  (direct logit attribution, Elhage et al. 2021; before any final logit soft-cap): the tokens the
  edge says;
* reading by later heads: for each later head ``B`` and each of its inputs Q, K, V, the share
  ``|LN_B(e) W_X^B| / |x_B|`` where ``LN_B`` is B's ``ln1`` frozen at the query position and
  ``x_B`` the head's own (pre-RoPE) query, key or value there (``hook_q/k/v``): how large this
  edge's part is in what B reads from that position. It is the per-prompt counterpart of the Q/K/V
  composition scores of :mod:`headvis_core.circuits.composition`.
"""


from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float

from headvis_core.attribution.components import (
    Components,
    EdgeActivations,
    post_attention_norm,
)
from headvis_core.attribution.linearise import frozen_norm
from headvis_core.attribution.qk import kv_head
from headvis_core.tokens import visible


def value_vectors(model: Any, acts: EdgeActivations, key: Components, layer: int,
                  head: int) -> Float[torch.Tensor, "component d_head"]:
    """Each key-side component's part of the head's value vector ``v_k`` (biases in the bias row)."""
    block = model.blocks[layer]
    ln = frozen_norm(block.ln1, acts[f"blocks.{layer}.ln1.hook_scale"][key.position])
    rows = ln.apply(key.vectors)
    if ln.bias is not None:
        rows[key.bias_index] += ln.bias
    index = kv_head(model, head)
    out = rows @ acts.attention_parameter(model, layer, "W_V")[index]
    bias = acts.attention_parameter(model, layer, "b_V")
    if bias is not None:
        out[key.bias_index] += bias[index]
    return out


def edge_writes(model: Any, acts: EdgeActivations, key: Components, layer: int, head: int,
                query_position: int) -> Float[torch.Tensor, "component d_model"]:
    """``A[q, k] v_k W_O`` per key-side component, as written to the residual stream at the query."""
    pattern = float(acts[f"blocks.{layer}.attn.hook_pattern"][head, query_position, key.position])
    W_O = acts.attention_parameter(model, layer, "W_O")[head]
    writes = pattern * value_vectors(model, acts, key, layer, head) @ W_O
    post = post_attention_norm(model, acts, layer, query_position)
    return post.apply(writes) if post is not None else writes


@dataclass
class OVAttribution:
    """``writes[i]``: key-side component ``i``'s part of the edge's write; ``total = writes.sum(0)``."""

    key: Components
    writes: Float[torch.Tensor, "component d_model"]
    pattern: float
    logits: Float[torch.Tensor, " vocab"]  # direct effect of the total write on each token's logit
    readers: pd.DataFrame  # reader, layer, head, kind, share

    @property
    def total(self) -> torch.Tensor:
        return self.writes.sum(dim=0)

    def value_side(self) -> pd.DataFrame:
        """Per component: ``value`` = projection on the total write (sums to its norm) and ``norm``."""
        total = self.total
        length = float(total.norm())
        projection = self.writes @ total / max(length, 1e-30)
        frame = pd.DataFrame({"component": self.key.names, "label": self.key.labels,
                              "value": projection.tolist(), "norm": self.writes.norm(dim=-1).tolist()})
        return frame.iloc[frame["value"].abs().argsort()[::-1].to_numpy()].reset_index(drop=True)

    def top_tokens(self, model: Any, n: int = 10, largest: bool = True) -> pd.DataFrame:
        values, ids = self.logits.topk(min(n, self.logits.numel()), largest=largest)
        return pd.DataFrame({"token": [visible(model.to_single_str_token(int(i))) for i in ids],
                             "token_id": ids.tolist(), "logit": values.tolist()})


def direct_logits(model: Any, acts: EdgeActivations, write: Float[torch.Tensor, " d_model"],
                  query_position: int) -> Float[torch.Tensor, " vocab"]:
    """The write's direct effect on the logits at the query position (final norm frozen, no bias)."""
    ln = frozen_norm(model.ln_final, acts["ln_final.hook_scale"][query_position])
    return (ln.apply(write).float() @ acts.unembedding(model)).cpu()


def later_readers(model: Any, acts: EdgeActivations, write: Float[torch.Tensor, " d_model"], layer: int,
                  query_position: int) -> pd.DataFrame:
    """How much of each later head's Q, K and V input at the query position is this write."""
    n_layers, n_heads, d_head = int(model.cfg.n_layers), int(model.cfg.n_heads), int(model.cfg.d_head)
    later = list(range(layer + 1, n_layers))
    columns = ["reader", "layer", "head", "kind", "share"]
    if not later:
        return pd.DataFrame(columns=columns)
    # every later layer's ln1, frozen at the query position, applied to the write at once: [later, d_model]
    norms = [frozen_norm(model.blocks[b].ln1, acts[f"blocks.{b}.ln1.hook_scale"][query_position]) for b in later]
    normed = torch.stack([norm.apply(write) for norm in norms])
    kv_index = [kv_head(model, head) for head in range(n_heads)]
    frames = []
    for kind in ("q", "k", "v"):
        weight = acts.stacked_reader(model, f"W_{kind.upper()}")[layer + 1:]  # [later, d_model, head * d_head]
        part = torch.bmm(normed[:, None, :].float(), weight)[:, 0].unflatten(-1, (-1, d_head)).norm(dim=-1)
        whole = torch.stack([acts[f"blocks.{b}.attn.hook_{kind}"][query_position].to(model.cfg.device)
                             for b in later]).float()  # one device under a device_map split
        share = part / whole.norm(dim=-1).clamp_min(1e-30)
        if kind != "q":  # a query head reads the key/value head of its group
            share = share[:, kv_index]
        layers = torch.tensor(later).repeat_interleave(n_heads)
        heads = torch.arange(n_heads).repeat(len(later))
        frames.append(pd.DataFrame({"reader": [f"{b}.{h}" for b, h in zip(layers.tolist(), heads.tolist())],
                                    "layer": layers.numpy(), "head": heads.numpy(), "kind": kind,
                                    "share": share.flatten().double().numpy()}))
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values("share", ascending=False, kind="stable").reset_index(drop=True)


def ov_attribution(model: Any, acts: EdgeActivations, key: Components, layer: int, head: int,
                   query_position: int) -> OVAttribution:
    writes = edge_writes(model, acts, key, layer, head, query_position)
    total = writes.sum(dim=0)
    return OVAttribution(
        key=key, writes=writes,
        pattern=float(acts[f"blocks.{layer}.attn.hook_pattern"][head, query_position, key.position]),
        logits=direct_logits(model, acts, total, query_position),
        readers=later_readers(model, acts, total, layer, query_position))
