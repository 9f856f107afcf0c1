"""Figures of an edge attribution (headvis_core.viz.attribution): ranking, escaping, the path diagram."""

import html

import pandas as pd

from headvis_core.attribution import attribute_edge
from headvis_core.heads import HeadRef
from headvis_core.viz.attribution import offset_profile_figure, path_diagram_html, ranked_bars, top_tokens_bars


def test_ranked_bars_keep_the_largest_magnitudes_largest_on_top():
    frame = pd.DataFrame({"label": ["a", "<b>", "c", "d"], "value": [0.1, -3.0, 2.0, -0.5]})
    fig = ranked_bars(frame, "t", n=3)
    bar = fig.data[0]
    assert list(bar.y) == ["d", "c", "&lt;b&gt;"]  # plotly draws the last row at the top
    assert list(bar.x) == [-0.5, 2.0, -3.0]
    assert bar.marker.color[2] != bar.marker.color[1]  # negative and positive coloured apart


def test_path_diagram_shows_the_strongest_components_escaped(tiny_llama):
    model = tiny_llama.model
    result = attribute_edge(model, model.to_tokens("<script>alert(1)</script>"), HeadRef(1, 1), 12, 3)
    page = path_diagram_html(result, n=2)
    assert "<script" not in page and "&lt;" in page
    assert "head 1.1" in page
    for frame in (result.query_side(), result.key_side()):
        for label in frame.label.head(2):
            assert html.escape(label[:30]) in page
    assert page.count("says ") == 2
    assert len(top_tokens_bars(result.top_tokens).data[0].y) == len(result.top_tokens)
    profile = offset_profile_figure(result.offsets)
    assert list(profile.data[1].x) == [12 - 3]  # the edge's own offset is marked
