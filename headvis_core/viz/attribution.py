"""Figures of an edge attribution: ranked bars of the QK marginals and pairs, the OV terms and
tokens, the RoPE offset profile, and a small path diagram (HeadVis, Anthropic 2025, Figure 4:
strongest query-side component -> head <- key-side component, head -> tokens it says).

All component and token labels are escaped: plotly renders a subset of HTML in its text, and the
diagram is an HTML/SVG document shown in an iframe.
"""

import html
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from headvis_core.tokens import visible

POSITIVE = "#1f77b4"
NEGATIVE = "#d62728"


def _escaped(labels) -> list[str]:
    return [html.escape(str(label)) for label in labels]


def ranked_bars(frame: pd.DataFrame, title: str, n: int = 15, label: str = "label", value: str = "value",
                axis_title: str = "contribution to the score") -> go.Figure:
    """Horizontal bars of the ``n`` rows with the largest ``|value|``, largest at the top."""
    top = frame.reindex(frame[value].abs().sort_values(ascending=False).index).head(n).iloc[::-1]
    colours = [POSITIVE if v >= 0 else NEGATIVE for v in top[value]]
    fig = go.Figure(go.Bar(x=top[value], y=_escaped(top[label]), orientation="h", marker_color=colours,
                           hovertemplate="%{y}: %{x:.4f}<extra></extra>"))
    fig.update_layout(title=html.escape(title), xaxis_title=axis_title, height=max(260, 26 * len(top) + 90),
                      margin=dict(l=10, r=10, t=50, b=40), yaxis=dict(automargin=True))
    return fig


def pair_bars(pairs: pd.DataFrame, title: str = "Top (query, key) pairs", n: int = 15) -> go.Figure:
    frame = pairs.assign(pair=[f"{q}  \u00d7  {k}" for q, k in zip(pairs.query_label, pairs.key_label)])
    return ranked_bars(frame, title, n=n, label="pair")


def top_tokens_bars(tokens: pd.DataFrame, title: str = "Tokens the edge says (direct logit effect)") -> go.Figure:
    frame = tokens.assign(label=[repr(t) for t in tokens.token])
    return ranked_bars(frame, title, n=len(frame), value="logit", axis_title="logit change")


def offset_profile_figure(offsets: pd.DataFrame, title: str = "Score of the same query/key content at each offset"
                          ) -> go.Figure:
    """The RoPE offset profile, the edge's actual offset marked."""
    fig = go.Figure(go.Scatter(x=offsets.offset, y=offsets.score, mode="lines+markers", name="score",
                               hovertemplate="offset %{x}: %{y:.3f}<extra></extra>"))
    actual = offsets[offsets.actual]
    fig.add_trace(go.Scatter(x=actual.offset, y=actual.score, mode="markers", name="this edge",
                             marker=dict(size=13, color=NEGATIVE, symbol="diamond")))
    fig.update_layout(title=html.escape(title), xaxis_title="query position - key position",
                      yaxis_title="pre-softmax score", height=320, margin=dict(l=10, r=10, t=50, b=40))
    return fig


def _node(x: float, y: float, text: str, fill: str, width: int = 190) -> str:
    return (f'<rect x="{x - width / 2}" y="{y - 16}" width="{width}" height="32" rx="8" fill="{fill}" '
            f'stroke="#555"/><text x="{x}" y="{y + 5}" text-anchor="middle" font-size="12">'
            f"{html.escape(text[:30])}</text>")


def _arrow(x1: float, y1: float, x2: float, y2: float, value: float, biggest: float) -> str:
    width = 1 + 7 * abs(value) / biggest if biggest else 1
    colour = POSITIVE if value >= 0 else NEGATIVE
    return (f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{colour}" stroke-width="{width:.1f}" '
            f'marker-end="url(#arrow)" opacity="0.8"/><text x="{(x1 + x2) / 2}" y="{(y1 + y2) / 2 - 4}" '
            f'font-size="11" text-anchor="middle" fill="{colour}">{value:+.2f}</text>')


def path_diagram_html(result: Any, n: int = 3) -> str:
    """An SVG of the strongest query-side and key-side components into the head, and the head's
    write out to the tokens it says most, as a self-contained HTML document (labels escaped)."""
    query = result.query_side().head(n)
    key = result.key_side().head(n)
    tokens = result.top_tokens.head(n)
    step = 46
    key_top = 50 + step * (len(query) + 1)  # the key group sits below the query group
    width, height = 900, key_top + step * len(key) + 10
    head_x, head_y = 450, height / 2
    biggest = max([abs(v) for v in list(query.value) + list(key.value)] or [1.0])
    parts = ['<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
             'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>']
    q_token = visible(result.tokens[result.edge.query])
    k_token = visible(result.tokens[result.edge.key])
    parts.append(f'<text x="120" y="20" text-anchor="middle" font-weight="bold">query side: '
                 f"{html.escape(repr(q_token))} @{result.edge.query}</text>")
    parts.append(f'<text x="120" y="{key_top - 30}" text-anchor="middle" font-weight="bold">key side: '
                 f"{html.escape(repr(k_token))} @{result.edge.key}</text>")
    for i, row in enumerate(query.itertuples()):
        y = 50 + step * i
        parts.append(_arrow(215, y, head_x - 85, head_y - 8, row.value, biggest))
        parts.append(_node(120, y, row.label, "#e8f0fb"))
    for i, row in enumerate(key.itertuples()):
        y = key_top + step * i
        parts.append(_arrow(215, y, head_x - 85, head_y + 8, row.value, biggest))
        parts.append(_node(120, y, row.label, "#fdf0e6"))
    parts.append(_node(head_x, head_y, f"head {result.edge.head}  score {result.score:.2f}", "#eeeeee", 170))
    out_x = 770
    for i, row in enumerate(tokens.itertuples()):
        y = head_y + (i - (len(tokens) - 1) / 2) * step
        parts.append(f'<line x1="{head_x + 85}" y1="{head_y}" x2="{out_x - 80}" y2="{y}" stroke="#2ca02c" '
                     f'stroke-width="2" marker-end="url(#arrow)"/>')
        parts.append(_node(out_x, y, f"says {row.token!r} {row.logit:+.2f}", "#eaf7ea", 160))
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
    body = svg + "".join(parts) + "</svg>"
    return f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body style="margin:0">{body}</body></html>'
