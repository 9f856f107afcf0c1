"""A self-contained HTML view of one head's attention over a sequence of tokens.

Tokens are coloured by the attention they receive (summed over queries) or
pay (to tokens other than position 0, the usual attention sink). Hovering a
token shows where it attends (its top keys, blue) and what attends to it
(its top queries, orange), with values, in a panel; clicking pins that token.

Only the top ``top_k`` keys of each query travel to the browser, so the view
stays small for prompts as long as the model's context; ``start``/``stop``
show a window of positions. Every token is HTML-escaped where it is written
as markup, and the data for the script is JSON with ``<``, ``>`` and ``&``
written as ``\\u003c``-style escapes, so a prompt holding ``</script>`` or
``<!--`` cannot end the script early. Control and invisible formatting
characters are shown as ``<U+200B>``-style codes, and each token is
bidi-isolated so a right-to-left override cannot reorder its neighbours.
"""

import html
import json
import unicodedata
from typing import Optional, Sequence

import numpy as np
import torch

from headvis_core.sparse_attention import SparseAttention, sparse_from_dense
from headvis_core.tokens import visible

COLOUR_MODES = ("received", "paid")


def _printable(text: str) -> str:
    """Whitespace visible (as in axis labels) and control/format characters shown by code point."""
    out = []
    for ch in visible(text):
        category = unicodedata.category(ch)
        if category in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") and ch not in "\u00b7\u21b5\u21e5\u240d":
            out.append(f"<U+{ord(ch):04X}>")
        else:
            out.append(ch)
    return "".join(out) or "\u2205"


def script_json(data: object) -> str:
    """JSON that is safe to place inside a ``<script>`` element."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _attention_summaries(sparse: SparseAttention, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Attention received per key (summed over the kept entries) and paid per query (to positions >= 1)."""
    received = np.zeros(n_tokens)
    valid = sparse.values > 0
    np.add.at(received, sparse.keys[valid], sparse.values[valid])
    if sparse.first is not None:
        paid = 1.0 - np.asarray(sparse.first, float)
        if n_tokens:
            paid[0] = 0.0
    else:
        paid = np.where(sparse.keys > 0, sparse.values, 0.0).sum(axis=1)
    if n_tokens:
        received[0] = 0.0  # position 0 receives the sink attention, which would swamp the colour scale
    return received, np.clip(paid, 0.0, None)


def _reverse_index(sparse: SparseAttention, n_tokens: int, top_k: int) -> list[list[list[float]]]:
    """For each key position, its top ``top_k`` queries ``[query, value]`` among the kept entries."""
    attenders: list[list[tuple[float, int]]] = [[] for _ in range(n_tokens)]
    for q in range(sparse.n_queries):
        for key, value in zip(sparse.keys[q], sparse.values[q]):
            if value > 0:
                attenders[int(key)].append((float(value), q))
    out = []
    for entries in attenders:
        entries.sort(key=lambda e: (-e[0], e[1]))
        out.append([[q, round(v, 4)] for v, q in entries[:top_k]])
    return out


def token_view_html(str_tokens: Sequence[str], attention: SparseAttention | torch.Tensor | np.ndarray, *,
                    title: str = "", colour_by: str = "received", top_k: int = 8, start: int = 0,
                    stop: Optional[int] = None, selected: Optional[int] = None, exclude_first: bool = True,
                    max_height: int = 420) -> str:
    """A full HTML document showing one head's attention over ``str_tokens``.

    Args:
        str_tokens: the tokens, one string each (position 0 is usually BOS).
        attention: a dense ``[query, key]`` pattern or a :class:`SparseAttention`.
        colour_by: ``"received"`` or ``"paid"`` (switchable in the view).
        top_k: keys kept per query, and queries listed per key.
        start, stop: the window of positions shown (keys outside it are still listed by name).
        selected: a query position to pin when the view opens.
        exclude_first: when given a dense pattern, choose top keys among positions 1..
    """
    if colour_by not in COLOUR_MODES:
        raise ValueError(f"colour_by must be one of {COLOUR_MODES}")
    n = len(str_tokens)
    sparse = attention if isinstance(attention, SparseAttention) else sparse_from_dense(attention, top_k, exclude_first)
    if sparse.n_queries != n:
        raise ValueError(f"{n} tokens but attention for {sparse.n_queries} queries")
    stop = n if stop is None else min(stop, n)
    start = max(0, min(start, stop))
    received, paid = _attention_summaries(sparse, n)
    labels = [_printable(t) for t in str_tokens]
    keys_of = [[[int(k), round(float(v), 4)] for k, v in zip(sparse.keys[q][:top_k], sparse.values[q][:top_k]) if v > 0]
               for q in range(n)]
    data = {
        "tokens": labels,
        "keys": keys_of,
        "queries": _reverse_index(sparse, n, top_k),
        "first": None if sparse.first is None else [round(float(x), 4) for x in sparse.first],
        "received": [round(float(x), 4) for x in received],
        "paid": [round(float(x), 4) for x in paid],
        "mode": colour_by,
        "selected": selected if selected is not None and 0 <= selected < n else None,
    }
    spans = []
    for i in range(start, stop):
        newline = "<br>" if "\n" in str_tokens[i] else ""
        spans.append(f'<span class="tok" data-i="{i}" title="position {i}">{html.escape(labels[i])}</span>{newline}')
    window_note = f"positions {start}-{stop - 1} of {n}" if (start, stop) != (0, n) else f"{n} tokens"
    heading = f"<div class=\"title\">{html.escape(title)}</div>" if title else ""
    return _TEMPLATE.format(
        heading=heading, window_note=html.escape(window_note), spans="".join(spans), max_height=int(max_height),
        data=script_json(data), received_checked=" checked" if colour_by == "received" else "",
        paid_checked=" checked" if colour_by == "paid" else "")


