"""Attribution of one attention edge (head, query position, key position): the public entry point.

:func:`attribute_edges` explains any number of edges on one prompt from ONE forward pass (the
hooks of :func:`headvis_core.attribution.components.edge_hook_names`) plus tensor algebra;
:func:`attribute_edge` is the single-edge form. Each result holds

* the QK side (:mod:`headvis_core.attribution.qk`): the full term table, the query- and key-side
  marginals and the top pairs, whose sum is the model's own pre-softmax score;
* the OV side (:mod:`headvis_core.attribution.ov`): the value-side terms of what the edge writes,
  the tokens it says directly and how much each later head reads it;
* optionally a sparse dictionary's features on the query side, the key side or both
  (:mod:`headvis_core.attribution.sae`).

Positions index the model's tokens, BOS included where the model prepends one.
"""


import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
import torch
from jaxtyping import Int

from headvis_core.attribution.components import (
    EdgeActivations,
    capture_edge_activations,
    residual_components,
)
from headvis_core.attribution.ov import OVAttribution, ov_attribution
from headvis_core.attribution.qk import QKTerms, check_linear_scores, offset_profile, qk_terms
from headvis_core.attribution.sae import CONFIG_FILE, WEIGHTS_FILE, SparseDictionary, check_sae
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.progress import ProgressCallback, report

SAE_SIDES = ("query", "key", "both")
TOP_PAIRS = 20
TOP_TOKENS = 10
MASKED_SCORE = -1e30  # masked scores are -inf or the dtype's minimum


@dataclass(frozen=True)
class EdgeSpec:
    head: HeadRef
    query: int
    key: int

    def __str__(self) -> str:
        return f"{self.head} q{self.query}\u2192k{self.key}"


@dataclass
class EdgeAttribution:
    edge: EdgeSpec
    token_ids: list[int]
    tokens: list[str]
    qk: QKTerms
    ov: OVAttribution
    top_tokens: pd.DataFrame
    offsets: Optional[pd.DataFrame] = None  # RoPE models: the score of the same content at each offset
    sae_side: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        """The model's own pre-softmax score."""
        return self.qk.score

    @property
    def pattern(self) -> float:
        return self.ov.pattern

    def query_side(self) -> pd.DataFrame:
        return self.qk.query_side()

    def key_side(self) -> pd.DataFrame:
        return self.qk.key_side()

    def top_pairs(self, n: int = TOP_PAIRS) -> pd.DataFrame:
        return self.qk.top_pairs(n)

    def value_side(self) -> pd.DataFrame:
        return self.ov.value_side()

    def summary(self) -> str:
        q_top = self.query_side().iloc[0]
        k_top = self.key_side().iloc[0]
        return (f"head {self.edge.head}, query {self.edge.query} {self.tokens[self.edge.query]!r} -> key "
                f"{self.edge.key} {self.tokens[self.edge.key]!r}: score {self.score:.4f} (attention "
                f"{self.pattern:.3f}); top query-side {q_top.component} ({q_top.value:+.3f}), top key-side "
                f"{k_top.component} ({k_top.value:+.3f})")

    def as_json(self, top_readers: int = 20) -> dict[str, Any]:
        """The CLI's JSON: tokens, score, qk_terms, query_side, key_side, ov_value_side, ov_top_tokens..."""
        def records(frame: pd.DataFrame, columns: Sequence[str]) -> list[dict[str, Any]]:
            return [{c: (v.item() if hasattr(v, "item") else v) for c, v in zip(columns, row)}
                    for row in frame[list(columns)].itertuples(index=False)]

        return {
            "head": str(self.edge.head), "query": self.edge.query, "key": self.edge.key,
            "tokens": self.tokens, "token_ids": self.token_ids,
            "score": self.score, "reconstructed_score": self.qk.reconstructed, "pattern": self.pattern,
            "qk_terms": records(self.qk.table(), ["query_component", "key_component", "value"]),
            "query_side": records(self.query_side(), ["component", "label", "value"]),
            "key_side": records(self.key_side(), ["component", "label", "value"]),
            "query_by_kind": records(self.qk.by_kind("query"), ["kind", "value"]),
            "key_by_kind": records(self.qk.by_kind("key"), ["kind", "value"]),
            "top_pairs": records(self.top_pairs(), ["query_component", "key_component", "value"]),
            "ov_value_side": records(self.value_side(), ["component", "label", "value", "norm"]),
            "ov_norm": float(self.ov.total.norm()),
            "ov_top_tokens": records(self.top_tokens, ["token", "token_id", "logit"]),
            "ov_readers": records(self.ov.readers.head(top_readers), ["reader", "kind", "share"]),
            "offset_profile": None if self.offsets is None else records(self.offsets, ["offset", "score"]),
            "sae_side": self.sae_side, "notes": self.notes,
        }


