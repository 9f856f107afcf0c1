import json

import networkx as nx
import pandas as pd
import pytest
import torch

from headvis_core.circuits.composition import Baseline, CompositionResult, compute_composition, head_weights, io_scores
from headvis_core.circuits.graph import (
    EMBED,
    LOGITS,
    GraphFilter,
    all_edges,
    build_graph,
    edges_frame,
    role_comparison,
    select_edges,
    to_graphml,
    to_json,
)
from headvis_core.circuits.published_roles import PUBLISHED_ROLES_DIR, load_published_roles, published_roles_for
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.viz.circuit_graph import save_graph, to_html

EVIL = "<script>alert('role')</script>"
EVIL_HREF = '<img src=x onerror="alert(1)"> href'


def _result(n_layers=3, n_heads=2):
    """Hand-made scores: baseline mean 0.1, std 0.01; a few strong edges."""
    scores = {k: torch.full((n_layers, n_heads, n_layers, n_heads), 0.1) for k in "qkv"}
    for k in scores:
        for sl in range(n_layers):
            scores[k][sl, :, :sl + 1, :] = 0
    scores["k"][0, 1, 1, 0] = 0.5   # ratio 5
    scores["k"][0, 0, 2, 1] = 0.3   # ratio 3
    scores["q"][1, 0, 2, 1] = 0.25  # ratio 2.5
    scores["v"][0, 1, 2, 0] = 0.2   # ratio 2
    baselines = {k: Baseline(kind=k, mean=0.1, std=0.01, n_pairs=100, d_model=64, d_head=16) for k in "qkv"}
    return CompositionResult(scores=scores, baselines=baselines, ln_folded=True, folding_note="folded here",
                             n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, d_model=64, d_head=16)


def _pairs(G):
    return {(u, v) for u, v in G.edges()}


def test_threshold_top_k_heads_and_edge_limit():
    result = _result()
    G = build_graph(result, GraphFilter(threshold=2.0, top_k=None))
    assert _pairs(G) == {("0.1", "1.0"), ("0.0", "2.1"), ("1.0", "2.1"), ("0.1", "2.0")}
    assert G.edges["0.1", "1.0"]["kind"] == "k" and G.edges["0.1", "1.0"]["ratio"] == pytest.approx(5.0)
    assert G.edges["0.1", "1.0"]["z"] == pytest.approx(40.0)
    assert _pairs(build_graph(result, GraphFilter(measure="z", threshold=17, top_k=None))) == {
        ("0.1", "1.0"), ("0.0", "2.1")}
    assert _pairs(build_graph(result, GraphFilter(measure="score", threshold=0.26, top_k=None))) == {
        ("0.1", "1.0"), ("0.0", "2.1")}
    assert _pairs(build_graph(result, GraphFilter(kinds=("q", "v"), threshold=2.0, top_k=None))) == {
        ("1.0", "2.1"), ("0.1", "2.0")}
    assert _pairs(build_graph(result, GraphFilter(threshold=2.0, top_k=None, max_edges=2))) == {
        ("0.1", "1.0"), ("0.0", "2.1")}
    # only head 2.1 and its neighbours
    focused = build_graph(result, GraphFilter(threshold=2.0, top_k=None, heads=(HeadRef(2, 1),)))
    assert _pairs(focused) == {("0.0", "2.1"), ("1.0", "2.1")}
    # top-1 into/out of the chosen head keeps only its strongest in-edge
    assert _pairs(build_graph(result, GraphFilter(top_k=1, heads=(HeadRef(2, 1),)))) == {("0.0", "2.1")}
    # top-1 per node over the whole graph: every node keeps its single strongest in and out edge
    top1 = build_graph(result, GraphFilter(top_k=1))
    assert ("0.1", "1.0") in top1.edges and all(top1.in_degree(n) >= 1 for n in ("1.0", "2.0", "2.1"))


def test_no_edges_left_says_so_and_suggests_a_threshold_that_works():
    result = _result()
    with pytest.raises(InputError, match=r"No edge has ratio >= 9.*strongest has 5.*Try a threshold of") as err:
        build_graph(result, GraphFilter(threshold=9))
    suggested = float(str(err.value).split("Try a threshold of ")[1].split()[0])
    assert build_graph(result, GraphFilter(threshold=suggested, top_k=None)).number_of_edges() > 0
    with pytest.raises(InputError, match="touching 1.1"):
        build_graph(result, GraphFilter(threshold=4.0, heads=(HeadRef(1, 1),)))


def test_heads_out_of_range_and_bad_filters_are_clear_errors():
    result = _result()
    with pytest.raises(InputError, match="Head 3.0 is out of range: this model has layers 0-2 and heads 0-1"):
        build_graph(result, GraphFilter(heads=(HeadRef(3, 0),)))
    with pytest.raises(InputError, match="top-k"):
        build_graph(result, GraphFilter(top_k=0))
    with pytest.raises(InputError, match="measure"):
        build_graph(result, GraphFilter(measure="loudness"))
    with pytest.raises(InputError, match="edge kinds"):
        select_edges(all_edges(result), GraphFilter(kinds=("w",)), 3, 2)


