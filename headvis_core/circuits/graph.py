"""A circuit graph of attention heads: composition edges, roles and ablation importance.

Nodes are heads (``"layer.head"``), optionally the token embedding (``"embed"``) and the logits
(``"logits"``). Edges are weight-based composition (:mod:`headvis_core.circuits.composition`) with their
kind (``q``, ``k``, ``v``; ``out`` for head -> logits), score, ratio to the random baseline
("times above chance") and z-score, plus the path-patching effect where it was measured
(:mod:`headvis_core.circuits.path_patching`). Node attributes: layer, head, the atlas behaviour, the
published role (GPT-2 IOI, :mod:`headvis_core.circuits.published_roles`) and the ablation importance.

Exports: GraphML and node-link JSON; the standalone pyvis HTML page is drawn by
:mod:`headvis_core.viz.circuit_graph`.
"""

import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import networkx as nx
import numpy as np
import pandas as pd

from headvis_core.circuits.composition import KIND_NAMES, KINDS, CompositionResult, IOScores, suggest_threshold
from headvis_core.circuits.published_roles import PublishedRoles
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef

EMBED, LOGITS = "embed", "logits"
EDGE_KINDS = KINDS + ("out",)
MEASURES = {"ratio": "times above the random baseline", "z": "z-score above the random baseline",
            "score": "composition score"}
EDGE_KIND_NAMES = {**KIND_NAMES, "out": "direct path to the logits"}
DEFAULT_MAX_EDGES = 200


@dataclass(frozen=True)
class GraphFilter:
    """Which edges go into the graph.

    ``threshold`` applies to ``measure`` (``ratio``, ``z`` or ``score``); ``top_k`` keeps, for every
    node, its ``k`` strongest incoming and ``k`` strongest outgoing edges (an edge survives if
    either end keeps it); ``heads`` keeps only edges touching those heads (so: the heads and their
    neighbours); ``max_edges`` keeps the strongest edges overall.
    """

    kinds: tuple[str, ...] = KINDS
    measure: str = "ratio"
    threshold: Optional[float] = None
    top_k: Optional[int] = 3
    heads: tuple[HeadRef, ...] = ()
    max_edges: Optional[int] = DEFAULT_MAX_EDGES


def node_id(layer: int, head: int) -> str:
    return f"{layer}.{head}"


def normalise_role(role: Any) -> str:
    if role is None or (isinstance(role, float) and math.isnan(role)):
        return ""
    return " ".join(str(role).replace("-", " ").replace("_", " ").split()).strip()


def all_edges(result: CompositionResult, io: Optional[IOScores] = None) -> pd.DataFrame:
    """Every candidate edge: head -> head per kind, plus embed -> head and head -> logits with ``io``."""
    table = result.edges_table()
    frames = [table]
    if io is not None:
        layers, heads = np.meshgrid(np.arange(result.n_layers), np.arange(result.n_heads), indexing="ij")
        ids = [node_id(l, h) for l, h in zip(layers.ravel(), heads.ravel())]
        for kind, scores in io.embed.items():
            base = io.baselines[f"embed-{kind}"]
            s = scores.double().numpy().ravel()
            frames.append(pd.DataFrame({
                "sender": EMBED, "receiver": ids, "sender_layer": -1, "sender_head": -1,
                "receiver_layer": layers.ravel(), "receiver_head": heads.ravel(), "kind": kind,
                "score": s, "ratio": s / base.mean, "z": (s - base.mean) / base.std}))
        base = io.baselines["logits"]
        s = io.logits.double().numpy().ravel()
        frames.append(pd.DataFrame({
            "sender": ids, "receiver": LOGITS, "sender_layer": layers.ravel(), "sender_head": heads.ravel(),
            "receiver_layer": result.n_layers, "receiver_head": -1, "kind": "out",
            "score": s, "ratio": s / base.mean, "z": (s - base.mean) / base.std}))
    return pd.concat(frames, ignore_index=True)


def _top_k_per_node(edges: pd.DataFrame, measure: str, k: int, chosen: set[str]) -> pd.DataFrame:
    """Edges among the ``k`` strongest out of their sender or into their receiver; with ``chosen``
    heads, only those heads' rankings count (their ``k`` strongest in and out)."""
    out_rank = edges.groupby("sender")[measure].rank(method="first", ascending=False)
    in_rank = edges.groupby("receiver")[measure].rank(method="first", ascending=False)
    if chosen:
        kept_out = edges["sender"].isin(chosen) & (out_rank <= k)
        kept_in = edges["receiver"].isin(chosen) & (in_rank <= k)
        return edges[kept_out | kept_in]
    return edges[(out_rank <= k) | (in_rank <= k)]


