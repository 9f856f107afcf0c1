"""Figures of a head's Q/K/V/O projections: the PCA cloud of its top pairs, optionally with a prompt drawn in.

Input tables come from :func:`headvis_core.projections.prompt.stored_pairs_table`
and :func:`~headvis_core.projections.prompt.project_prompt` (columns ``query_token``,
``key_token``, ``query``, ``distance``, ``norm``, ``weight``, ``value_norm``, ``context``
and ``{kind}{component}``). A cloud is coloured by a token (categorical) or by a per-pair
metric (:data:`COLOR_METRICS`). Token text is HTML-escaped before it reaches a hover label.
"""

import html
from typing import Optional

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from headvis_core.tokens import visible

COLOR_TOKENS = {"query token": "query_token", "key token": "key_token"}
# a per-pair metric: option -> (column of the pairs table, colour bar title)
COLOR_METRICS = {
    "distance": ("distance", "distance q - k"),
    "attention": ("weight", "attention A[q,k]"),
    "norm": ("norm", "||A[q,k] v_k W_O||"),
    "value norm": ("value_norm", "||v_k W_O||"),
    "query position": ("query", "query position"),
}
COLOR_OPTIONS = (*COLOR_TOKENS, *COLOR_METRICS)
METHODS = ("PCA", "UMAP")
MAX_TOKEN_COLOURS = 12
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#aec7e8", "#ffbb78")
OTHER_COLOUR = "#d9d9d9"


def _hover(table: pd.DataFrame) -> list[str]:
    weights = table["weight"] if "weight" in table.columns else [np.nan] * len(table)
    return [f"{html.escape(visible(str(c)))}<br>q {q} \u2190 k {k} (distance {d}), norm {n:.3g}"
            + ("" if np.isnan(w) else f", attention {w:.3g}")
            for c, q, k, d, n, w in zip(table["context"], table["query"], table["key"], table["distance"],
                                        table["norm"], weights)]


def color_options(table: pd.DataFrame) -> list[str]:
    """The colourings ``table`` has values for (projections stored before attention weights were kept
    have no ``attention`` or ``value norm``)."""
    def has_values(option: str) -> bool:
        column = COLOR_METRICS[option][0]
        return column in table.columns and bool(table[column].notna().all())

    return [option for option in COLOR_OPTIONS if option in COLOR_TOKENS or has_values(option)]


def color_values(table: pd.DataFrame, color_by: str) -> pd.Series:
    """The per-pair values a metric colouring draws (the table's own column, unchanged)."""
    column = COLOR_METRICS[color_by][0]
    if color_by not in color_options(table):
        raise ValueError(f"these pairs have no {color_by!r} values (recompute the projections to get them)")
    return table[column]


def _scatter(table: pd.DataFrame, kind: str, dims: int, **style) -> go.Scatter | go.Scatter3d:
    """Points of ``table``; ``customdata`` holds each point's row label, so a selection maps back to pairs."""
    xyz = {axis: table[f"{kind}{c}"] for axis, c in zip("xyz", range(dims))}
    style.setdefault("customdata", np.asarray(table.index)[:, None])
    if dims == 3:
        return go.Scatter3d(mode="markers", hovertemplate="%{text}<extra></extra>", text=_hover(table), **xyz,
                            **style)
    return go.Scatter(mode="markers", hovertemplate="%{text}<extra></extra>", text=_hover(table), **xyz, **style)


def selected_rows(selection: dict) -> list[int]:
    """Row labels of the points of a plotly selection event (``{"points": [{"customdata": [row], ...}]}``)."""
    rows = []
    for point in (selection or {}).get("points", []):
        data = point.get("customdata")
        if isinstance(data, (list, tuple)) and data:
            rows.append(int(data[0]))
        elif isinstance(data, (int, float)):
            rows.append(int(data))
    return sorted(set(rows))


def projection_figure(table: pd.DataFrame, kind: str, color_by: str = "distance", dims: int = 2,
                      explained: Optional[np.ndarray] = None, overlay: Optional[pd.DataFrame] = None,
                      title: str = "", method: str = "PCA") -> go.Figure:
    """Scatter of one kind's PCA (or UMAP) coordinates (``dims`` 2 or 3), coloured by ``color_by``.

    ``overlay`` (a projected prompt's pairs) is drawn on top as black crosses; it has PCA coordinates only
    (a UMAP layout keeps no rotation), so it is not drawn on a UMAP figure.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    default_title = f"{kind} at the top pairs" + (" (UMAP)" if method == "UMAP" else "")
    if method == "UMAP":
        if f"umap_{kind}0" not in table.columns:
            raise ValueError("this table holds no UMAP coordinates (the projections were computed without UMAP)")
        kind, overlay, explained = f"umap_{kind}", None, None
    if color_by not in COLOR_OPTIONS:
        raise ValueError(f"color_by must be one of {COLOR_OPTIONS}")
    if dims not in (2, 3):
        raise ValueError("dims must be 2 or 3")
    fig = go.Figure()
    size = 4 if dims == 3 else 6
    if color_by in COLOR_TOKENS:
        column = COLOR_TOKENS[color_by]
        common = table[column].value_counts().index[:MAX_TOKEN_COLOURS].tolist()
        groups = [(tok, table[table[column] == tok], PALETTE[i]) for i, tok in enumerate(common)]
        rest = table[~table[column].isin(common)]
        if len(rest):
            groups.append(("other", rest, OTHER_COLOUR))
        for name, part, colour in groups:
            label = html.escape(visible(str(name))) if name != "other" else "other tokens"
            fig.add_trace(_scatter(part, kind, dims, name=label, marker=dict(size=size, color=colour, opacity=0.75)))
    else:
        values = color_values(table, color_by)
        fig.add_trace(_scatter(table, kind, dims, name="pairs", showlegend=False,
                               marker=dict(size=size, color=values.to_numpy(), colorscale="Viridis", opacity=0.8,
                                           colorbar=dict(title=COLOR_METRICS[color_by][1]))))
    if overlay is not None and len(overlay):
        fig.add_trace(_scatter(overlay, kind, dims, name="prompt",
                               marker=dict(size=size + 4, color="black", symbol="x")))
    axis = "UMAP" if method == "UMAP" else "PC"
    labels = [f"{axis}{c + 1}" + (f" ({explained[c]:.0%})" if explained is not None else "") for c in range(dims)]
    fig.update_layout(title=title or default_title, height=460, margin=dict(t=40, b=40, l=40, r=10),
                      legend=dict(itemsizing="constant"))
    if dims == 3:
        fig.update_layout(scene=dict(xaxis_title=labels[0], yaxis_title=labels[1], zaxis_title=labels[2]))
    else:
        fig.update_layout(xaxis_title=labels[0], yaxis_title=labels[1])
    return fig
