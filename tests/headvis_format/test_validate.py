"""The contract validator: each fact the frontend relies on, broken, is found and named by file and field.

Errors (the frontend breaks or shows nothing) are refused by the import; warnings (a failed fetch in the
console, a lost view) only by the strict check the export passes. A tree in the shape Neuronpedia's
``compute-head-metrics.py`` writes is read.
"""

import json
import shutil

import numpy as np
import pytest

from headvis_core.errors import CorruptFileError
from headvis_core.heads import HeadRef
from headvis_core.headvis_format.export import export_headvis
from headvis_core.headvis_format.importer import import_headvis
from headvis_core.headvis_format.validate import ERROR, WARNING, check_tree, validate_tree
from tests.headvis_format.scans import tiny_scan


@pytest.fixture(scope="module")
def good_tree(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("validate") / "data"
    export_headvis(tiny_scan(tiny_llama, tmp_path_factory.mktemp("scan")), out)
    add_umap(out)
    return out


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def add_umap(tree):
    """A hand-made, valid umap/ for head 0.0 (PCA plus one UMAP view, one cluster) in the frontend's shape."""
    sequences = [s["tokens"] for s in read(tree / "heads/L0H0.json")["sequences"][:2]]
    coords = {"d0": [0.1, -0.2, 0.3], "d1": [0.0, 1.0, 2.0], "d2": [0.5, 0.5, 0.5]}
    write(tree / "umap/sequences.json", sequences)
    write(tree / "umap/L0H0.json", {
        "seq_idx": [0, 1, 1], "top_q": [3, 4, 5], "top_k": [1, 2, 5], "norms": [0.5, 0.25, 1.0],
        "pca": {kind: coords for kind in "QKOV"},
        "views": [{"embeddings": {kind: coords for kind in "QKOV"}, "n_neighbors": 2, "min_dist": 0.1}],
        "clusters": [{"name": "first", "points": [[0, 3, 1]]}]})
    config = read(tree / "config.json")
    config.update(has_umap=True, umap_heads=[[0, 0]])
    write(tree / "config.json", config)


def edit(file, change):
    """Change the parsed file in place (what ``change`` returns is ignored) and write it back."""
    def apply(tree):
        path = tree / file
        data = read(path)
        change(data)
        write(path, data)
    return apply


def remove(file):
    return lambda tree: (tree / file).unlink()


def seq0(change):
    return lambda data: change(data["sequences"][0])


def drop_projections(data):
    del data["pca"], data["views"]


def set_index(data):
    seq = data["sequences"][0]
    seq["attention_indices"][-1] = seq["seq_len"] ** 2


# name: (how to break the tree, file named, field named)
ERRORS = {
    # config.json
    "n_intervals missing": (edit("config.json", lambda d: d.pop("n_intervals")), "config.json", "n_intervals"),
    "n_intervals zero": (edit("config.json", lambda d: d.update(n_intervals=0)), "config.json", "n_intervals"),
    "heads missing": (edit("config.json", lambda d: d.pop("heads")), "config.json", "heads"),
    "head outside the model": (edit("config.json", lambda d: d["heads"].__setitem__(0, [9, 0])),
                               "config.json", "heads[0]"),
    "head listed twice": (edit("config.json", lambda d: d["heads"].__setitem__(1, [0, 0])), "config.json",
                          "heads[1]"),
    "pattern without {head}": (edit("config.json", lambda d: d.update(head_data_pattern="L{layer}.json")),
                               "config.json", "head_data_pattern"),
    "model name not a string": (edit("config.json", lambda d: d.update(model_name=7)), "config.json",
                                "model_name"),
    "descriptions not an object": (edit("config.json", lambda d: d.update(metric_descriptions=["x"])),
                                   "config.json", "metric_descriptions"),
    "has_umap not a boolean": (edit("config.json", lambda d: d.update(has_umap="yes")), "config.json", "has_umap"),
    "umap head not a head": (edit("config.json", lambda d: d.update(umap_heads=[[5, 5]])), "config.json",
                             "umap_heads[0]"),
    "repeated table key": (edit("config.json", lambda d: d["custom_tables"].append(dict(d["custom_tables"][0]))),
                           "config.json", "custom_tables[2].key"),
    "plot without label": (edit("config.json", lambda d: d["custom_plots"][0].pop("label")), "config.json",
                           "custom_plots[0]"),
    "statistics display not an object": (edit("config.json", lambda d: d.update(statistics_display=[])),
                                         "config.json", "statistics_display"),
    "config not JSON": (lambda t: (t / "config.json").write_text('{"n_intervals": NaN}'), "config.json", "(file)"),
    "config missing": (remove("config.json"), "config.json", "(file)"),
    # scatter_data.json
    "default axis not a column": (edit("config.json", lambda d: d["scatter"].update(default_x="induction")),
                                  "config.json", "scatter.default_x"),
    "default axis null for every head": (edit("scatter_data.json", lambda d: [r.update(top_decile_from=None)
                                                                             for r in d]),
                                         "config.json", "scatter.default_y"),
    "metric a string": (edit("scatter_data.json", lambda d: d[2].update(top_score="high")), "scatter_data.json",
                        "[2].top_score"),
    "layer a string": (edit("scatter_data.json", lambda d: d[1].update(layer="0")), "scatter_data.json",
                       "[1].layer/head"),
    "head row twice": (edit("scatter_data.json", lambda d: d.append(dict(d[0]))), "scatter_data.json", "[8]"),
    "scatter empty": (edit("scatter_data.json", lambda d: d.clear()), "scatter_data.json", "(top level)"),
    "scatter missing": (remove("scatter_data.json"), "scatter_data.json", "(file)"),
    # heads/
    "interval as a string": (edit("heads/L1H1.json", seq0(lambda s: s.update(interval="10"))), "heads/L1H1.json",
                             "sequences[0].interval"),
    "interval above n": (edit("heads/L1H1.json", seq0(lambda s: s.update(interval=11))), "heads/L1H1.json",
                         "sequences[0].interval"),
    "interval as a float": (edit("heads/L1H1.json", seq0(lambda s: s.update(interval=3.0))), "heads/L1H1.json",
                            "sequences[0].interval"),
    "COO index out of bounds": (edit("heads/L0H3.json", set_index), "heads/L0H3.json",
                                "sequences[0].attention_indices"),
    "COO lists of two lengths": (edit("heads/L0H3.json", seq0(lambda s: s["attention_values"].pop())),
                                 "heads/L0H3.json", "sequences[0].attention_indices"),
    "attention above 1": (edit("heads/L0H3.json", seq0(lambda s: s["attention_values"].__setitem__(0, 2.0))),
                          "heads/L0H3.json", "sequences[0].attention_values"),
    "seq_len not len(tokens)": (edit("heads/L0H0.json", lambda d: d["sequences"][1].update(seq_len=3)),
                                "heads/L0H0.json", "sequences[1].seq_len"),
    "max_activation null": (edit("heads/L0H0.json", seq0(lambda s: s.update(max_activation=None))),
                            "heads/L0H0.json", "sequences[0].max_activation"),
    "token not a string": (edit("heads/L0H0.json", seq0(lambda s: s["tokens"].__setitem__(0, 5))),
                           "heads/L0H0.json", "sequences[0].tokens"),
    "sequence without id": (edit("heads/L0H0.json", seq0(lambda s: s.pop("sequence_id"))), "heads/L0H0.json",
                            "sequences[0].sequence_id"),
    "sequences not a list": (edit("heads/L0H2.json", lambda d: d.update(sequences={})), "heads/L0H2.json",
                             "sequences"),
    "top token without weight": (edit("heads/L1H0.json", lambda d: d["top_key_tokens"][0].pop("weight")),
                                 "heads/L1H0.json", "top_key_tokens"),
    "top token weight a string": (edit("heads/L1H0.json", lambda d: d["top_query_tokens"][0].update(weight="1")),
                                  "heads/L1H0.json", "top_query_tokens"),
    "plot with as many edges as values": (edit("heads/L1H2.json", lambda d: d["qk_distance_histogram"][
        "bin_edges"].pop()), "heads/L1H2.json", "qk_distance_histogram"),
    "activation histogram broken": (edit("heads/L1H2.json", lambda d: d["histogram"].pop("bin_values")),
                                    "heads/L1H2.json", "histogram"),
    "NaN in a head file": (lambda t: (t / "heads/L0H2.json").write_text(
        (t / "heads/L0H2.json").read_text().replace('"max_activation":', '"max_activation":NaN,"x":', 1)),
        "heads/L0H2.json", "(file)"),
    "head file missing": (remove("heads/L1H3.json"), "heads/L1H3.json", "(file)"),
    "repeated key in an object": (lambda t: (t / "heads/L1H3.json").write_text('{"sequences": [], "sequences": []}'),
                                  "heads/L1H3.json", "sequences"),
    # custom_sequences/
    "custom sequences not a list": (edit("custom_sequences/L0H1.json", lambda d: d.update(sequences=None)),
                                    "custom_sequences/L0H1.json", "sequences"),
    "custom sequence without max_activation": (
        edit("custom_sequences/L0H1.json", lambda d: d["sequences"].append({
            "sequence_id": "c1", "tokens": ["a"], "attention_indices": [0], "attention_values": [1.0],
            "seq_len": 1})), "custom_sequences/L0H1.json", "sequences[0].max_activation"),
    # server_config.json, attributions/manifest.json
    "server config a list": (lambda t: write(t / "server_config.json", []), "server_config.json", "(top level)"),
    "attribution entry without ov": (edit("attributions/manifest.json", lambda d: d.update(L0H0S1={"qk": []})),
                                     "attributions/manifest.json", "L0H0S1"),
    "attribution pair not [q, k]": (edit("attributions/manifest.json", lambda d: d.update(
        L0H0S1={"qk": [[1]], "ov": []})), "attributions/manifest.json", "L0H0S1"),
    "manifest a list": (lambda t: write(t / "attributions/manifest.json", []), "attributions/manifest.json",
                        "(top level)"),
    # umap/
    "views an object": (edit("umap/L0H0.json", lambda d: d.update(views={"umap": d["views"][0]["embeddings"]})),
                        "umap/L0H0.json", "views"),
    "view without embeddings": (edit("umap/L0H0.json", lambda d: d["views"][0].pop("embeddings")),
                                "umap/L0H0.json", "views[0]"),
    "view coordinates short": (edit("umap/L0H0.json", lambda d: d["views"][0]["embeddings"]["K"].update(
        d2=[0.0])), "umap/L0H0.json", "views[0].embeddings.K"),
    "pca coordinates short": (edit("umap/L0H0.json", lambda d: d["pca"].update(K={"d0": [1.0], "d1": [1.0]})),
                              "umap/L0H0.json", "pca.K"),
    "norms missing": (edit("umap/L0H0.json", lambda d: d.pop("norms")), "umap/L0H0.json",
                      "seq_idx/top_q/top_k/norms"),
    "seq_idx past the sequences": (edit("umap/L0H0.json", lambda d: d.update(seq_idx=[0, 1, 2])),
                                   "umap/L0H0.json", "seq_idx"),
    "nothing to draw": (edit("umap/L0H0.json", drop_projections), "umap/L0H0.json", "pca"),
    "cluster by indices": (edit("umap/L0H0.json", lambda d: d.update(clusters=[{"name": "a", "indices": [0]}])),
                           "umap/L0H0.json", "clusters[0].points"),
    "umap sequences missing": (remove("umap/sequences.json"), "umap/sequences.json", "(file)"),
    "umap head file missing": (remove("umap/L0H0.json"), "umap/L0H0.json", "(file)"),
}

WARNINGS = {
    "custom sequences file missing": (remove("custom_sequences/L0H1.json"), "custom_sequences/L0H1.json",
                                      "(file)"),
    "server config missing": (remove("server_config.json"), "server_config.json", "(file)"),
    "manifest missing": (remove("attributions/manifest.json"), "attributions/manifest.json", "(file)"),
    "manifest key of another form": (edit("attributions/manifest.json", lambda d: d.update(
        seq1={"qk": [], "ov": []})), "attributions/manifest.json", "seq1"),
    "no scatter axes": (edit("config.json", lambda d: d.pop("scatter")), "config.json", "scatter"),
    "colour not a column": (edit("config.json", lambda d: d["scatter"].update(default_color="induction")),
                            "config.json", "scatter.default_color"),
    "default axis null in the first row": (edit("scatter_data.json", lambda d: d[0].update(top_decile_from=None)),
                                           "scatter_data.json", "[0].top_decile_from"),
    "model name missing": (edit("config.json", lambda d: d.pop("model_name")), "config.json", "model_name"),
    "token table not named": (edit("config.json", lambda d: d["custom_tables"].pop(1)), "config.json",
                              "custom_tables"),
    "distance plot not named": (edit("config.json", lambda d: d.update(custom_plots=[])), "config.json",
                                "custom_plots"),
    "named table not in a head file": (edit("heads/L0H0.json", lambda d: d.pop("top_key_tokens")),
                                       "heads/L0H0.json", "top_key_tokens"),
    "metric null in the first row": (edit("scatter_data.json", lambda d: d[0].update(top_score=None)),
                                     "scatter_data.json", "[0].top_score"),
    "a head without a scatter row": (edit("scatter_data.json", lambda d: d.pop()), "scatter_data.json", "L1H3"),
    "repeated sequence id": (edit("heads/L0H0.json", lambda d: d["sequences"][1].update(
        sequence_id=d["sequences"][0]["sequence_id"])), "heads/L0H0.json", "sequences[].sequence_id"),
    "custom id not starting with c": (edit("custom_sequences/L0H1.json", lambda d: d["sequences"].append({
        "sequence_id": 1, "interval": -1, "tokens": ["a"], "attention_indices": [0], "attention_values": [1.0],
        "seq_len": 1, "max_activation": 0.0})), "custom_sequences/L0H1.json", "sequences[0].sequence_id"),
    "view without its parameters": (edit("umap/L0H0.json", lambda d: d["views"][0].pop("n_neighbors")),
                                    "umap/L0H0.json", "views[0].n_neighbors"),
    "projection kind unknown": (edit("umap/L0H0.json", lambda d: d["pca"].update(X=d["pca"]["Q"])),
                                "umap/L0H0.json", "pca.X"),
}


def broken(good_tree, tmp_path, change):
    tree = tmp_path / "data"
    shutil.copytree(good_tree, tree)
    change(tree)
    return tree


def pattern(where, field):
    return f"{where}: {field}".replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("name", list(ERRORS))
def test_each_error_is_named_by_file_and_field_and_refused_by_the_import(good_tree, tmp_path, name):
    change, where, field = ERRORS[name]
    tree = broken(good_tree, tmp_path, change)
    problems = validate_tree(tree)
    assert any((p.file, p.field, p.severity) == (where, field, ERROR) for p in problems), problems
    if name != "config missing":  # without config.json it is no HeadVis tree at all
        with pytest.raises(CorruptFileError, match=pattern(where, field)):
            import_headvis(tree)
    with pytest.raises(CorruptFileError, match=pattern(where, field)):
        check_tree(tree, strict=False)


@pytest.mark.parametrize("name", list(WARNINGS))
def test_each_warning_is_named_refused_by_the_strict_check_and_read_by_the_import(good_tree, tmp_path, name):
    change, where, field = WARNINGS[name]
    tree = broken(good_tree, tmp_path, change)
    problems = validate_tree(tree)
    assert [(p.file, p.field, p.severity) for p in problems] == [(where, field, WARNING)], problems
    with pytest.raises(CorruptFileError, match=pattern(where, field)):
        check_tree(tree, strict=True)
    assert check_tree(tree, strict=False) == problems
    assert [(p.file, p.field) for p in import_headvis(tree).warnings] == [(where, field)]


def test_a_good_tree_has_no_problems(good_tree):
    assert validate_tree(good_tree) == []
    assert check_tree(good_tree) == []


def neuronpedia_shaped(tree):
    """Our tree rewritten as Neuronpedia's compute-head-metrics.py writes one (its keys, read from the script)."""
    config = read(tree / "config.json")
    write(tree / "config.json", {
        "model_name": config["model_name"], "np_model_id": "tiny", "dataset_name": "words", "heads": config["heads"],
        "n_layers": config["n_layers"], "n_heads": config["n_heads"], "n_intervals": 5,
        "metrics": ["prev_token_score", "qk_distance"],
        "metric_descriptions": {"prev_token_score": "...", "qk_distance": "..."},
        "head_data_pattern": "L{layer}H{head}.json", "has_umap": False, "umap_heads": [],
        "custom_plots": [{"key": "qk_distance_histogram", "label": "Q-K distance"},
                         {"key": "histogram", "label": "Activation distribution"}],
        "custom_tables": [{"key": "top_query_tokens", "label": "Top query tokens"},
                          {"key": "top_key_tokens", "label": "Top key tokens"}],
        "statistics_display": {"n_samples": {"label": "Samples kept", "format": "default"}},
        "pipeline_config": {"n_intervals": 5}})
    rows = read(tree / "scatter_data.json")
    write(tree / "scatter_data.json", [{"layer": r["layer"], "head": r["head"], "prev_token_score": None if i == 1
                                        else r["share_at_mode"], "qk_distance": r["mean_distance"]}
                                       for i, r in enumerate(rows)])
    for path in (tree / "heads").iterdir():
        data = read(path)
        sequences = [{"sequence_id": s["sequence_id"], "interval": (s["interval"] + 1) // 2, "tokens": s["tokens"],
                      "attention_indices": s["attention_indices"], "attention_values": s["attention_values"],
                      "seq_len": s["seq_len"], "max_activation": s["max_activation"]} for s in data["sequences"]]
        write(path, {"sequences": sequences,
                     "qk_distance_histogram": {"bin_edges": [0, 1, 2, 4, 8, 16],
                                               "bin_values": [0.5, 0.25, 0.5, 0.25, 0.0]},
                     "top_query_tokens": [{"token": r["token"], "weight": r["total"]}
                                          for r in data["top_query_tokens"]],
                     "top_key_tokens": [{"token": r["token"], "weight": r["total"]} for r in data["top_key_tokens"]],
                     "histogram": {"bin_edges": [round(e, 4) for e in np.linspace(0, 1, 51).tolist()],
                                   "bin_values": [1] * 40 + [0] * 10},
                     "statistics": {"n_samples": len(sequences), "mean_max_activation": None}})
    shutil.rmtree(tree / "custom_sequences")
    shutil.rmtree(tree / "umap")


def test_a_tree_in_neuronpedias_shape_is_read(good_tree, tmp_path):
    tree = broken(good_tree, tmp_path, neuronpedia_shaped)
    warnings = {(p.file, p.field) for p in validate_tree(tree)}
    assert all(p.severity == WARNING for p in validate_tree(tree))
    assert ("config.json", "scatter") in warnings and ("custom_sequences/L0H0.json", "(file)") in warnings
    imported = import_headvis(tree)
    assert (imported.n_layers, imported.n_heads, imported.n_intervals, imported.n_windows) == (2, 4, 5, 40)
    head = HeadRef(1, 0)
    sequences = read(tree / "heads/L1H0.json")["sequences"]
    buckets = imported.deciles(head)
    assert [b.decile for b in buckets] == [5, 4, 3, 2, 1]
    for bucket in buckets:
        mine = [s for s in sequences if s["interval"] == bucket.decile]
        assert sorted(e.window_index for e in bucket.examples) == sorted(s["sequence_id"] for s in mine)
    assert imported.score_histogram(head)[1].sum() == 40  # the producer's histogram of every window
    # distance bins 0, 1, 2-3, 4-7, 8-15 spread evenly over their distances
    expected = np.array([0.5, 0.25, 0.25, 0.25, 0.0625, 0.0625, 0.0625, 0.0625] + [0.0] * 8) / 1.5
    assert np.allclose(imported.distance_histogram(head), expected)
    table = imported.top_tokens(head, "query", n=3)
    assert table["token"].tolist() == [r["token"] for r in read(tree / "heads/L1H0.json")["top_query_tokens"][:3]]
    summary = imported.head_summary()
    assert np.isnan(summary.loc[1, "prev_token_score"]) and summary["qk_distance"].notna().all()


def test_the_older_head_format_a_bare_list_is_read(good_tree, tmp_path):
    def bare(tree):
        data = read(tree / "heads/L0H1.json")
        write(tree / "heads/L0H1.json", data["sequences"])
    tree = broken(good_tree, tmp_path, bare)
    assert {(p.file, p.field) for p in validate_tree(tree)} == {("heads/L0H1.json", "top_query_tokens"),
                                                                 ("heads/L0H1.json", "top_key_tokens"),
                                                                 ("heads/L0H1.json", "qk_distance_histogram")}
    imported = import_headvis(tree)
    assert len(imported.head_data(HeadRef(0, 1))["sequences"]) == len(read(good_tree / "heads/L0H1.json")[
        "sequences"])
