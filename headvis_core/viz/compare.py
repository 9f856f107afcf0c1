"""Figures and the standalone HTML report of a two-model comparison (:mod:`headvis_core.compare`)."""

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from headvis_core.atlas.run import METRIC_COLUMNS
from headvis_core.compare.deltas import CHANGE_THRESHOLD, delta_grid
from headvis_core.compare.depth import ALL_BEHAVIOURS, depth_bin_labels
from headvis_core.compare.matching import MATCH_METRICS, HeadMatching
from headvis_core.compare.run import Comparison
from headvis_core.viz.atlas import BEHAVIOUR_COLOURS, axis_label, head_scatter

_MARGIN = dict(t=60, b=40, l=50, r=10)


def side_by_side(comparison: Comparison, x: str = "previous_token", y: str = "induction") -> go.Figure:
    """Both atlases' head scatters next to each other, on the same axes, coloured by behaviour."""
    names = (f"A: {comparison.name_a}", f"B: {comparison.name_b}")
    fig = make_subplots(rows=1, cols=2, shared_xaxes=True, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=names)
    shown: set[str] = set()
    for col, atlas in ((1, comparison.atlas_a), (2, comparison.atlas_b)):
        for trace in head_scatter(atlas.table, x, y).data:
            trace.legendgroup = trace.name
            trace.showlegend = trace.name not in shown
            shown.add(trace.name)
            fig.add_trace(trace, row=1, col=col)
    fig.update_xaxes(title_text=axis_label(x))
    fig.update_yaxes(title_text=axis_label(y), col=1)
    fig.update_layout(title=f"{axis_label(y)} against {axis_label(x)}, both models on the same probe text",
                      height=480, margin=_MARGIN, legend=dict(itemsizing="constant"))
    return fig


def depth_figure(depth: pd.DataFrame, value: str = "share") -> go.Figure:
    """Stacked bars per relative-depth bin, one panel per model: ``share`` of the bin's heads or ``heads``."""
    if value not in ("share", "heads"):
        raise ValueError(f"value={value!r} is not 'share' or 'heads'")
    models = list(dict.fromkeys(depth.model))
    fig = make_subplots(rows=1, cols=len(models), shared_yaxes=True, subplot_titles=models,
                        horizontal_spacing=0.04)
    labels = depth_bin_labels(depth.depth.nunique())
    for col, model in enumerate(models, start=1):
        rows = depth[depth.model == model]
        for behaviour in ALL_BEHAVIOURS:
            part = rows[rows.behaviour == behaviour].set_index("depth").reindex(labels)
            if part[value].fillna(0).any():
                fig.add_trace(go.Bar(x=labels, y=part[value].fillna(0), name=behaviour, legendgroup=behaviour,
                                     showlegend=col == 1, marker_color=BEHAVIOUR_COLOURS[behaviour],
                                     customdata=part["heads"].fillna(0),
                                     hovertemplate=f"{behaviour}<br>depth %{{x}}<br>%{{customdata}} heads"
                                                   "<extra></extra>"), row=1, col=col)
    fig.update_xaxes(title_text="relative depth (layer / layers)")
    fig.update_yaxes(title_text="share of the heads at that depth" if value == "share" else "heads", col=1)
    fig.update_layout(barmode="stack", height=380, margin=_MARGIN,
                      title="Main behaviour of the heads by relative depth")
    return fig


def pairs_figure(matching: HeadMatching, name_a: str = "A", name_b: str = "B") -> go.Figure:
    """Each matched pair as a point at (relative depth in A, relative depth in B), coloured by distance;
    poor matches (outliers) ringed in red."""
    pairs = matching.pairs
    hover = [f"A {int(r.layer_a)}.{int(r.head_a)} ({html.escape(str(r.behaviour_a))}) <-> "
             f"B {int(r.layer_b)}.{int(r.head_b)} ({html.escape(str(r.behaviour_b))})<br>distance {r.distance:.3f}"
             for r in pairs.itertuples()]
    fig = go.Figure(go.Scatter(
        x=pairs.depth_a, y=pairs.depth_b, mode="markers", hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
        marker=dict(size=9, color=pairs.distance, colorscale="Viridis_r", showscale=True,
                    colorbar=dict(title="distance"),
                    line=dict(width=np.where(pairs.outlier, 2.5, 0.5), color=np.where(pairs.outlier, "red", "white"))),
        name="pairs"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"),
                             hoverinfo="skip", showlegend=False))
    fig.update_layout(title=f"{len(pairs)} heads matched by metric profile: where each pair sits",
                      xaxis=dict(title=f"relative depth in A ({name_a})", range=[0, 1]),
                      yaxis=dict(title=f"relative depth in B ({name_b})", range=[0, 1]),
                      height=480, margin=_MARGIN, showlegend=False)
    return fig