def select_edges(edges: pd.DataFrame, flt: GraphFilter, n_layers: int, n_heads: int) -> pd.DataFrame:
    """Apply ``flt`` to a table from :func:`all_edges`; raise :class:`InputError` when nothing is left."""
    if flt.measure not in MEASURES:
        raise InputError(f"Unknown measure {flt.measure!r}: choose from {', '.join(MEASURES)}.")
    bad = [k for k in flt.kinds if k not in EDGE_KINDS]
    if bad or not flt.kinds:
        raise InputError(f"Choose edge kinds from {', '.join(EDGE_KINDS)} (got {', '.join(flt.kinds) or 'none'}).")
    if flt.top_k is not None and flt.top_k < 1:
        raise InputError("top-k must be at least 1 (or leave it empty to keep every edge above the threshold).")
    if flt.max_edges is not None and flt.max_edges < 1:
        raise InputError("The edge limit must be at least 1.")
    chosen = {node_id(h.layer, h.head) for h in (head.check(n_layers, n_heads) for head in flt.heads)}
    kept = edges[edges["kind"].isin(flt.kinds)]
    if chosen:
        kept = kept[kept["sender"].isin(chosen) | kept["receiver"].isin(chosen)]
    candidates = kept
    if flt.threshold is not None:
        kept = kept[kept[flt.measure] >= flt.threshold]
    if kept.empty:
        where = f" touching {', '.join(sorted(chosen))}" if chosen else ""
        if candidates.empty:
            raise InputError(f"There are no {'/'.join(flt.kinds)} edges{where} to show.")
        strongest = float(candidates[flt.measure].max())
        values = candidates[flt.measure].to_numpy()
        hint = suggest_threshold(values, 50)
        raise InputError(
            f"No edge{where} has {flt.measure} >= {flt.threshold:g} ({MEASURES[flt.measure]}); the strongest has "
            f"{strongest:.3g}. Try a threshold of {hint:g} (it keeps {int((values >= hint).sum())} edges) or lower.")
    if flt.top_k is not None:
        kept = _top_k_per_node(kept, flt.measure, flt.top_k, chosen)
    kept = kept.sort_values(flt.measure, ascending=False, kind="stable")
    if flt.max_edges is not None:
        kept = kept.head(flt.max_edges)
    return kept.reset_index(drop=True)