_TEMPLATE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><style>
body {{ font-family: ui-sans-serif, system-ui, sans-serif; font-size: 14px; margin: 4px; color: #222; }}
.title {{ font-weight: 600; margin-bottom: 4px; }}
.bar {{ font-size: 12px; color: #555; margin-bottom: 4px; }}
.text {{ max-height: {max_height}px; overflow: auto; border: 1px solid #ddd; padding: 6px;
  font-family: ui-monospace, monospace; overflow-wrap: anywhere; }}
.tok {{ display: inline-block; unicode-bidi: isolate; padding: 0 1px; margin: 1px 1px; border-radius: 3px;
  cursor: pointer; border: 1px solid transparent; line-height: 1.5; white-space: pre-wrap; overflow-wrap: anywhere; }}
.tok.focus {{ border-color: #000; }}
.panel {{ font-size: 12px; margin-top: 6px; min-height: 4.5em; font-family: ui-monospace, monospace; }}
.panel .k {{ color: #1f4e9c; }} .panel .q {{ color: #a0501a; }}
</style></head><body>
{heading}<div class="bar">{window_note}. Colour by
<label><input type="radio" name="mode" value="received"{received_checked}> attention received</label>
<label><input type="radio" name="mode" value="paid"{paid_checked}> attention paid (to positions after 0)</label>.
Hover a token: blue = its top keys, orange = what attends to it; click to pin.</div>
<div class="text" id="text">{spans}</div>
<div class="panel" id="panel">Hover or click a token.</div>
<script>
const DATA = {data};
(function () {{
  const spans = Array.from(document.querySelectorAll(".tok"));
  const byPos = new Map(spans.map(s => [Number(s.dataset.i), s]));
  const panel = document.getElementById("panel");
  let pinned = DATA.selected;
  let mode = DATA.mode;
  function scale(values) {{ let m = 0; for (const v of values) m = Math.max(m, v); return m > 0 ? m : 1; }}
  function base() {{
    const values = DATA[mode];
    const top = scale(values);
    for (const s of spans) {{
      const a = values[Number(s.dataset.i)] / top;
      s.style.background = "rgba(220, 60, 60, " + (0.85 * a).toFixed(3) + ")";
      s.classList.remove("focus");
    }}
  }}
  function label(i) {{ return i + ":" + DATA.tokens[i]; }}
  function line(cls, prefix, entries) {{
    const div = document.createElement("div");
    div.className = cls;
    const shown = entries.map(e => label(e[0]) + " " + e[1].toFixed(3));
    div.textContent = prefix + (entries.length ? shown.join(",  ") : "none");
    return div;
  }}
  function show(i) {{
    for (const s of spans) {{ s.style.background = "transparent"; s.classList.remove("focus"); }}
    const shade = v => Math.min(1, 0.15 + v).toFixed(3);
    for (const [k, v] of DATA.keys[i]) {{
      const s = byPos.get(k);
      if (s) s.style.background = "rgba(40, 100, 220, " + shade(v) + ")";
    }}
    for (const [q, v] of DATA.queries[i]) {{
      const s = byPos.get(q);
      if (s && q !== i) s.style.background = "rgba(240, 140, 40, " + shade(v) + ")";
    }}
    const own = byPos.get(i); if (own) own.classList.add("focus");
    panel.replaceChildren();
    const head = document.createElement("div");
    const sink = DATA.first ? "  (attention to position 0: " + DATA.first[i].toFixed(3) + ")" : "";
    head.textContent = "token " + label(i) + sink;
    panel.append(head, line("k", "attends to: ", DATA.keys[i]), line("q", "attended by: ", DATA.queries[i]));
  }}
  function refresh() {{
    if (pinned === null) {{ base(); panel.textContent = "Hover or click a token."; }} else show(pinned);
  }}
  for (const s of spans) {{
    const i = Number(s.dataset.i);
    s.addEventListener("mouseenter", () => show(i));
    s.addEventListener("mouseleave", refresh);
    s.addEventListener("click", () => {{ pinned = (pinned === i) ? null : i; refresh(); }});
  }}
  for (const r of document.querySelectorAll("input[name=mode]")) {{
    r.addEventListener("change", e => {{ mode = e.target.value; pinned = null; refresh(); }});
  }}
  refresh();
  if (pinned !== null && byPos.get(pinned)) byPos.get(pinned).scrollIntoView({{block: "nearest"}});
}})();
</script></body></html>
"""