def test_nodes_carry_layer_roles_importance_and_path_patching():
    from headvis_core.circuits.published_roles import PublishedRoles

    result = _result()
    atlas = pd.DataFrame({"layer": [0, 1], "head": [1, 0], "behaviour": ["previous-token", "induction"],
                          "confidence": [0.9, 0.8]})
    importance = pd.DataFrame({"layer": [1, 2], "head": [0, 1], "importance": [0.5, 0.25]})
    published = PublishedRoles(name="toy", source="a paper", models=("toy",),
                               roles={HeadRef(1, 0): "induction", HeadRef(0, 1): "previous token"}, descriptions={})
    patching = pd.DataFrame({"sender": ["0.1"], "receiver": ["1.0"], "kind": ["k"], "effect": [-0.7],
                             "normalized": [-0.35]})
    G = build_graph(result, GraphFilter(threshold=2.0, top_k=None), atlas=atlas, importance=importance,
                    published=published, patching=patching, model_name="toy")
    assert G.nodes["1.0"] == {"layer": 1, "head": 0, "kind": "head", "atlas_role": "induction",
                              "atlas_confidence": 0.8, "published_role": "induction", "importance": 0.5}
    assert G.nodes["0.1"]["atlas_role"] == "previous token" and "importance" not in G.nodes["0.1"]
    assert G.edges["0.1", "1.0"]["patch_effect"] == -0.7 and G.edges["0.1", "1.0"]["patch_normalized"] == -0.35
    assert "patch_effect" not in G.edges["0.0", "2.1"]
    assert G.graph["model"] == "toy" and G.graph["ln_folded"] is True
    comparison = role_comparison(published, atlas)
    assert comparison.set_index("head").agree.to_dict() == {"0.1": True, "1.0": True}


def test_exports_round_trip(tmp_path):
    result = _result()
    G = build_graph(result, GraphFilter(threshold=2.0, top_k=None), model_name="toy",
                    atlas=pd.DataFrame({"layer": [1], "head": [0], "behaviour": ["induction"]}))
    back = nx.parse_graphml(to_graphml(G))
    assert set(back.edges()) == set(G.edges()) and back.nodes["1.0"]["atlas_role"] == "induction"
    assert float(back.edges["0.1", "1.0"]["ratio"]) == pytest.approx(5.0)
    data = json.loads(to_json(G))
    assert {(e["source"], e["target"]) for e in data["edges"]} == set(G.edges())
    for suffix in ("graphml", "json", "html"):
        path = save_graph(G, tmp_path / f"graph.{suffix}")
        assert path.stat().st_size > 100
    page = (tmp_path / "graph.html").read_text()
    assert "vis-network" in page and "cdnjs" not in page
    with pytest.raises(InputError, match="graphml, .json or .html"):
        save_graph(G, tmp_path / "graph.png")
    assert set(edges_frame(G).columns) >= {"sender", "receiver", "kind", "score", "ratio", "z"}


def _evil_graph():
    result = _result()
    atlas = pd.DataFrame({"layer": [0, 1], "head": [1, 0], "behaviour": [EVIL, EVIL_HREF], "confidence": [0.9, 0.8]})
    return build_graph(result, GraphFilter(threshold=2.0, top_k=None), atlas=atlas, model_name="<b>model</b>")


def test_published_gpt2_ioi_roles():
    roles = published_roles_for("gpt2")
    assert roles is not None and "Wang" in roles.source
    assert published_roles_for("openai-community/gpt2") is not None
    assert published_roles_for("smollm2-135m") is None and published_roles_for("gpt2-small-random") is None
    expected = {"name mover": ["9.6", "9.9", "10.0"], "negative name mover": ["10.7", "11.10"],
                "S-inhibition": ["7.3", "7.9", "8.6", "8.10"], "induction": ["5.5", "5.8", "5.9", "6.9"],
                "duplicate token": ["0.1", "0.10", "3.0"], "previous token": ["2.2", "4.11"],
                "backup name mover": ["9.0", "9.7", "10.1", "10.2", "10.6", "10.10", "11.2", "11.9"]}
    for role, heads in expected.items():
        assert [str(h) for h in roles.heads_with(role)] == heads
    assert len(roles.roles) == sum(map(len, expected.values()))


def test_a_malformed_roles_file_is_a_clear_error(tmp_path):
    from headvis_core.errors import CorruptFileError

    (tmp_path / "bad.json").write_text('{"roles": {"x": {"heads": ["nine"]}}}')
    with pytest.raises(CorruptFileError, match="bad.json"):
        load_published_roles(tmp_path / "bad.json")
    assert (PUBLISHED_ROLES_DIR / "gpt2_ioi.json").is_file()


def test_graph_on_a_real_random_model_with_embedding_and_logits_nodes(tiny_llama):
    model = tiny_llama.model
    result = compute_composition(model, baseline_heads=16)
    io = io_scores(model, head_weights(model), baseline_heads=8)
    G = build_graph(result, GraphFilter(kinds=("q", "k", "v", "out"), top_k=2), io=io, model_name="tiny-llama")
    assert EMBED in G and LOGITS in G
    assert all(G.edges[u, v]["kind"] == "out" for u, v in G.in_edges(LOGITS))
    assert all(G.nodes[n]["layer"] == 2 for n in [LOGITS]) and G.nodes[EMBED]["layer"] == -1
    page = to_html(G)
    assert '"id": "embed"' in page and '"id": "logits"' in page


def test_the_graph_command_writes_files_and_reports_bad_input(tmp_path, capsys):
    from headvis_core.cli.main import main

    out = tmp_path / "graph.json"
    assert main(["graph", "--model", "tiny-gpt2", "--device", "cpu", "--kinds", "k,v", "--top-k", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Layer norm is folded here" in printed and "random baseline K" in printed and f"wrote {out}" in printed
    data = json.loads(out.read_text())
    assert data["edges"] and {e["kind"] for e in data["edges"]} <= {"k", "v"}
    for args, message in [(["--threshold", "50"], "Try a threshold of"), (["--heads", "4.0"], "out of range"),
                          (["--kinds", "q,w"], "Unknown composition kind"), (["--out", "graph.png"], ".graphml")]:
        assert main(["graph", "--model", "tiny-gpt2", "--device", "cpu", *args]) == 2
        assert message in capsys.readouterr().err