def check_edge(edge: EdgeSpec, n_layers: int, n_heads: int, n_tokens: int, sliding_window: Optional[int] = None,
               ) -> None:
    """Refuse an edge the model never computes, with a message saying why."""
    edge.head.check(n_layers, n_heads)
    for name, position in (("query", edge.query), ("key", edge.key)):
        if not 0 <= position < n_tokens:
            raise InputError(f"The {name} position {position} is out of range: the prompt has {n_tokens} tokens "
                             f"(positions 0-{n_tokens - 1}, BOS included).")
    if edge.key > edge.query:
        raise InputError(f"The key position {edge.key} comes after the query position {edge.query}: a causal model "
                         "masks that pair, so there is no score to explain. Choose key <= query.")
    if sliding_window and edge.query - edge.key >= sliding_window:
        raise InputError(f"Layer {edge.head.layer} attends only to the last {sliding_window} positions (sliding "
                         f"window), so key {edge.key} is masked for query {edge.query}.")


def sliding_window(model: Any, layer: int) -> Optional[int]:
    """The layer's sliding window (Gemma 2/3, Mistral local layers), or ``None`` for full attention."""
    window = getattr(model.blocks[layer].attn.original_component, "sliding_window", None)
    return int(window) if window else None


def parse_sae_side(side: Optional[str]) -> str:
    side = (side or "both").strip().lower()
    if side not in SAE_SIDES:
        raise InputError(f"The SAE side must be one of {', '.join(SAE_SIDES)}, not {side!r}.")
    return side


def attribute_edges(model: Any, tokens: Int[torch.Tensor, "1 pos"], edges: Sequence[EdgeSpec],
                    sae: Optional[SparseDictionary] = None, sae_side: str = "both",
                    acts: Optional[EdgeActivations] = None,
                    progress: Optional[ProgressCallback] = None) -> list[EdgeAttribution]:
    """Attribute every edge in ``edges`` on the prompt ``tokens`` (``[1, pos]``) with one forward pass.

    ``sae``: a dictionary on the stream entering the heads' layer replaces the model's components on
    ``sae_side`` ("query", "key" or "both"). ``acts``: a capture to reuse (from
    :func:`capture_edge_activations`). Bad input raises :class:`InputError` before any pass.
    """
    if not edges:
        raise InputError("No edge to attribute: give a head, a query position and a key position.")
    sae_side = parse_sae_side(sae_side)
    n_tokens = int(tokens.shape[-1])
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if n_tokens > int(model.cfg.n_ctx):
        raise InputError(f"The prompt is {n_tokens} tokens long, over the model's context of {model.cfg.n_ctx}.")
    for edge in edges:
        edge.head.check(n_layers, n_heads)  # before the layer's sliding window is looked up
        check_edge(edge, n_layers, n_heads, n_tokens, sliding_window(model, edge.head.layer))
        check_linear_scores(model, edge.head.layer)
        if sae is not None:
            check_sae(sae, model, edge.head.layer)
    layers = sorted({edge.head.layer for edge in edges})
    report(progress, 0.05, "forward pass")
    if acts is None:
        acts = capture_edge_activations(model, tokens, layers)
    report(progress, 0.5, "attributing")
    components: dict[tuple[int, int, str], Any] = {}

    def side_components(layer: int, position: int, side: str):
        """The model's components at ``position``, or the dictionary's where it replaces this side."""
        use_sae = sae is not None and sae_side in (side, "both")
        cache_key = (layer, position, "sae" if use_sae else "model")
        if cache_key not in components:
            if use_sae:
                stream = acts[f"blocks.{layer}.hook_resid_pre"][position]
                components[cache_key] = sae.components(stream, position, layer)
            else:
                components[cache_key] = residual_components(model, acts, layer, position)
        return components[cache_key]

    results = []
    for index, edge in enumerate(edges):
        layer, head = edge.head.layer, edge.head.head
        query = side_components(layer, edge.query, "query")
        key = side_components(layer, edge.key, "key")
        terms = qk_terms(model, acts, query, key, layer, head)
        if not math.isfinite(terms.score) or terms.score < MASKED_SCORE:
            raise InputError(f"Head {edge.head} masks key {edge.key} for query {edge.query}, so the edge has no score.")
        key_model = side_components(layer, edge.key, "value")  # the value side keeps model components
        ov = ov_attribution(model, acts, key_model, layer, head, edge.query)
        notes = []
        if terms.relative_error > 1e-3 and abs(terms.score) > 1e-3:
            dtype = str(getattr(model.cfg, "dtype", "float32")).replace("torch.", "")
            why = (f"the model runs in {dtype}, so its own score is rounded" if dtype in ("bfloat16", "float16")
                   else "this architecture computes its score in a way the attribution does not model exactly")
            notes.append(f"The terms sum to {terms.reconstructed:.6g}, not the model's {terms.score:.6g}: {why}.")
        offsets = offset_profile(model, acts, query, key, layer, head)
        results.append(EdgeAttribution(edge=edge, token_ids=acts.token_ids, tokens=acts.str_tokens, qk=terms, ov=ov,
                                       top_tokens=ov.top_tokens(model, TOP_TOKENS), offsets=offsets,
                                       sae_side=sae_side if sae is not None else None, notes=notes))
        report(progress, 0.5 + 0.5 * (index + 1) / len(edges), f"edge {edge}")
    return results


