"""The circuit graph's HTML view: escaping of every label and tooltip, in the page and in a browser."""

import json
import os
import shutil
from pathlib import Path

import networkx as nx
import pytest

from headvis_core.circuits.graph import to_graphml, to_json
from headvis_core.viz.circuit_graph import role_colour, save_graph, to_html
from tests.circuits.test_graph import EVIL, EVIL_HREF, _evil_graph


def test_labels_and_tooltips_are_escaped():
    G = _evil_graph()
    page = to_html(G)
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>model" not in page
    nodes = json.loads(page.split("nodes = new vis.DataSet(")[1].split(");")[0])
    by_id = {n["id"]: n for n in nodes}
    assert "&lt;script&gt;alert(&#x27;role&#x27;)&lt;/script&gt;" in by_id["0.1"]["label"]
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in by_id["1.0"]["title"]
    legend = page.split('id="headvis-legend"')[1].split("</div></div>")[0]
    assert "&lt;script&gt;" in legend and "<script>" not in legend
    # GraphML and JSON carry the raw text, escaped by their own formats
    assert nx.parse_graphml(to_graphml(G)).nodes["0.1"]["atlas_role"] == EVIL
    assert json.loads(to_json(G))["nodes"][0]["atlas_role"] in (EVIL, EVIL_HREF)


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and shutil.which("chromium")), reason="chromium not installed")
def test_a_malicious_label_does_not_run_in_a_browser(tmp_path):
    """Open the HTML in headless Chromium and show every node's tooltip: no alert may fire."""
    playwright = pytest.importorskip("playwright.sync_api")
    path = save_graph(_evil_graph(), tmp_path / "evil.html")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        alerts = []
        page.on("dialog", lambda dialog: (alerts.append(dialog.message), dialog.dismiss()))
        page.goto(Path(path).as_uri())
        page.wait_for_function("typeof network !== 'undefined'", timeout=20_000)
        shown = page.evaluate("""() => nodes.getIds().map(id => {
            network.body.emitter.emit('showPopup', id);  // pyvis's own popup (innerHTML when a title has href)
            const popup = document.querySelector('.popup');
            return popup ? popup.innerText : '';
        })""")
        page.wait_for_timeout(300)
        browser.close()
    assert alerts == []
    assert any(EVIL_HREF.split(" href")[0] in text for text in shown)  # shown as text, not parsed as a tag


def test_role_colours_are_stable_and_unknown_roles_are_grey():
    assert role_colour("induction") == role_colour("Induction") == "#d62728"
    assert role_colour("previous-token") == role_colour("previous token")
    assert role_colour("unclassified") == role_colour("") == "#c7c7c7"
    assert role_colour(EVIL) == role_colour(EVIL) != "#c7c7c7"
