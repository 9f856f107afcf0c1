"""Figures of ablation studies: every head's importance, the targeted search's trajectory, and how an
attribution-patching estimate compares with exact ablation."""

import numpy as np
import plotly.graph_objects as go

from headvis_core.ablation.estimate import RefinedEstimate
from headvis_core.ablation.metrics import ABLATION_METRIC_LABELS
from headvis_core.ablation.ranking import HeadRanking
from headvis_core.ablation.targeted import TargetedResult


def importance_heatmap(ranking: HeadRanking, title: str = "") -> go.Figure:
    """Layer x head heatmap of ``ranking.importance``."""
    matrix = ranking.importance
    n_layers, n_heads = matrix.shape
    label = {"kl": "KL (nats)", "logit_diff": "logit diff drop", "loss": "loss rise"}[ranking.metric]
    diverging = ranking.metric != "kl"
    bound = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=matrix, x=list(range(n_heads)), y=list(range(n_layers)),
        colorscale="RdBu_r" if diverging else "Reds", zmid=0 if diverging else None,
        zmin=-bound if diverging else 0, zmax=bound or 1.0, colorbar=dict(title=label),
        hovertemplate="head %{y}.%{x}<br>" + label + " %{z:.4f}<extra></extra>"))
    default_title = f"{ABLATION_METRIC_LABELS[ranking.metric]} when each head is {ranking.kind}-ablated"
    fig.update_layout(title=title or default_title,
                      xaxis_title="head", yaxis_title="layer", height=min(900, 120 + 22 * n_layers),
                      yaxis_autorange="reversed", margin=dict(t=40, b=10, l=10, r=10))
    fig.update_xaxes(dtick=1)
    return fig


def trajectory_figure(result: TargetedResult) -> go.Figure:
    """Probability of the alternative and of the original top token after each step."""
    t = result.trajectory
    labels = [f"{r.step}: {r.action} {r.head}".strip() for r in t.itertuples()]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=labels, y=t["alternative_prob"], mode="lines+markers",
                             name=f"alternative {result.alternative!r}"))
    fig.add_trace(go.Scatter(x=labels, y=t["original_prob"], mode="lines+markers", name="original top token"))
    fig.update_layout(title="Probabilities along the search", xaxis_title="step", yaxis_title="probability",
                      yaxis_range=[0, 1], height=380, margin=dict(t=40, b=10, l=10, r=10))
    fig.update_xaxes(type="category")
    return fig


def estimate_agreement_figure(refined: RefinedEstimate) -> go.Figure:
    """Each refined head's estimated importance against its exact value, with the line where they agree."""
    table = refined.table.dropna(subset=["exact"])
    label = {"kl": "KL (nats)", "logit_diff": "logit diff drop", "loss": "loss rise"}[refined.estimate.metric]
    fig = go.Figure(go.Scatter(
        x=table["estimate"], y=table["exact"], mode="markers+text", text=table["label"], textposition="top center",
        hovertemplate="head %{text}<br>estimate %{x:.4f}<br>exact %{y:.4f}<extra></extra>", name="heads"))
    if len(table):
        low = float(min(table["estimate"].min(), table["exact"].min()))
        high = float(max(table["estimate"].max(), table["exact"].max()))
        fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", line=dict(dash="dot", color="grey"),
                                 name="estimate = exact", hoverinfo="skip"))
    fig.update_layout(title=f"Estimate against exact ablation: {refined.agreement.summary}",
                      xaxis_title=f"estimated {label}", yaxis_title=f"exact {label}", height=460,
                      margin=dict(t=50, b=10, l=10, r=10))
    return fig
