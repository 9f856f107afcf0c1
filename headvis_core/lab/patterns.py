"""Attention patterns of chosen heads, captured with only the hooks they need."""

from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
import torch

from headvis_core.heads import HeadRef
from headvis_core.hooks import capture
from headvis_core.tokens import token_labels


def pattern_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def head_patterns(model: Any, tokens: torch.Tensor, heads: Sequence[HeadRef]) -> torch.Tensor:
    """Attention patterns ``[batch, len(heads), query, key]`` of ``heads`` on ``tokens [batch, pos]``.

    One forward pass, hooking only the layers of ``heads`` and stopping after
    the last of them.
    """
    layers = sorted({h.layer for h in heads})
    _, cache = capture(model, tokens, [pattern_hook(l) for l in layers], stop_at_layer=layers[-1] + 1)
    return torch.stack([cache[pattern_hook(h.layer)][:, h.head] for h in heads], dim=1).float().cpu()


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