def delta_heatmap(comparison: Comparison, metric: str = "induction") -> go.Figure:
    """Layer x head heatmap of ``B - A`` for one metric (same-shape comparisons); changed heads marked x."""
    if comparison.deltas is None:
        raise ValueError("per-head deltas need two models of the same shape")
    n_layers, n_heads = comparison.atlas_a.n_layers, comparison.atlas_a.n_heads
    grid = delta_grid(comparison.deltas, metric, n_layers, n_heads)
    limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=grid, x=list(range(n_heads)), y=list(range(n_layers)), colorscale="RdBu", zmid=0,
        zmin=-max(limit, 1e-9), zmax=max(limit, 1e-9), xgap=1, ygap=1, colorbar=dict(title="B - A"),
        hovertemplate="head %{y}.%{x}<br>" + axis_label(metric) + " B - A: %{z:.3f}<extra></extra>"))
    changed = comparison.changed
    if len(changed):
        fig.add_trace(go.Scatter(x=changed["head"], y=changed.layer, mode="markers", name="changed",
                                 marker=dict(symbol="x", size=9, color="black"), hoverinfo="skip"))
    fig.update_layout(title=f"{axis_label(metric)}: B - A by layer and head (x: changed heads)",
                      xaxis=dict(title="head", dtick=1),
                      yaxis=dict(title="layer", dtick=1 if n_layers <= 32 else None, autorange="reversed"),
                      height=max(260, 18 * n_layers + 120), margin=_MARGIN, showlegend=False)
    return fig


def _figure(fig: go.Figure) -> str:
    return fig.to_html(include_plotlyjs=False, full_html=False, config={"displaylogo": False})


def _table(df: pd.DataFrame, max_rows: int = 400) -> str:
    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            return "" if np.isnan(value) else f"{value:.3f}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in df.head(max_rows).itertuples(index=False))
    more = f"<p class='meta'>{len(df) - max_rows} more rows in the CSV.</p>" if len(df) > max_rows else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


_STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}
th{background:#f4f4f4}.meta{color:#666}.note{background:#fff8e0;padding:6px 10px;margin:6px 0}"""


def comparison_report_html(comparison: Comparison, title: str = "") -> str:
    """The comparison as one standalone (offline) HTML page; every name and label is escaped."""
    title = title or f"Comparing {comparison.name_a} and {comparison.name_b}"
    matching = comparison.matching
    pair_columns = ["layer_a", "head_a", "behaviour_a", "layer_b", "head_b", "behaviour_b", "distance", "outlier"]
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in comparison.summary())
    notes = "".join(f"<div class='note'>{html.escape(note)}</div>"
                    for atlas in (comparison.atlas_a, comparison.atlas_b) for note in atlas.notes)
    probes = "".join(f"<li>{html.escape(label)}: {html.escape(atlas.probe)}</li>"
                     for label, atlas in (("A", comparison.atlas_a), ("B", comparison.atlas_b)))
    same_shape = ""
    if comparison.deltas is not None:
        heatmaps = "".join(_figure(delta_heatmap(comparison, m)) for m in ("induction", "previous_token",
                                                                            "duplicate_token", "copying"))
        changed = comparison.changed[["layer", "head", "behaviour_a", "behaviour_b", "largest_change",
                                      "largest_delta"]]
        same_shape = (f"<h2>Same shape: per-head changes</h2><p>A head has changed when its main behaviour "
                      f"differs or a main metric moved by {CHANGE_THRESHOLD} or more.</p>{heatmaps}"
                      f"<h3>Changed heads ({len(changed)})</h3>{_table(changed)}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style><script type="text/javascript">{get_plotlyjs()}</script></head>
<body><h1>{html.escape(title)}</h1><ul>{summary}</ul><p class="meta">Probe text:</p><ul>{probes}</ul>{notes}
<h2>Both atlases</h2>{_figure(side_by_side(comparison))}
{_figure(side_by_side(comparison, "attention_sink", "copying"))}
<h2>Behaviour by relative depth</h2>{_figure(depth_figure(comparison.depth))}
<h2>Heads matched by metric profile</h2><p>Profile: {html.escape(", ".join(MATCH_METRICS))}. Pairs minimise the
summed Euclidean distance (Hungarian method); outliers are past Tukey's fence
({matching.fence:.3f}).</p>{_figure(pairs_figure(matching, comparison.name_a, comparison.name_b))}
{_table(matching.pairs[pair_columns])}
<h3>Outliers ({len(matching.outliers)})</h3>{_table(matching.outliers.drop(columns=[
    c for c in matching.outliers.columns if c.endswith(("_a", "_b")) and c[:-2] in METRIC_COLUMNS]))}
{same_shape}</body></html>"""
