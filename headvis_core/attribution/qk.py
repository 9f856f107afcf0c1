"""QK attribution: a head's pre-softmax score as an exact sum of (query component, key component) terms.

With the norms frozen at their input (:mod:`headvis_core.attribution.linearise`), everything
between the residual stream and the score is linear per position: ``ln1``, ``W_Q``/``W_K``, a
QK-norm (Gemma 3, OLMo 2), RoPE. So the query vector is ``sum_i q_i`` over query-side components
and the key vector ``sum_j k_j`` over key-side components (each bias - of ``ln1``, of ``W_Q``, of
``W_O`` upstream - is carried by the ``bias`` component), and the score

    score = scaling * q . k = sum_{i,j} scaling * q_i . k_j

is exactly the model's ``hook_attn_scores`` value (pre-softmax; the bridge's attention classes fire
that hook before the softmax and after the causal/sliding mask). ``scaling`` is the model's own:
``1/sqrt(d_head)``, Gemma 3's ``query_pre_attn_scalar ** -0.5``, GPT-2's optional inverse-layer
factor. This is the QK half of HeadVis's edge attribution (Anthropic 2025, "HeadVis", QK
attribution ``(q_act . q_dec) W_Q^T W_K (k_dec . k_act)``) with model components or dictionary
features as the sides; the query- and key-side marginals are the rows and columns of the table.
"""


from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd
import torch
from jaxtyping import Float

from headvis_core.attribution.components import Components, EdgeActivations
from headvis_core.attribution.linearise import FrozenNorm, apply_rope, frozen_norm, rope_convention
from headvis_core.errors import UnsupportedArchitectureError


def kv_head(model: Any, head: int) -> int:
    """The key/value head query head ``head`` reads under grouped-query attention."""
    n_heads = int(model.cfg.n_heads)
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
    return head // (n_heads // n_kv)


def score_scaling(model: Any, layer: int) -> float:
    """The factor the model multiplies ``q . k`` by in ``layer`` (as the bridge's attention does)."""
    attn = model.blocks[layer].attn
    hf_attn = attn.original_component
    d_head = int(model.cfg.d_head)
    scaling = getattr(hf_attn, "scaling", None)
    if scaling is not None:
        return float(scaling)
    scaling = d_head ** -0.5
    if getattr(model.cfg, "scale_attn_by_inverse_layer_idx", False):
        scaling /= float(layer + 1)
    return scaling


def check_linear_scores(model: Any, layer: int) -> None:
    """Refuse attention whose score is not bilinear in the query and key (exactness would be lost)."""
    hf_attn = model.blocks[layer].attn.original_component
    if getattr(hf_attn, "attn_logit_softcapping", None) or (getattr(model.cfg, "attn_scores_soft_cap", None) or -1) > 0:
        raise UnsupportedArchitectureError("This model soft-caps its attention scores (tanh), so a score is not "
                                           "a sum of query/key terms; edge attribution does not support it.")
    if getattr(hf_attn, "key_multiplier", None) is not None or getattr(getattr(hf_attn, "config", None),
                                                                       "clip_qkv", None) is not None:
        raise UnsupportedArchitectureError("This model scales or clips Q/K inside attention; edge attribution "
                                           "does not support it.")
    if getattr(model.cfg, "qk_norm_after_rope", False):
        raise UnsupportedArchitectureError("This model normalises Q/K after RoPE; edge attribution does not "
                                           "support it.")
    rope_convention(model)


def _qk_norm(model: Any, acts: EdgeActivations, layer: int, side: str, head: int,
             position: int) -> FrozenNorm | None:
    """The frozen QK-norm of ``side`` ("q" or "k") for one (KV) head at one position, if any."""
    attn = model.blocks[layer].attn
    norm = attn._modules.get(f"{side}_norm")
    scale_name = f"blocks.{layer}.attn.{side}_norm.hook_scale"
    if norm is None or scale_name not in acts:
        return None
    scale = acts[scale_name]
    d_head = int(model.cfg.d_head)
    phase = getattr(attn, "_qk_norm_phase", "post_reshape")
    frozen = frozen_norm(norm, scale)
    weight, bias = frozen.weight, frozen.bias
    if phase == "pre_reshape":  # one norm over all heads' concatenated vectors: [pos, 1]
        part = slice(head * d_head, (head + 1) * d_head)
        return FrozenNorm(scale=scale[position].double(), weight=None if weight is None else weight[part],
                          bias=None if bias is None else bias[part], centre=False)
    if getattr(attn, "_qk_norm_per_head", False):  # normed as [pos, head, d_head], weight [head, d_head]
        return FrozenNorm(scale=scale[position, head].double(), weight=None if weight is None else weight[head],
                          bias=None if bias is None else bias[head], centre=frozen.centre)
    # normed as [head, pos, d_head] with one weight shared by the heads
    return FrozenNorm(scale=scale[head, position].double(), weight=weight, bias=bias, centre=frozen.centre)