def _head_table(df: Optional[pd.DataFrame], columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{"layer.head": {column: value}}`` from a DataFrame with ``layer`` and ``head`` columns."""
    if df is None or len(df) == 0 or not {"layer", "head"} <= set(df.columns):
        return {}
    present = [c for c in columns if c in df.columns]
    return {node_id(int(row["layer"]), int(row["head"])): {c: row[c] for c in present}
            for _, row in df.iterrows()}


def _clean(value: Any) -> Any:
    """GraphML and JSON take str/int/float/bool; NaN and None are dropped by the caller."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


def _set(attrs: dict[str, Any], key: str, value: Any) -> None:
    value = _clean(value)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return
    if not isinstance(value, (str, int, float, bool)):
        value = str(value)
    attrs[key] = value


def _graph_metadata(G: nx.DiGraph, result: CompositionResult, flt: GraphFilter, model_name: str,
                    published: Optional[PublishedRoles]) -> None:
    _set(G.graph, "model", model_name)
    _set(G.graph, "measure", flt.measure)
    _set(G.graph, "threshold", flt.threshold)
    _set(G.graph, "ln_folded", result.ln_folded)
    _set(G.graph, "folding_note", result.folding_note)
    _set(G.graph, "n_layers", result.n_layers)
    _set(G.graph, "n_heads", result.n_heads)
    for kind, base in result.baselines.items():
        _set(G.graph, f"baseline_{kind}_mean", base.mean)
        _set(G.graph, f"baseline_{kind}_std", base.std)
    if published is not None:
        _set(G.graph, "published_roles_source", published.source)


@dataclass
class _NodeFacts:
    """What the graph says about each head: its atlas role, published role and ablation importance."""

    n_layers: int
    atlas_rows: dict[str, dict[str, Any]]
    importance_rows: dict[str, dict[str, Any]]
    published: Optional[PublishedRoles]

    def attributes(self, name: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        if name in (EMBED, LOGITS):
            _set(attrs, "layer", -1 if name == EMBED else self.n_layers)
            _set(attrs, "kind", name)
            return attrs
        layer, head = (int(p) for p in name.split("."))
        _set(attrs, "layer", layer)
        _set(attrs, "head", head)
        _set(attrs, "kind", "head")
        atlas_row = self.atlas_rows.get(name, {})
        _set(attrs, "atlas_role", normalise_role(atlas_row.get("behaviour")) or None)
        _set(attrs, "atlas_confidence", atlas_row.get("confidence"))
        if self.published is not None:
            _set(attrs, "published_role", self.published.role_of(HeadRef(layer, head)))
        _set(attrs, "importance", self.importance_rows.get(name, {}).get("importance"))
        return attrs


def _patch_rows(patching: Optional[pd.DataFrame]) -> dict[tuple[str, str, str], Any]:
    """Path-patching rows keyed by ``(sender, receiver, kind)``."""
    rows = {}
    if patching is not None and len(patching):
        for _, row in patching.iterrows():
            rows[(str(row["sender"]), str(row["receiver"]), str(row["kind"]))] = row
    return rows


def _add_edge(G: nx.DiGraph, row: Any, patch: Any) -> None:
    """One edge per pair of nodes: a second kind between the same pair goes in as ``{kind}_`` attributes."""
    attrs: dict[str, Any] = {}
    for key in ("kind", "score", "ratio", "z"):
        _set(attrs, key, getattr(row, key))
    if patch is not None:
        _set(attrs, "patch_effect", patch.get("effect"))
        _set(attrs, "patch_normalized", patch.get("normalized"))
    if G.has_edge(row.sender, row.receiver):
        existing = G.edges[row.sender, row.receiver]
        for key, value in attrs.items():
            if key != "kind":
                _set(existing, f"{row.kind}_{key}", value)
        existing["kinds"] = existing.get("kinds", existing["kind"]) + "," + row.kind
    else:
        attrs["kinds"] = row.kind
        G.add_edge(row.sender, row.receiver, **attrs)


def build_graph(result: CompositionResult, flt: GraphFilter = GraphFilter(), *, io: Optional[IOScores] = None,
                atlas: Optional[pd.DataFrame] = None, importance: Optional[pd.DataFrame] = None,
                published: Optional[PublishedRoles] = None, patching: Optional[pd.DataFrame] = None,
                model_name: str = "", edges: Optional[pd.DataFrame] = None) -> nx.DiGraph:
    """The filtered circuit graph.

    ``atlas``: DataFrame with ``layer, head, behaviour`` (and optionally ``confidence``) from the
    head atlas; ``importance``: ``layer, head, importance`` from the ablation page; ``patching``:
    a path-patching table (``sender, receiver, kind, effect, normalized``); ``edges``: a
    precomputed :func:`all_edges` table (saves recomputing it on every filter change).
    """
    kinds = tuple(k for k in flt.kinds if k != "out" or io is not None)
    flt = GraphFilter(kinds=kinds or flt.kinds, measure=flt.measure, threshold=flt.threshold, top_k=flt.top_k,
                      heads=flt.heads, max_edges=flt.max_edges)
    table = edges if edges is not None else all_edges(result, io)
    chosen = select_edges(table, flt, result.n_layers, result.n_heads)
    facts = _NodeFacts(result.n_layers, _head_table(atlas, ["behaviour", "confidence"]),
                       _head_table(importance, ["importance"]), published)
    patch_rows = _patch_rows(patching)
    G = nx.DiGraph()
    _graph_metadata(G, result, flt, model_name, published)

    def add_node(name: str) -> None:
        if name not in G:
            G.add_node(name, **facts.attributes(name))

    for head in flt.heads:
        add_node(node_id(head.layer, head.head))
    for row in chosen.itertuples(index=False):
        add_node(row.sender)
        add_node(row.receiver)
        _add_edge(G, row, patch_rows.get((row.sender, row.receiver, row.kind)))
    return G


# ----------------------------------------------------------------------------------------- exports

def to_graphml(G: nx.DiGraph) -> str:
    return "\n".join(nx.generate_graphml(G))


def to_json(G: nx.DiGraph) -> str:
    return json.dumps(nx.node_link_data(G, edges="edges"), indent=2, allow_nan=False)


def node_role(attrs: dict[str, Any], prefer: str = "atlas") -> str:
    """The role a node is coloured by: the atlas behaviour, else the published role (or the other way)."""
    order = ("atlas_role", "published_role") if prefer == "atlas" else ("published_role", "atlas_role")
    for key in order:
        if attrs.get(key):
            return str(attrs[key])
    return ""


def edges_frame(G: nx.DiGraph) -> pd.DataFrame:
    """The graph's edges as a table (for display and CSV download)."""
    rows = [{"sender": u, "receiver": v, **a} for u, v, a in G.edges(data=True)]
    table = pd.DataFrame(rows)
    measure = G.graph.get("measure", "ratio")
    if len(table) and measure in table.columns:
        table = table.sort_values(measure, ascending=False, kind="stable").reset_index(drop=True)
    return table


def role_comparison(published: PublishedRoles, atlas: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Published roles next to the atlas behaviour of the same heads: ``head, published_role,
    atlas_role, agree`` (``agree`` is empty where the atlas has not run)."""
    atlas_rows = _head_table(atlas, ["behaviour", "confidence"])
    rows = []
    for head, role in sorted(published.roles.items()):
        name = node_id(head.layer, head.head)
        found = atlas_rows.get(name, {})
        atlas_role = normalise_role(found.get("behaviour"))
        rows.append({"head": name, "published_role": role, "atlas_role": atlas_role or None,
                     "atlas_confidence": _clean(found.get("confidence")),
                     "agree": (atlas_role.lower() == normalise_role(role).lower()) if found else None})
    return pd.DataFrame(rows)
