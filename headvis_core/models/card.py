"""The loaded model's card: its shape, and which query heads share a KV head."""

import numpy as np
import plotly.graph_objects as go

from headvis_core.models.loader import ModelInfo


def kv_group(head: int, info: ModelInfo) -> int:
    """The key/value head that query ``head`` reads under grouped-query attention."""
    return head // (info.n_heads // info.n_kv_heads)


def model_facts(info: ModelInfo) -> dict[str, str]:
    return {
        "Architecture": info.architecture,
        "Layers x query heads": f"{info.n_layers} x {info.n_heads} = {info.n_total_heads} heads",
        "Key/value heads per layer": (f"{info.n_kv_heads} (grouped-query: {info.n_heads // info.n_kv_heads} query "
                                      "heads share each)" if info.is_gqa else f"{info.n_kv_heads} (one per head)"),
        "d_model / d_head": f"{info.d_model} / {info.d_head}",
        "Vocabulary": f"{info.d_vocab:,}",
        "Context": f"{info.n_ctx:,} tokens",
        "Prepends BOS": "yes" if info.prepends_bos else "no",
        "Parameters": f"{info.n_params / 1e6:.1f}M",
        "Device / dtype": f"{info.device} / {info.dtype}",
        "Source": info.source,
    }


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
