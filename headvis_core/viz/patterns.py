"""Heatmap of one head's attention pattern."""

import numpy as np
import plotly.graph_objects as go
import torch

from headvis_core.tokens import token_labels


def attention_heatmap(pattern: torch.Tensor | np.ndarray, str_tokens: list[str], title: str = "",
                      height: int | None = None) -> go.Figure:
    """Heatmap of one head's ``[query, key]`` pattern with readable, distinct token labels.

    Plotly escapes axis labels and hover text, so tokens like ``<script>`` are shown, not run.
    """
    values = pattern.detach().cpu().numpy() if isinstance(pattern, torch.Tensor) else np.asarray(pattern)
    labels = token_labels(str_tokens)
    fig = go.Figure(go.Heatmap(
        z=values, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=float(max(values.max(), 1e-9)),
        hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>"))
    size = height or min(900, max(300, 14 * len(labels) + 150))
    fig.update_layout(title=title, height=size, xaxis_title="key", yaxis_title="query",
                      yaxis_autorange="reversed", margin=dict(t=40, b=10, l=10, r=10))
    fig.update_xaxes(tickangle=-60, type="category")
    fig.update_yaxes(type="category")
    return fig
