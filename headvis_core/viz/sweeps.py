"""Figures of a prompt sweep: a line plot along one slot, a heatmap over two, detected ranges shaded."""

import html
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from headvis_core.errors import InputError
from headvis_core.sweeps.result import SweepResult
from headvis_core.sweeps.thresholds import DetectedRange

RANGE_FILL = "rgba(255, 165, 0, 0.18)"
RANGE_LINE = "rgba(230, 120, 0, 0.9)"


def _escape(value: Any) -> str:
    # Plotly renders a few HTML tags in labels and hover text; slot values and tokens are user text.
    return html.escape(str(value))


def _x_positions(values: Sequence[Any], numeric: bool) -> tuple[list[Any], float]:
    """Plot coordinates for the slot values and half the gap between neighbours (for shading)."""
    if numeric:
        xs = [float(v) for v in values]
        unique = np.unique(xs)
        half = float(np.min(np.diff(unique))) / 2 if len(unique) > 1 else 0.5
        return xs, half
    return list(range(len(values))), 0.5


def _ordered(result: SweepResult, table: pd.DataFrame, x: str) -> pd.DataFrame:
    return table.sort_values(x, kind="stable") if result.plan.numeric.get(x) else table


def sweep_line_figure(result: SweepResult, curves: Sequence[str], level: Optional[float] = None,
                      ranges: Sequence[DetectedRange] = (), title: str = "") -> go.Figure:
    """Each curve against the (first) slot's value, the level as a dashed line and ranges shaded."""
    missing = [c for c in curves if c not in result.table.columns]
    if missing or not curves:
        raise InputError(f"No curve called {missing[0] if missing else '(none)'}; "
                         f"there are: {', '.join(result.curves)}.")
    x = result.swept[0]
    numeric = bool(result.plan.numeric.get(x))
    table = _ordered(result, result.table, x)
    xs, half = _x_positions(table[x].tolist(), numeric)
    hover_text = [f"{_escape(x)}={_escape(v)}<br>{_escape(p)}" for v, p in zip(table[x], table["prompt"])]
    if "top_token" in table.columns:
        hover_text = [f"{h}<br>top: {_escape(repr(t))}" for h, t in zip(hover_text, table["top_token"])]
    fig = go.Figure()
    for curve in curves:
        fig.add_trace(go.Scatter(x=xs, y=table[curve].to_numpy(float),
                                 mode="lines" if len(xs) > 60 else "lines+markers",
                                 name=_escape(curve), text=hover_text,
                                 hovertemplate="%{text}<br>" + _escape(curve) + " = %{y:.4f}<extra></extra>"))
    for found in ranges:
        left = xs[found.start_index] - half
        right = xs[found.stop_index] + half
        fig.add_vrect(x0=left, x1=right, fillcolor=RANGE_FILL, line_width=0, layer="below")
    if level is not None:
        fig.add_hline(y=level, line_dash="dash", line_color="gray",
                      annotation_text=f"level {level:.3g}", annotation_position="top left")
    fig.update_layout(title=_escape(title), xaxis_title=_escape(x), yaxis_title="value", height=450,
                      hovermode="closest", margin=dict(t=50, b=40, l=50, r=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    if not numeric:
        fig.update_xaxes(tickmode="array", tickvals=xs, ticktext=[_escape(v) for v in table[x]], tickangle=-45)
    return fig


def sweep_heatmap_figure(result: SweepResult, curve: str, level: Optional[float] = None,
                         ranges_by_row: Optional[dict[Any, list[DetectedRange]]] = None,
                         title: str = "") -> go.Figure:
    """``curve`` over a grid of the two swept slots; each row's detected ranges outlined."""
    if len(result.swept) != 2:
        raise InputError("A heatmap needs a sweep over two slots.")
    if curve not in result.table.columns:
        raise InputError(f"No curve called {curve!r}; there are: {', '.join(result.curves)}.")
    x, y = result.swept
    x_numeric = bool(result.plan.numeric.get(x))
    grid = result.table.pivot_table(index=y, columns=x, values=curve, aggfunc="mean", sort=False)
    if x_numeric:
        grid = grid.reindex(columns=sorted(grid.columns))
    if result.plan.numeric.get(y):
        grid = grid.sort_index()
    xs, half = _x_positions(list(grid.columns), x_numeric)
    rows = list(grid.index)
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(float), x=xs, y=list(range(len(rows))), colorscale="Viridis", colorbar_title=_escape(curve),
        customdata=np.array([[_escape(r)] * len(xs) for r in rows]),
        hovertemplate=(f"{_escape(x)}=%{{x}}<br>{_escape(y)}=%{{customdata}}<br>"
                       f"{_escape(curve)}=%{{z:.4f}}<extra></extra>")))
    column_of = {value: i for i, value in enumerate(grid.columns)}  # a row may lack some values (sampled sweeps)
    for row_index, row_value in enumerate(rows):
        for found in (ranges_by_row or {}).get(row_value, []):
            left, right = xs[column_of[found.start]], xs[column_of[found.stop]]
            fig.add_shape(type="rect", x0=left - half, x1=right + half,
                          y0=row_index - 0.5, y1=row_index + 0.5, line=dict(color=RANGE_LINE, width=2),
                          fillcolor=RANGE_FILL)
    level_text = f" (outlined: {curve} at or above {level:.3g})" if level is not None and ranges_by_row else ""
    fig.update_layout(title=_escape(title + level_text), xaxis_title=_escape(x), yaxis_title=_escape(y),
                      height=max(300, 40 * len(rows) + 150), margin=dict(t=50, b=40, l=50, r=10))
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))), ticktext=[_escape(r) for r in rows],
                     autorange="reversed")
    if not x_numeric:
        fig.update_xaxes(tickmode="array", tickvals=xs, ticktext=[_escape(v) for v in grid.columns], tickangle=-45)
    return fig


def sweep_figure(result: SweepResult, curves: Sequence[str], level: Optional[float] = None,
                 ranges: Optional[dict[Any, list[DetectedRange]]] = None, title: str = "") -> go.Figure:
    """A line plot for a one-slot sweep, a heatmap of the first curve for a two-slot sweep.

    ``ranges`` is what :func:`headvis_core.sweeps.run.curve_ranges` returns for the
    first curve (key ``None`` for one slot, one entry per row for two).
    """
    if len(result.swept) == 1:
        return sweep_line_figure(result, curves, level, (ranges or {}).get(None, []), title)
    return sweep_heatmap_figure(result, curves[0], level, ranges, title)
