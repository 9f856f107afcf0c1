import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from headvis_core.sparse_attention import SparseAttention, sparse_from_dense
from headvis_core.viz.token_view import script_json, token_view_html

VOID = {"meta", "br", "input", "img", "hr", "link"}
NASTY = ["<|endoftext|>", "<script>alert(1)</script>", " </script><!--", "&amp;", "\u202eevil", "a\u200bb",
         "\n", "\t", "\u00e9\u0301", "\U0001F600", "\"'", "\x00"]


class TagChecker(HTMLParser):
    """Fails on a closing tag that does not match the open one; records text and script bodies."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.scripts, self.spans, self.in_span = [], [], [], False

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)
        self.in_span = tag == "span"
        if tag == "span":
            self.spans.append("")

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        self.in_span = False

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "script":
            self.scripts.append(data)
        elif self.in_span:
            self.spans[-1] += data


def random_pattern(n, seed=0):
    rng = np.random.default_rng(seed)
    p = np.tril(rng.random((n, n)) + 0.01)
    return p / p.sum(1, keepdims=True)


def parse(html):
    checker = TagChecker()
    checker.feed(html)
    checker.close()
    assert checker.stack == []
    return checker


def data_of(html):
    script = html[html.index("const DATA = ") + len("const DATA = "):]
    return json.loads(script[:script.index(";\n(function")])


def test_tokens_are_escaped_and_the_document_is_well_formed():
    html = token_view_html(NASTY, random_pattern(len(NASTY)), title="<b>head 1.2</b>")
    assert html.count("<script") == 1 and html.count("</script") == 1  # only our own script element
    assert "<!--" not in html and "\u202e" not in html and "\u200b" not in html and "\x00" not in html
    assert "&lt;b&gt;head 1.2&lt;/b&gt;" in html
    checker = parse(html)
    assert checker.spans == ["<|endoftext|>", "<script>alert(1)</script>", "\u00b7</script><!--", "&amp;",
                             "<U+202E>evil", "a<U+200B>b", "\u21b5", "\u21e5", "\u00e9\u0301", "\U0001F600", "\"'",
                             "<U+0000>"]
    assert data_of(html)["tokens"] == checker.spans  # the script's copy decodes to the same labels
    assert "<br>" in html.split("\u21b5</span>")[1][:4]  # a line break after a newline token


def test_script_json_cannot_close_the_script():
    text = script_json({"t": "</script><!-- & \u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"t": "</script><!-- & \u2028"}


def test_sparse_view_keeps_top_keys_and_sums_received_attention():
    p = random_pattern(9, seed=1)
    sparse = sparse_from_dense(p, top_k=3)
    for q in range(9):
        expected = (np.argsort(-p[q, 1:], kind="stable")[:3] + 1)
        assert sparse.keys[q].tolist() == expected.tolist()
        assert sparse.values[q] == pytest.approx(p[q, expected])
    data = data_of(token_view_html([f"t{i}" for i in range(9)], sparse_from_dense(p, top_k=9), top_k=9))
    received = [p[:, k].sum() if k else 0.0 for k in range(9)]
    paid = [0.0] + [1 - p[q, 0] for q in range(1, 9)]
    assert data["received"] == pytest.approx(received, abs=1e-4)
    assert data["paid"] == pytest.approx(paid, abs=1e-4)
    assert data["keys"][5] == [[k, pytest.approx(p[5, k], abs=1e-4)] for k in np.argsort(-p[5, 1:6])[:9] + 1]
    attenders = sorted(((p[q, 2], q) for q in range(2, 9)), reverse=True)
    assert [q for q, _ in data["queries"][2]] == [q for _, q in attenders]


def test_long_prompt_window_stays_small():
    n = 2000
    rng = np.random.default_rng(0)
    keys = np.stack([np.minimum(rng.integers(1, 50, 4), q).clip(min=0) for q in range(n)])
    values = rng.random((n, 4)).astype(np.float32) / 4
    values[0] = 0
    html = token_view_html([f"w{i}" for i in range(n)], SparseAttention(keys, values), top_k=4, start=1000, stop=1200)
    checker = parse(html)
    assert checker.spans == [f"w{i}" for i in range(1000, 1200)]
    assert "positions 1000-1199 of 2000" in html
    assert len(html) < 400_000  # about n * top_k entries, not n * n


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError):
        token_view_html(["a", "b"], random_pattern(3))
    with pytest.raises(ValueError):
        token_view_html(["a"], random_pattern(1), colour_by="loud")


FAKE_DOM = r"""
class El { constructor(tag){ this.tag=tag; this.children=[]; this.style={}; this.dataset={}; this.listeners={};
  this.textContent=''; const c=new Set(); this.classList={add:x=>c.add(x), remove:x=>c.delete(x), has:x=>c.has(x)}; }
  addEventListener(e,f){ this.listeners[e]=f; } append(...xs){ this.children.push(...xs); }
  replaceChildren(...xs){ this.children=xs; } scrollIntoView(){} }
const spans = SPAN_IDS.map(i => { const s = new El('span'); s.dataset.i = String(i); return s; });
const panel = new El('div');
const radios = [new El('input')];
global.document = { querySelectorAll: sel => sel === '.tok' ? spans : radios, getElementById: () => panel,
  createElement: tag => new El(tag) };
SCRIPT
const text = () => panel.children.map(c => c.textContent).join(' | ');
const out = { initial: spans.map(s => s.style.background) };
spans[HOVER].listeners.mouseenter(); out.hover = text(); out.hoverColours = spans.map(s => s.style.background);
spans[HOVER].listeners.mouseleave(); out.left = panel.textContent;
spans[HOVER].listeners.click(); spans[0].listeners.mouseleave(); out.pinned = text();
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_script_runs_and_hover_lists_top_keys_and_attenders():
    p = random_pattern(6, seed=2)
    tokens = ["<bos>", "a", "</script>", "c", "d", "e"]
    html = token_view_html(tokens, p, top_k=2)
    script = parse(html).scripts[0]
    js = FAKE_DOM.replace("SPAN_IDS", "[0,1,2,3,4,5]").replace("HOVER", "4").replace("SCRIPT", script)
    run = subprocess.run(["node", "-e", js], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    top2 = np.argsort(-p[4, 1:5])[:2] + 1
    labels = {1: "1:a", 2: "2:</script>", 3: "3:c", 4: "4:d"}
    assert out["hover"].startswith("token 4:d")
    listed = re.findall(r"(\d+:\S+) ([\d.]+)", out["hover"].split("attends to: ")[1].split(" | ")[0])
    assert [name for name, _ in listed] == [labels[k] for k in top2]
    assert [float(v) for _, v in listed] == pytest.approx([p[4, k] for k in top2], abs=6e-4)
    assert "attended by: " in out["hover"]
    assert out["hoverColours"][top2[0]].startswith("rgba(40, 100, 220")  # keys in blue
    assert out["left"] == "Hover or click a token." and out["pinned"].startswith("token 4:d")
    assert all(c.startswith("rgba(220, 60, 60") for c in out["initial"])