def side_vectors(model: Any, acts: EdgeActivations, components: Components, layer: int, head: int,
                 side: str, rotate: bool = True) -> Float[torch.Tensor, "component d_head"]:
    """Each component's part of the head's final query (``side="q"``) or key (``"k"``) vector:
    after ``ln1`` (frozen), the projection, QK-norm (frozen) and RoPE (unless ``rotate=False``);
    biases in the ``bias`` row."""
    block = model.blocks[layer]
    position = components.position
    ln = frozen_norm(block.ln1, acts[f"blocks.{layer}.ln1.hook_scale"][position])
    vectors = ln.apply(components.vectors)
    bias_row = components.bias_index
    if ln.bias is not None:
        vectors[bias_row] += ln.bias
    index = head if side == "q" else kv_head(model, head)
    weight = acts.attention_parameter(model, layer, "W_Q" if side == "q" else "W_K")[index]
    out = vectors @ weight
    bias = acts.attention_parameter(model, layer, "b_Q" if side == "q" else "b_K")
    if bias is not None:
        out[bias_row] += bias[index]
    qk_norm = _qk_norm(model, acts, layer, side, index, position)
    if qk_norm is not None:
        out = qk_norm.apply(out)
        if qk_norm.bias is not None:
            out[bias_row] += qk_norm.bias
    cos_name = f"blocks.{layer}.attn.hook_cos"
    if rotate and cos_name in acts:
        cos, sin = acts[cos_name][position], acts[f"blocks.{layer}.attn.hook_sin"][position]
        out = apply_rope(out, cos, sin, full_rotation=_full_rotation(model, cos, out))
    return out


def _full_rotation(model: Any, cos: torch.Tensor, rows: torch.Tensor) -> bool:
    from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config

    return cos.shape[-1] * 2 == rows.shape[-1] and get_rotary_pct_from_config(model.cfg) == 1.0


def offset_profile(model: Any, acts: EdgeActivations, query: Components, key: Components, layer: int,
                   head: int) -> Optional[pd.DataFrame]:
    """On a RoPE model, the score this query/key content would get at every query-key offset.

    RoPE makes ``q_p . k_p'`` depend on the positions only through ``p - p'`` (Su et al. 2021), so
    with the unrotated query and key held fixed, ``score(d) = scaling * R_d q . k`` is the score
    the same content would get ``d`` positions apart. A positional head's preference shows up as a
    peak at its offset (1 for a previous-token head) that the content alone does not give
    (``d = 0``: no rotation at all). ``None`` on models without RoPE (their position information
    is the ``pos_embed`` component).
    """
    cos_name = f"blocks.{layer}.attn.hook_cos"
    if cos_name not in acts:
        return None
    q = side_vectors(model, acts, query, layer, head, "q", rotate=False).sum(dim=0)
    k = side_vectors(model, acts, key, layer, head, "k", rotate=False).sum(dim=0)
    cos_all, sin_all = acts[cos_name], acts[f"blocks.{layer}.attn.hook_sin"]
    full = _full_rotation(model, cos_all[0], q[None])
    k0 = apply_rope(k[None], cos_all[0], sin_all[0], full_rotation=full)[0]
    scaling = score_scaling(model, layer)
    offsets = range(query.position + 1)
    # row d: the query rotated as if d positions after the key (cos/sin of position d broadcast over rows)
    rotated = apply_rope(q.expand(len(offsets), -1), cos_all[:len(offsets)], sin_all[:len(offsets)],
                         full_rotation=full)
    scores = (rotated @ k0 * scaling).tolist()
    actual = query.position - key.position
    return pd.DataFrame({"offset": list(offsets), "score": scores, "actual": [d == actual for d in offsets]})