def attribute_edge(model: Any, tokens: Int[torch.Tensor, "1 pos"], head: HeadRef, query_pos: int, key_pos: int,
                   sae: Optional[SparseDictionary] = None, sae_side: str = "both",
                   progress: Optional[ProgressCallback] = None) -> EdgeAttribution:
    """Attribute one edge: see :func:`attribute_edges`."""
    return attribute_edges(model, tokens, [EdgeSpec(head, int(query_pos), int(key_pos))], sae=sae,
                           sae_side=sae_side, progress=progress)[0]


def attribution_inputs(tokens: torch.Tensor, edges: Sequence[EdgeSpec], sae: Optional[SparseDictionary] = None,
                       sae_side: str = "both") -> dict[str, Any]:
    """What an edge attribution depends on besides the model, for the result store
    (``headvis_core.store.cached(kinds.ATTRIBUTION, ...)``): the token ids, the edges and the
    dictionary, named by its folder and its files' sizes and modification times."""
    dictionary = None
    if sae is not None:
        folder = Path(sae.path).resolve()
        files = [folder / name for name in (CONFIG_FILE, WEIGHTS_FILE)]
        dictionary = [str(folder), [[f.stat().st_size, f.stat().st_mtime_ns] for f in files], sae_side]
    return {"token_ids": [int(t) for t in tokens.reshape(-1).tolist()],
            "edges": [[str(e.head), int(e.query), int(e.key)] for e in edges], "sae": dictionary}


def attribution_link(text: str, edge: EdgeSpec, sae_dir: str = "", sae_side: str = "both") -> dict[str, Any]:
    """The Edge attribution page's URL for this edge (its widgets are bound to these parameters)."""
    query: dict[str, Any] = {"prompt": text, "layer": edge.head.layer, "head": edge.head.head, "q": edge.query,
                             "k": edge.key}
    if sae_dir:
        query.update(sae=sae_dir, sae_side=sae_side)
    return {"page": "pages/7_Edge_attribution.py", "query": query}


def attribution_link_for_window(model: Any, token_ids: Sequence[int], edge: EdgeSpec) -> Optional[dict[str, Any]]:
    """The Edge attribution page's URL for an edge of a corpus window (a scan example), or ``None``.

    The page takes text, so the window (its position 0 being BOS) is decoded and must tokenize back to
    the very same ids for the positions to mean the same tokens; a window cut inside a word often does not.
    """
    ids = [int(t) for t in token_ids]
    text = model.tokenizer.decode(ids[1:])
    if not text.strip() or model.to_tokens(text)[0].tolist() != ids:
        return None
    return attribution_link(text, edge)


def save_json(result: EdgeAttribution, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result.as_json(), indent=1, ensure_ascii=False), encoding="utf-8")
    return path
