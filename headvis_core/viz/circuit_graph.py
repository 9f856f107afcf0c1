"""The circuit graph as a standalone pyvis HTML page, laid out by layer from left to right.

Every label and tooltip is HTML-escaped before it reaches pyvis: vis-network
shows titles with ``innerText``, but pyvis switches to ``innerHTML`` popups as
soon as one title contains "href", and role names come from other pages and
files.
"""

import html
import json
from pathlib import Path
from typing import Any

import networkx as nx
from pyvis.network import Network

from headvis_core.circuits.graph import (
    EDGE_KIND_NAMES,
    EDGE_KINDS,
    EMBED,
    LOGITS,
    node_role,
    normalise_role,
    to_graphml,
    to_json,
)
from headvis_core.errors import InputError
from headvis_core.storage import atomic_write_text

EDGE_COLOURS = {"q": "#1f77b4", "k": "#ff7f0e", "v": "#2ca02c", "out": "#9467bd"}
ROLE_COLOURS = {
    "induction": "#d62728", "previous token": "#ff9896", "duplicate token": "#8c564b",
    "name mover": "#17becf", "backup name mover": "#9edae5", "negative name mover": "#7f7f7f",
    "s inhibition": "#bcbd22", "successor": "#f7b6d2", "copy suppression": "#c49c94",
    "positional": "#aec7e8", "local/positional": "#aec7e8", "copying": "#e377c2", "attention sink": "#dbdb8d",
    "bos": "#dbdb8d", "self": "#c5b0d5",
}
SPARE_COLOURS = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
                 "#756bb1", "#636363"]
NO_ROLE_COLOUR = "#c7c7c7"
IO_COLOUR = "#444444"
LAYER_SPACING, HEAD_SPACING = 170, 70


def role_colour(role: str) -> str:
    key = normalise_role(role).lower()
    if not key or key in ("none", "unknown", "unclassified", "other"):
        return NO_ROLE_COLOUR
    if key in ROLE_COLOURS:
        return ROLE_COLOURS[key]
    return SPARE_COLOURS[sum(key.encode("utf-8")) % len(SPARE_COLOURS)]


def _node_title(name: str, attrs: dict[str, Any]) -> str:
    if name in (EMBED, LOGITS):
        return "token embedding" if name == EMBED else "logits (unembedding)"
    lines = [f"head {name} (layer {attrs['layer']}, head {attrs['head']})"]
    if attrs.get("atlas_role"):
        conf = attrs.get("atlas_confidence")
        lines.append(f"atlas role: {attrs['atlas_role']}" + (f" ({conf:.2f})" if isinstance(conf, float) else ""))
    if attrs.get("published_role"):
        lines.append(f"published role: {attrs['published_role']}")
    if "importance" in attrs:
        lines.append(f"ablation importance: {attrs['importance']:.4g}")
    return "\n".join(lines)


def _edge_title(u: str, v: str, attrs: dict[str, Any]) -> str:
    lines = [f"{u} -> {v}"]
    for kind in attrs.get("kinds", attrs["kind"]).split(","):
        prefix = "" if kind == attrs["kind"] else f"{kind}_"
        lines.append(f"{EDGE_KIND_NAMES[kind]}: score {attrs[prefix + 'score']:.4f}, "
                     f"{attrs[prefix + 'ratio']:.2f}x chance, z {attrs[prefix + 'z']:.1f}")
        if prefix + "patch_effect" in attrs:
            norm = attrs.get(prefix + "patch_normalized")
            share = f" ({100 * norm:+.1f}% of the clean-corrupted gap)" if norm is not None else ""
            lines.append(f"  path patching: logit diff {attrs[prefix + 'patch_effect']:+.4f}{share}")
    return "\n".join(lines)


def _position(name: str, attrs: dict[str, Any], n_layers: int, n_heads: int) -> tuple[float, float]:
    """Layers left to right, heads top to bottom; spread the heads so that the page is no more than
    about twice as wide as high (otherwise fitting 30 layers on screen shrinks every node)."""
    head_spacing = max(HEAD_SPACING, LAYER_SPACING * (n_layers + 2) / (2.2 * max(n_heads, 1)))
    x = (attrs["layer"] + 1) * LAYER_SPACING
    if name in (EMBED, LOGITS):
        return x, 0.0
    return x, (attrs["head"] - (n_heads - 1) / 2) * head_spacing


