"""The model card's figure: the layer x head grid coloured by shared KV head."""

import numpy as np
import plotly.graph_objects as go

from headvis_core.models.card import kv_group
from headvis_core.models.loader import ModelInfo


def head_grid_figure(info: ModelInfo) -> go.Figure:
    """Layer x head grid, coloured by KV group so GQA sharing is visible."""
    groups = np.array([[kv_group(h, info) for h in range(info.n_heads)] for _ in range(info.n_layers)])
    labels = [[f"head {l}.{h}<br>KV head {kv_group(h, info)}" for h in range(info.n_heads)]
              for l in range(info.n_layers)]
    fig = go.Figure(go.Heatmap(z=groups, x=list(range(info.n_heads)), y=list(range(info.n_layers)),
                               text=labels, hoverinfo="text", colorscale="Viridis", showscale=False, xgap=2, ygap=2))
    fig.update_layout(title=f"{info.n_layers} layers x {info.n_heads} heads (colour: shared KV head)",
                      xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
                      height=max(250, 18 * info.n_layers + 120), margin=dict(t=50, b=40, l=50, r=10))
    return fig
