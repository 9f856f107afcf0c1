"""Figures of the prompt lab: every head's attention on a (query, key) pair, and a clickable head grid."""

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from headvis_core.heads import HeadRef


def pair_figure(ranking: pd.DataFrame, n_layers: int, n_heads: int, title: str = "") -> go.Figure:
    """Layer x head heatmap of the attention every head pays on the chosen (query, key) pair."""
    grid = np.zeros((n_layers, n_heads))
    grid[ranking["layer"].to_numpy(), ranking["head"].to_numpy()] = ranking["attention"].to_numpy()
    fig = go.Figure(go.Heatmap(z=grid, x=list(range(n_heads)), y=list(range(n_layers)), colorscale="Blues",
                               zmin=0, zmax=1, xgap=1, ygap=1,
                               hovertemplate="head %{y}.%{x}<br>attention %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
                      height=max(260, 16 * n_layers + 110), margin=dict(t=40, b=40, l=50, r=10))
    return fig


def head_grid_picker(n_layers: int, n_heads: int, selected: Sequence[HeadRef]) -> go.Figure:
    """A layer x head grid of markers (chosen heads filled) whose points can be clicked to pick heads."""
    chosen = set(selected)
    layers, heads = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    is_chosen = [HeadRef(int(l), int(h)) in chosen for l, h in zip(layers.ravel(), heads.ravel())]
    fig = go.Figure(go.Scatter(
        x=heads.ravel(), y=layers.ravel(), mode="markers",
        customdata=[f"{l}.{h}" for l, h in zip(layers.ravel(), heads.ravel())],
        marker=dict(symbol="square", size=14, color=["#1f4e9c" if c else "#dde3ee" for c in is_chosen]),
        hovertemplate="head %{customdata}<extra></extra>"))
    fig.update_layout(xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed", showlegend=False,
                      height=max(220, 16 * n_layers + 90), margin=dict(t=10, b=40, l=50, r=10),
                      xaxis=dict(dtick=1), clickmode="event+select")
    return fig