def _legend_html(G: nx.DiGraph, prefer: str) -> str:
    kinds = sorted({k for _, _, a in G.edges(data=True) for k in a.get("kinds", a["kind"]).split(",")},
                   key=EDGE_KINDS.index)
    roles = sorted({node_role(a, prefer) for _, a in G.nodes(data=True) if a.get("kind") == "head"})
    rows = [f'<div><span style="display:inline-block;width:22px;height:3px;background:{EDGE_COLOURS[k]};'
            f'vertical-align:middle"></span> {html.escape(EDGE_KIND_NAMES[k])}</div>' for k in kinds]
    rows += [f'<div><span style="display:inline-block;width:11px;height:11px;border-radius:6px;'
             f'background:{role_colour(r)};vertical-align:middle"></span> {html.escape(r or "no role")}</div>'
             for r in roles]
    has_importance = any("importance" in a for _, a in G.nodes(data=True))
    rows.append("<div style='color:#555'>layers left to right; "
                + ("node size = ablation importance" if has_importance else "no ablation importance yet") + "</div>")
    return ('<div id="headvis-legend" style="position:absolute;top:8px;left:8px;z-index:10;background:#ffffffdd;'
            'border:1px solid #ccc;border-radius:4px;padding:6px 8px;font:12px sans-serif">'
            + "".join(rows) + "</div>")


def to_html(G: nx.DiGraph, height: str = "720px", prefer: str = "atlas") -> str:
    """A standalone pyvis page (vis-network inlined, so it opens offline) with a legend."""
    n_heads, n_layers = int(G.graph.get("n_heads", 1)), int(G.graph.get("n_layers", 1))
    net = Network(height=height, width="100%", directed=True, cdn_resources="in_line", bgcolor="#ffffff")
    # The view is fitted to the whole layout, so a deep model is drawn zoomed out: scale text and marks up.
    scale = max(1.0, (n_layers + 2) * LAYER_SPACING / 1300)
    net.set_options(json.dumps({
        "physics": {"enabled": False},
        "interaction": {"hover": True, "tooltipDelay": 80, "navigationButtons": False},
        "edges": {"smooth": {"enabled": True, "type": "curvedCW", "roundness": 0.12},
                  "arrows": {"to": {"enabled": True, "scaleFactor": 0.5}}},
        "nodes": {"font": {"size": round(13 * scale)}},
    }))
    importances = [abs(a["importance"]) for _, a in G.nodes(data=True) if "importance" in a]
    top_importance = max(importances) if importances else 0.0
    for name, attrs in G.nodes(data=True):
        x, y = _position(name, attrs, n_layers, n_heads)
        role = node_role(attrs, prefer)
        label = name if not role else f"{name}\n{role}"
        size = 14.0 * scale
        if "importance" in attrs and top_importance > 0:
            size = (8.0 + 30.0 * abs(attrs["importance"]) / top_importance) * scale
        colour = IO_COLOUR if name in (EMBED, LOGITS) else role_colour(role)
        net.add_node(html.escape(name), label=html.escape(label), title=html.escape(_node_title(name, attrs)),
                     x=x, y=y, physics=False, color=colour, size=size,
                     shape="box" if name in (EMBED, LOGITS) else "dot")
    values = [a[G.graph.get("measure", "ratio")] for _, _, a in G.edges(data=True)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    for u, v, attrs in G.edges(data=True):
        strength = (attrs[G.graph.get("measure", "ratio")] - low) / (high - low) if high > low else 0.5
        net.add_edge(html.escape(u), html.escape(v), title=html.escape(_edge_title(u, v, attrs)),
                     color=EDGE_COLOURS[attrs["kind"]], width=(1.0 + 5.0 * strength) * scale)
    page = net.generate_html()
    title = html.escape(f"Circuit graph {G.graph.get('model', '')}".strip())
    page = page.replace("<head>", f"<head>\n<title>{title}</title>", 1)
    return page.replace("<body>", "<body>\n" + _legend_html(G, prefer), 1)


def save_graph(G: nx.DiGraph, path: str | Path, prefer: str = "atlas") -> Path:
    """Write ``G`` as GraphML, JSON or HTML, chosen by the file extension."""
    path = Path(path)
    writers = {".graphml": to_graphml, ".json": to_json, ".html": lambda g: to_html(g, prefer=prefer)}
    if path.suffix.lower() not in writers:
        raise InputError(f"Cannot write {path.name}: give a file ending in .graphml, .json or .html.")
    return atomic_write_text(path, writers[path.suffix.lower()](G))