@dataclass
class QKTerms:
    """``terms[i, j] = scaling * q_i . k_j``; its sum is the pre-softmax score.

    ``score`` is the model's own value from ``hook_attn_scores``.
    """

    query: Components
    key: Components
    terms: Float[torch.Tensor, "query_component key_component"]
    score: float

    @property
    def reconstructed(self) -> float:
        return float(self.terms.sum())

    @property
    def relative_error(self) -> float:
        return abs(self.reconstructed - self.score) / max(abs(self.score), 1e-12)

    def query_side(self) -> pd.DataFrame:
        """Query-side marginals ``scaling * q_i . k`` (each query component against the whole key)."""
        return _marginal(self.query, self.terms.sum(dim=1))

    def key_side(self) -> pd.DataFrame:
        """Key-side marginals ``scaling * q . k_j``."""
        return _marginal(self.key, self.terms.sum(dim=0))

    def by_kind(self, side: str) -> pd.DataFrame:
        """A side's marginals summed by kind of component (token embedding, position embedding,
        attention heads, MLPs, biases, dictionary features, dictionary error), largest first."""
        frame = self.query_side() if side == "query" else self.key_side()
        kinds = frame.component.map(component_kind)
        summed = frame.groupby(kinds, sort=False)["value"].sum()
        out = pd.DataFrame({"kind": summed.index, "value": summed.to_numpy()})
        return _by_magnitude(out)

    def table(self) -> pd.DataFrame:
        """Every (query component, key component) term, largest magnitude first."""
        q_index, k_index = torch.meshgrid(torch.arange(self.terms.shape[0]), torch.arange(self.terms.shape[1]),
                                          indexing="ij")
        frame = pd.DataFrame({
            "query_component": [self.query.names[i] for i in q_index.flatten().tolist()],
            "key_component": [self.key.names[j] for j in k_index.flatten().tolist()],
            "value": self.terms.flatten().tolist(),
        })
        return _by_magnitude(frame)

    def top_pairs(self, n: int = 20) -> pd.DataFrame:
        flat = self.terms.flatten()
        order = flat.abs().argsort(descending=True)[:n].tolist()
        width = self.terms.shape[1]
        return pd.DataFrame({
            "query_component": [self.query.names[i // width] for i in order],
            "key_component": [self.key.names[i % width] for i in order],
            "query_label": [self.query.labels[i // width] for i in order],
            "key_label": [self.key.labels[i % width] for i in order],
            "value": [float(flat[i]) for i in order],
        })


def component_kind(name: str) -> str:
    """``embed`` -> token embedding, ``L3H1`` -> attention heads, ``L3MLP`` -> MLPs, ``F12`` ->
    dictionary features, and so on."""
    fixed = {"embed": "token embedding", "pos_embed": "position embedding", "bias": "biases",
             "error": "dictionary error"}
    if name in fixed:
        return fixed[name]
    if name.endswith("MLP"):
        return "MLPs"
    if name.startswith("F"):
        return "dictionary features"
    return "attention heads"


def _by_magnitude(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[frame["value"].abs().argsort()[::-1].to_numpy()].reset_index(drop=True)


def _marginal(components: Components, values: torch.Tensor) -> pd.DataFrame:
    frame = pd.DataFrame({"component": components.names, "label": components.labels, "value": values.tolist()})
    return _by_magnitude(frame)


def qk_terms(model: Any, acts: EdgeActivations, query: Components, key: Components, layer: int, head: int,
             ) -> QKTerms:
    """The full QK term table of head ``layer.head`` for the query/key positions of the components."""
    check_linear_scores(model, layer)
    q_rows = side_vectors(model, acts, query, layer, head, "q")
    k_rows = side_vectors(model, acts, key, layer, head, "k")
    terms = (q_rows @ k_rows.T) * score_scaling(model, layer)
    score = float(acts[f"blocks.{layer}.attn.hook_attn_scores"][head, query.position, key.position])
    return QKTerms(query=query, key=key, terms=terms, score=score)
