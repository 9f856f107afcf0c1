"""Figures of the circuit tours, and a tour as one standalone HTML page (every text escaped)."""

import html
from typing import Any, Optional, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

MARGIN = dict(t=50, b=40, l=50, r=10)


def loss_by_position(loss: Sequence[float], second_copy_start: int, title: str = "") -> go.Figure:
    """Mean next-token loss at each position of repeated random tokens; the second copy shaded."""
    fig = go.Figure(go.Scatter(x=list(range(len(loss))), y=list(loss), mode="lines+markers",
                               hovertemplate="position %{x}<br>loss %{y:.2f} nats<extra></extra>"))
    fig.add_vrect(x0=second_copy_start - 0.5, x1=len(loss) - 0.5, fillcolor="green", opacity=0.08,
                  line_width=0, annotation_text="second copy", annotation_position="top left")
    fig.update_layout(title=title or "Loss per token on repeated random tokens", xaxis_title="position (predicting "
                      "the next token)", yaxis_title="loss (nats)", height=360, margin=MARGIN)
    return fig


def bar_figure(labels: Sequence[str], values: Sequence[float], title: str, value_label: str,
               reference: Optional[float] = None, reference_label: str = "", colours: Optional[Sequence[str]] = None
               ) -> go.Figure:
    """Horizontal bars, first label on top, with an optional dashed reference line."""
    fig = go.Figure(go.Bar(x=list(values), y=[str(label) for label in labels], orientation="h",
                           marker_color=list(colours) if colours is not None else None,
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    if reference is not None:
        fig.add_vline(x=reference, line_dash="dash", line_color="grey", annotation_text=reference_label)
    fig.update_layout(title=title, xaxis_title=value_label, height=max(240, 28 * len(labels) + 110),
                      yaxis=dict(autorange="reversed", type="category"), margin=MARGIN)
    return fig


def grouped_bars(categories: Sequence[str], series: dict[str, Sequence[float]], title: str, value_label: str
                 ) -> go.Figure:
    fig = go.Figure([go.Bar(name=name, x=[str(c) for c in categories], y=list(values))
                     for name, values in series.items()])
    fig.update_layout(title=title, yaxis_title=value_label, barmode="group", height=360, margin=MARGIN)
    fig.update_xaxes(type="category")
    return fig


def head_heatmap(matrix: np.ndarray, title: str, value_label: str, diverging: bool = True) -> go.Figure:
    """Layer x head heatmap of one value per head."""
    n_layers, n_heads = matrix.shape
    bound = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=matrix, x=list(range(n_heads)), y=list(range(n_layers)), xgap=1, ygap=1,
        colorscale="RdBu_r" if diverging else "Viridis", zmid=0 if diverging else None,
        zmin=-bound if diverging else None, zmax=bound if diverging else None, colorbar=dict(title=value_label),
        hovertemplate="head %{y}.%{x}<br>" + value_label + " %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis=dict(title="head", dtick=1), height=max(260, 18 * n_layers + 120),
                      yaxis=dict(title="layer", dtick=1 if n_layers <= 32 else None, autorange="reversed"),
                      margin=MARGIN)
    return fig


def depth_figure(rows: Sequence[dict[str, Any]], title: str) -> go.Figure:
    """Relative depth (layer / layers) of heads by role, one marker series per model."""
    fig = go.Figure()
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        fig.add_trace(go.Scatter(x=[r["depth"] for r in mine], y=[r["role"] for r in mine], mode="markers",
                                 name=model, text=[r["head"] for r in mine], marker=dict(size=11),
                                 hovertemplate="%{text}: depth %{x:.2f}<extra>" + html.escape(model) + "</extra>"))
    fig.update_layout(title=title, xaxis=dict(title="layer / number of layers", range=[-0.02, 1.02]),
                      yaxis=dict(type="category"), height=340, margin=MARGIN)
    return fig


def _figure_html(fig: Any, first: bool) -> str:
    # The first figure carries plotly.js itself, so the page needs no network.
    return pio.to_html(fig, include_plotlyjs=True if first else False, full_html=False,
                       config={"displaylogo": False})


def tour_html(title: str, summary: str, model_name: str, steps: Sequence[Any], results: Sequence[Any]) -> str:
    """A standalone HTML page: each step's explanation, paper, sentence, figure and table."""
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(summary)}</p>",
             f"<p><b>Model:</b> {html.escape(model_name or 'unnamed model')}</p>"]
    first = True
    for number, (step, result) in enumerate(zip(steps, results), start=1):
        parts.append(f"<section><h2>{number}. {html.escape(step.title)}</h2>")
        parts.append(f"<p>{html.escape(step.explanation)}</p><p class='paper'>{html.escape(step.paper)}</p>")
        mark = "" if result.convincing else " <span class='weak'>(nothing convincing)</span>"
        parts.append(f"<p class='finding'><b>On this model:</b> {html.escape(result.sentence)}{mark}</p>")
        if result.figure is not None:
            parts.append(_figure_html(result.figure, first))
            first = False
        if result.table is not None and not result.table.empty:
            parts.append(result.table.head(30).to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                                       escape=True, border=0))
        if result.link:
            parts.append(f"<p class='link'>In the app: <code>{html.escape(result.link)}</code></p>")
        parts.append(f"<p class='time'>computed in {result.seconds:.1f} s</p></section>")
    style = ("body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em}"
             "section{border-top:1px solid #ccc;margin-top:1.5em}.paper,.time,.link{color:#555;font-size:90%}"
             ".finding{background:#eef6ee;padding:.5em}.weak{color:#a33}"
             "table{border-collapse:collapse;font-size:85%}td,th{padding:2px 8px;border-bottom:1px solid #eee}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
