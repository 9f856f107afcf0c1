"""Figures of a dataset scan: attention by query-key distance and the window-score histogram."""

import numpy as np
import plotly.graph_objects as go

from headvis_core.scan.state import bin_deciles


def distance_figure(shares: np.ndarray, title: str = "") -> go.Figure:
    """Bar chart of attention share by query-key distance.

    ``shares [distance]`` as :meth:`ScanResult.distance_histogram` returns it.
    """
    distances = np.arange(len(shares))
    fig = go.Figure(go.Bar(x=distances, y=shares, hovertemplate="distance %{x}<br>share %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title or "Attention by query-key distance (positions after 0)", height=320,
                      xaxis_title="query position - key position", yaxis_title="share of attention",
                      margin=dict(t=40, b=40, l=50, r=10))
    return fig


def score_histogram_figure(edges: np.ndarray, counts: np.ndarray, title: str = "", n_bars: int = 50) -> go.Figure:
    """Histogram of window scores, bars coloured by decile (``edges [bins + 1]``, ``counts [bins]``)."""
    group = max(1, len(counts) // n_bars)
    n = len(counts) // group * group
    merged = counts[:n].reshape(-1, group).sum(1)
    lows = edges[:n:group]
    of_bin = bin_deciles(counts)[:n].reshape(-1, group).max(1)
    width = edges[group] - edges[0]
    fig = go.Figure(go.Bar(x=lows + width / 2, y=merged, width=width,
                           marker=dict(color=of_bin, colorscale="Viridis", cmin=1, cmax=10,
                                       colorbar=dict(title="decile")),
                           hovertemplate="score %{x:.3f}<br>%{y} windows<extra></extra>"))
    fig.update_layout(title=title or "Window scores (max attention outside position 0)", height=320,
                      xaxis_title="window score", yaxis_title="windows", margin=dict(t=40, b=40, l=50, r=10))
    return fig
