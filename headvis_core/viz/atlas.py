"""Figures of the head atlas: the head scatter, layer x head heatmaps, passport cards."""

from typing import Optional

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from headvis_core.atlas.classes import BEHAVIOURS, UNCLASSIFIED
from headvis_core.atlas.run import ATLAS_METRIC_LABELS, MAIN_METRICS, METRIC_COLUMNS, Passport
from headvis_core.heads import HeadRef
from headvis_core.tokens import visible
from headvis_core.viz.patterns import attention_heatmap

AXES = ("layer", "head") + METRIC_COLUMNS
COLOURS = ("behaviour",) + AXES
BEHAVIOUR_COLOURS = {
    "induction": "#d62728", "previous-token": "#1f77b4", "duplicate-token": "#9467bd", "copying": "#2ca02c",
    "retrieval": "#17becf", "local/positional": "#ff7f0e", "attention-sink": "#8c564b", UNCLASSIFIED: "#b0b0b0",
}


def axis_label(column: str) -> str:
    return ATLAS_METRIC_LABELS.get(column, column)


def _hover(table: pd.DataFrame) -> list[str]:
    lines = []
    for _, row in table.iterrows():
        metrics = "<br>".join(f"{axis_label(m)}: {row[m]:.3f}" for m in MAIN_METRICS)
        lines.append(f"<b>head {int(row.layer)}.{int(row['head'])}</b><br>{row.behaviour} "
                     f"({row.confidence:.2f})<br>{metrics}")
    return lines


def head_scatter(table: pd.DataFrame, x: str = "previous_token", y: str = "induction", colour: str = "behaviour",
                 selected: Optional[HeadRef] = None) -> go.Figure:
    """All heads as points; ``x``, ``y`` and ``colour`` are any metric, ``layer`` or ``head`` (colour also
    ``behaviour``). Each point's ``customdata`` is ``[layer, head]``; the selected head is ringed."""
    for name, value, allowed in (("x", x, AXES), ("y", y, AXES), ("colour", colour, COLOURS)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {allowed}")
    fig = go.Figure()
    hover = np.array(_hover(table), dtype=object)
    custom = table[["layer", "head"]].to_numpy()
    if colour == "behaviour":
        for behaviour in BEHAVIOURS + (UNCLASSIFIED,):
            mask = (table.behaviour == behaviour).to_numpy()
            if mask.any():
                fig.add_trace(go.Scatter(
                    x=table[x][mask], y=table[y][mask], mode="markers", name=behaviour,
                    marker=dict(size=9, color=BEHAVIOUR_COLOURS[behaviour], line=dict(width=0.5, color="white")),
                    customdata=custom[mask], hovertext=hover[mask], hovertemplate="%{hovertext}<extra></extra>"))
    else:
        fig.add_trace(go.Scatter(
            x=table[x], y=table[y], mode="markers", name="heads", showlegend=False,
            marker=dict(size=9, color=table[colour], colorscale="Viridis", showscale=True,
                        colorbar=dict(title=axis_label(colour)), line=dict(width=0.5, color="white")),
            customdata=custom, hovertext=hover, hovertemplate="%{hovertext}<extra></extra>"))
    if selected is not None:
        row = table[(table.layer == selected.layer) & (table["head"] == selected.head)]
        if not row.empty:
            fig.add_trace(go.Scatter(
                x=row[x], y=row[y], mode="markers+text", name=f"selected {selected}", text=[str(selected)],
                textposition="top center", customdata=row[["layer", "head"]].to_numpy(), hoverinfo="skip",
                marker=dict(size=18, color="rgba(0,0,0,0)", line=dict(width=2.5, color="black"))))
    fig.update_layout(xaxis_title=axis_label(x), yaxis_title=axis_label(y), height=520, clickmode="event+select",
                      title=f"{len(table)} heads: {axis_label(y)} against {axis_label(x)}",
                      margin=dict(t=50, b=40, l=50, r=10), legend=dict(itemsizing="constant"))
    return fig


def layer_heatmap(table: pd.DataFrame, metric: str = "induction") -> go.Figure:
    """Layer x head heatmap of one metric (the layer breakdown)."""
    if metric not in METRIC_COLUMNS:
        raise ValueError(f"{metric!r} is not a metric")
    n_layers, n_heads = int(table.layer.max()) + 1, int(table["head"].max()) + 1
    z = np.full((n_layers, n_heads), np.nan)
    z[table.layer.to_numpy(), table["head"].to_numpy()] = table[metric].to_numpy()
    behaviour = np.full((n_layers, n_heads), "", dtype=object)
    behaviour[table.layer.to_numpy(), table["head"].to_numpy()] = table.behaviour.to_numpy()
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), colorscale="Viridis", customdata=behaviour,
        colorbar=dict(title=axis_label(metric)), xgap=1, ygap=1,
        hovertemplate="head %{y}.%{x}<br>" + axis_label(metric) + ": %{z:.3f}<br>%{customdata}<extra></extra>"))
    fig.update_layout(title=f"{axis_label(metric)} by layer and head", xaxis=dict(title="head", dtick=1),
                      yaxis=dict(title="layer", dtick=1 if n_layers <= 32 else None, autorange="reversed"),
                      height=max(260, 18 * n_layers + 120),
                      margin=dict(t=50, b=40, l=50, r=10))
    return fig


def behaviour_counts(table: pd.DataFrame) -> go.Figure:
    """Heads of each main behaviour per layer (stacked bars)."""
    layers = sorted(table.layer.unique())
    fig = go.Figure()
    for behaviour in BEHAVIOURS + (UNCLASSIFIED,):
        counts = [int(((table.layer == layer) & (table.behaviour == behaviour)).sum()) for layer in layers]
        if any(counts):
            fig.add_trace(go.Bar(x=layers, y=counts, name=behaviour, marker_color=BEHAVIOUR_COLOURS[behaviour]))
    fig.update_layout(barmode="stack", title="Main behaviour of the heads in each layer", xaxis_title="layer",
                      yaxis_title="heads", height=340, margin=dict(t=50, b=40, l=50, r=10))
    return fig


def passport_metrics_figure(card: Passport) -> go.Figure:
    """The head's metrics as bars of their percentile among all heads, with the values written on them."""
    metrics = card.metrics.iloc[::-1]
    fig = go.Figure(go.Bar(
        x=metrics.percentile, y=metrics.label, orientation="h", marker_color="#4c78a8",
        text=[f"{v:.3f} ({p:.0f}th pct)" for v, p in zip(metrics.value, metrics.percentile)],
        textposition="auto", hovertemplate="%{y}: %{text}<extra></extra>"))
    fig.update_layout(title=f"Head {card.head}: percentile among all heads", xaxis=dict(range=[0, 100],
                      title="percentile"), height=360, margin=dict(t=40, b=40, l=10, r=10))
    return fig


def passport_pattern_figure(card: Passport) -> go.Figure:
    return attention_heatmap(card.pattern, card.example.str_tokens,
                             title=f"Head {card.head} on {card.example.label}", height=420)


def top_tokens_table(card: Passport) -> pd.DataFrame:
    """The key tokens that drew the largest share of the head's attention (position 0 aside)."""
    return pd.DataFrame({"token": [visible(token) for token, _ in card.top_tokens],
                         "share of attention": [share for _, share in card.top_tokens]})
