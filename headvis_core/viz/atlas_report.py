"""The head atlas as one standalone HTML file that opens offline.

Plotly.js is inlined once; the overview figures follow, then one passport
card per head (metric bars with percentiles, behaviours, top attended tokens,
and its attention pattern, drawn when the card is opened). Every token and
note is escaped: a probe text holding ``<script>`` shows it, never runs it.
"""

import html
import json
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from headvis_core.atlas.classes import rules_table
from headvis_core.atlas.run import METRICS, AtlasResult, passport
from headvis_core.heads import HeadRef
from headvis_core.tokens import token_labels, visible
from headvis_core.viz.atlas import BEHAVIOUR_COLOURS, behaviour_counts, head_scatter, layer_heatmap

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { margin-bottom: 0; } .meta { color: #555; } .note { background: #fff7e0; padding: 6px 10px; margin: 4px 0; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
details.card { border: 1px solid #ccc; border-radius: 6px; margin: 6px 0; padding: 4px 10px; }
details.card summary { cursor: pointer; font-weight: 600; }
.badge { display: inline-block; color: white; border-radius: 4px; padding: 0 6px; margin-right: 4px; font-size: 90%; }
.bars td { border: none; padding: 1px 6px; } .bar { background: #4c78a8; height: 12px; }
.bartrack { background: #eee; width: 220px; } .pattern { width: 460px; height: 440px; }
.cardbody { display: flex; flex-wrap: wrap; gap: 18px; }
"""

_SCRIPT = """
function drawPattern(card) {
  const target = card.querySelector('.pattern');
  if (!target || target.dataset.drawn) return;
  const data = JSON.parse(document.getElementById('atlas-patterns').textContent);
  const head = data.heads[card.dataset.head];
  const labels = data.examples[head.example];
  Plotly.newPlot(target, [{z: head.z, x: labels, y: labels, type: 'heatmap', zmin: 0,
    colorscale: [[0, '#f7fbff'], [1, '#08306b']],
    hovertemplate: 'query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>'}],
    {title: {text: 'attention on ' + head.label}, margin: {t: 40, l: 90, b: 90, r: 10},
     xaxis: {type: 'category', tickangle: -60}, yaxis: {type: 'category', autorange: 'reversed'}},
    {displayModeBar: false});
  target.dataset.drawn = '1';
}
document.querySelectorAll('details.card').forEach(card =>
  card.addEventListener('toggle', () => { if (card.open) drawPattern(card); }));
"""


def _json_for_script(value: Any) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>``, ``<!--`` or ``&`` can appear)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _figure(fig: go.Figure) -> str:
    return fig.to_html(include_plotlyjs=False, full_html=False, config={"displaylogo": False})


def _table_html(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _card(result: AtlasResult, head: HeadRef) -> str:
    card = passport(result, head)
    colour = BEHAVIOUR_COLOURS.get(card.behaviour, "#777")
    bars = "".join(
        f"<tr><td>{html.escape(label)}</td><td class='bartrack'><div class='bar' style='width:{pct:.0f}%'></div>"
        f"</td><td>{value:.3f}</td><td>{pct:.0f}th pct</td></tr>"
        for label, value, pct in zip(card.metrics.label, card.metrics.value, card.metrics.percentile))
    tokens = "".join(f"<tr><td><code>{html.escape(visible(t))}</code></td><td>{share:.1%}</td></tr>"
                     for t, share in card.top_tokens) or "<tr><td>none</td></tr>"
    held = html.escape(card.behaviours) if card.behaviours else "none"
    return (f"<details class='card' data-head='{head}' id='head-{head}'><summary>"
            f"Head {head} <span class='badge' style='background:{colour}'>{html.escape(card.behaviour)}</span> "
            f"confidence {card.confidence:.2f}</summary><p>Behaviours held: {held}</p>"
            f"<div class='cardbody'><div><table class='bars'>{bars}</table>"
            f"<p><b>Top attended tokens</b> (share of attention outside position 0)</p><table>{tokens}</table></div>"
            f"<div class='pattern'></div></div></details>")


def _pattern_data(result: AtlasResult) -> dict[str, Any]:
    heads = {}
    for _, row in result.table.iterrows():
        head = HeadRef(int(row.layer), int(row["head"]))
        name = "induction" if row.behaviour == "induction" else "text"
        example = result.examples[name]
        heads[str(head)] = {"example": name, "label": example.label,
                            "z": example.patterns[head.layer, head.head].round(3).tolist()}
    examples = {name: token_labels(example.str_tokens) for name, example in result.examples.items()}
    return {"heads": heads, "examples": examples}


def atlas_report_html(result: AtlasResult, title: str = "") -> str:
    """The whole atlas (overview, layer breakdown, every head's passport card) as one offline HTML page."""
    table = result.table
    title = title or f"Head atlas: {result.model_name or 'model'}"
    notes = "".join(f"<div class='note'>{html.escape(n)}</div>" for n in result.notes)
    metric_rows = [[m.column, m.label, m.definition] for m in METRICS]
    rules = rules_table(result.model_name)
    rule_rows = [[r.behaviour, r.score, f"{r.threshold:g}", f"{r.saturation:g}", r.meaning] for r in rules.itertuples()]
    summary = table.behaviour.value_counts()
    summary_rows = [[name, int(count)] for name, count in summary.items()]
    heatmaps = "".join(_figure(layer_heatmap(table, m.column)) for m in METRICS)
    cards = "".join(_card(result, HeadRef(int(r.layer), int(r.head))) for r in table.itertuples())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style><script type="text/javascript">{get_plotlyjs()}</script></head>
<body><h1>{html.escape(title)}</h1>
<p class="meta">{result.n_layers} layers x {result.n_heads} heads. Probe: {html.escape(result.probe)}.
Computed in {result.seconds:.1f} s.</p>{notes}
<h2>Behaviours</h2>{_table_html(summary_rows, ["behaviour", "heads"])}
<details><summary>How heads are classified</summary>{_table_html(rule_rows, ["behaviour", "score", "threshold",
"saturation", "meaning"])}<p>Confidence = (1 + strength) / 2 x (1 + rarity) / 2, strength = how far past the
threshold towards saturation, rarity = fraction of other heads scoring lower. Each threshold is at least the
largest score of any head of a baseline model (SmolLM2-135M with every attention weight shuffled), so chance
structure earns no label.</p></details>
<details><summary>Metric definitions</summary>{_table_html(metric_rows, ["column", "name", "definition"])}</details>
<h2>Overview</h2>{_figure(head_scatter(table, "previous_token", "induction"))}
{_figure(head_scatter(table, "copying", "direct_copying"))}
{_figure(head_scatter(table, "retrieval", "direct_copying"))}
{_figure(head_scatter(table, "logit_z_score", "key_token_entropy"))}
<h2>Layer breakdown</h2>{_figure(behaviour_counts(table))}{heatmaps}
<h2>Passport cards</h2><p>Open a card to draw the head's attention pattern.</p>{cards}
<script type="application/json" id="atlas-patterns">{_json_for_script(_pattern_data(result))}</script>
<script>{_SCRIPT}</script></body></html>"""
