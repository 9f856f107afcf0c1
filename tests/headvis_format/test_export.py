"""HeadVis export: every fact of the contract, the round trip through the import, atomic writes and refusals."""

import json

import numpy as np
import pandas as pd
import pytest

from headvis_core.errors import CorruptFileError, InputError
from headvis_core.heads import HeadRef, all_heads
from headvis_core.headvis_format import contract, export
from headvis_core.headvis_format.export import ExportOptions, export_headvis
from headvis_core.headvis_format.importer import import_headvis, open_any_scan
from headvis_core.headvis_format.validate import validate_tree
from headvis_core.scan.result import ScanResult
from tests.headvis_format.scans import tiny_scan


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama"])
def scan(request, tmp_path_factory):
    return tiny_scan(request.getfixturevalue(request.param), tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def tree(scan, tmp_path_factory):
    out = tmp_path_factory.mktemp("trees") / "data"
    export_headvis(scan, out)
    return out


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_tree_has_every_file_and_passes_the_validator(scan, tree):
    assert validate_tree(tree) == []
    config = read(tree / contract.CONFIG)
    assert config["n_intervals"] == 10 and config["head_data_pattern"] == "L{layer}H{head}.json"
    assert config["heads"] == [[h.layer, h.head] for h in all_heads(scan.n_layers, scan.n_heads)]
    rows = read(tree / contract.SCATTER)
    assert config["scatter"]["default_x"] in rows[0] and config["scatter"]["default_y"] in rows[0]
    assert [(r["layer"], r["head"]) for r in rows] == [tuple(h) for h in config["heads"]]
    assert read(tree / contract.SERVER_CONFIG) == {}
    for layer, head in config["heads"]:
        assert (tree / "heads" / f"L{layer}H{head}.json").is_file()
        assert read(tree / "custom_sequences" / f"L{layer}H{head}.json") == {"sequences": []}
    text = "".join(p.read_text() for p in tree.rglob("*.json"))
    assert "NaN" not in text and "Infinity" not in text


def slow_entries(attention, keys_per_query, threshold):
    """Reference: per query, candidates key 0 and the stored keys, largest rounded value first, earlier key first."""
    n = attention.keys.shape[0]
    kept = {}
    for q in range(n):
        candidates = [(round(float(attention.first[q]), 4), 0)]
        for key, value in zip(attention.keys[q], attention.values[q]):
            if value > 0 and 1 <= key <= q:
                candidates.append((round(float(value), 4), int(key)))
        candidates.sort(key=lambda c: (-c[0], c[1]))
        for value, key in candidates[:keys_per_query]:
            if value >= threshold and value > 0:
                kept[q * n + key] = value
    return dict(sorted(kept.items()))


@pytest.mark.parametrize("keys_per_query,threshold", [(5, 0.01), (2, 0.1)])
def test_sequences_follow_the_format(scan, tmp_path, keys_per_query, threshold):
    out = tmp_path / "data"
    export_headvis(scan, out, options=ExportOptions(keys_per_query=keys_per_query, threshold=threshold))
    head = HeadRef(1, 2)
    data = read(out / "heads" / "L1H2.json")
    by_window = {ex.window_index: ex for b in scan.deciles(head) for ex in b.examples}
    by_window.update({ex.window_index: ex for ex in scan.top_examples(head)})
    assert sorted(s["sequence_id"] for s in data["sequences"]) == sorted(by_window)
    for seq in data["sequences"]:
        assert type(seq["interval"]) is int and 1 <= seq["interval"] <= 10
        ex = by_window[seq["sequence_id"]]
        n = seq["seq_len"]
        assert n == len(seq["tokens"]) and seq["tokens"] == ex.str_tokens
        entries = dict(zip(seq["attention_indices"], seq["attention_values"]))
        assert entries == slow_entries(ex.attention, keys_per_query, threshold)
        inner = [v for i, v in entries.items() if i // n > 0 and i % n > 0]
        assert seq["max_activation"] == max(inner, default=0.0)
        if threshold <= 0.01:  # the window's score (fp16 storage) is the sequence's largest inner weight
            assert seq["max_activation"] == pytest.approx(ex.score, abs=2e-3)


def test_a_window_has_its_decile_as_interval(scan, tree):
    head = HeadRef(0, 1)
    decile_of = {ex.window_index: b.decile for b in scan.deciles(head) for ex in b.examples}
    edges_of = {b.decile: (b.low, b.high) for b in scan.deciles(head)}
    for seq in read(tree / "heads" / "L0H1.json")["sequences"]:
        if seq["sample"]:
            assert seq["interval"] == decile_of[seq["sequence_id"]]
        else:  # a top window outside the sample: the decile its score falls in
            low, high = edges_of[seq["interval"]]
            assert low <= seq["score"] <= high


def test_round_trip_gives_the_same_deciles_and_top_tokens(scan, tree):
    imported = open_any_scan(tree)
    assert (imported.n_layers, imported.n_heads, imported.n_windows) == (scan.n_layers, scan.n_heads,
                                                                         scan.n_windows)
    for head in all_heads(scan.n_layers, scan.n_heads):
        for a, b in zip(scan.deciles(head), imported.deciles(head), strict=True):
            assert (a.decile, a.n_windows) == (b.decile, b.n_windows)
            assert (np.isnan(a.low) and np.isnan(b.low)) or (a.low, a.high) == (b.low, b.high)
            assert [(e.window_index, e.score, e.str_tokens) for e in a.examples] == \
                   [(e.window_index, e.score, e.str_tokens) for e in b.examples]
        assert [(e.window_index, e.score) for e in scan.top_examples(head)] == \
               [(e.window_index, e.score) for e in imported.top_examples(head)]
        for role in ("query", "key"):
            ours = scan.top_tokens(head, role, n=25, min_count=5)
            theirs = imported.top_tokens(head, role, n=25, min_count=5)
            columns = ["token", "token_id", "count"]
            assert ours[columns].values.tolist() == theirs[columns].values.tolist()
            assert np.array_equal(ours["mean_attention"].values, theirs["mean_attention"].values)
        assert np.allclose(scan.distance_histogram(head), imported.distance_histogram(head))
        assert np.array_equal(scan.score_histogram(head)[1], imported.score_histogram(head)[1])
    assert imported.head_summary()[["layer", "head", "name"]].values.tolist() == \
        scan.head_summary()[["layer", "head", "name"]].values.tolist()


def test_a_foreign_tree_is_read_from_its_intervals(scan, tree, tmp_path):
    """Without the workbench keys (as Neuronpedia's pipeline writes it) the deciles are the intervals."""
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(tree, foreign)
    for path in (foreign / "heads").iterdir():
        data = read(path)
        data.pop("workbench")
        for seq in data["sequences"]:
            for key in ("score", "sample", "top_rank"):
                seq.pop(key, None)
        for row in data["top_query_tokens"] + data["top_key_tokens"]:
            for key in ("token_id", "count", "total"):
                row.pop(key)
        path.write_text(json.dumps(data))
    imported = import_headvis(foreign)
    head = HeadRef(1, 0)
    seqs = read(foreign / "heads" / "L1H0.json")["sequences"]
    for bucket in imported.deciles(head):
        mine = [s for s in seqs if s["interval"] == bucket.decile]
        assert sorted(e.window_index for e in bucket.examples) == sorted(s["sequence_id"] for s in mine)
        assert [e.score for e in bucket.examples] == sorted((s["max_activation"] for s in mine), reverse=True)
    table = imported.top_tokens(head, "query", n=5)
    assert table["count"].isna().all() and len(table) == 5


def test_non_empty_folder_is_refused_unless_force_on_a_headvis_tree(scan, tree, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        export_headvis(scan, other)
    with pytest.raises(InputError, match="holds no HeadVis data"):
        export_headvis(scan, other, force=True)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    with pytest.raises(InputError, match="--force"):
        export_headvis(scan, tree)
    out = tmp_path / "again"
    export_headvis(scan, out)
    (out / "heads" / "stale.json").write_text("{}")
    export_headvis(scan, out, force=True)
    assert not (out / "heads" / "stale.json").exists() and validate_tree(out) == []


def test_a_failure_leaves_nothing_half_written(scan, tmp_path, monkeypatch):
    out = tmp_path / "data"
    calls = []

    def failing(scan_, head, options=ExportOptions(), summary=None):
        calls.append(head)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(scan_, head, options, summary)

    real = export.head_record
    monkeypatch.setattr(export, "head_record", failing)
    with pytest.raises(RuntimeError):
        export_headvis(scan, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_non_finite_value_is_refused_not_written(scan, tmp_path):
    arrays = {k: v.copy() for k, v in scan.arrays.items()}
    arrays["distance_sum"][3, 2] = np.nan
    damaged = ScanResult(arrays, scan.meta, path=None)
    with pytest.raises(CorruptFileError, match="JSON"):
        export_headvis(damaged, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_bad_options_are_refused(scan, tmp_path):
    for options in (ExportOptions(keys_per_query=0), ExportOptions(threshold=-0.1), ExportOptions(threshold=1.0)):
        with pytest.raises(InputError):
            export_headvis(scan, tmp_path / "data", options=options)


def test_the_metrics_tab_gets_every_windows_score_and_the_statistics(scan, tree):
    config = read(tree / contract.CONFIG)
    assert [p["key"] for p in config["custom_plots"]] == ["qk_distance_histogram"]
    summary = scan.head_summary()
    for head in all_heads(scan.n_layers, scan.n_heads):
        data = read(tree / "heads" / f"L{head.layer}H{head.head}.json")
        histogram, counts = data["histogram"], scan.score_histogram(head)[1]
        assert sum(histogram["bin_values"]) == scan.n_windows == counts.sum()  # no window dropped
        bars = len(histogram["bin_values"])
        assert len(counts) % bars == 0 and bars <= export.MAX_HISTOGRAM_BARS
        assert histogram["bin_values"] == counts.reshape(bars, -1).sum(1).tolist()
        assert histogram["bin_edges"][0] == 0.0 and histogram["bin_edges"][-1] == 1.0
        row = summary.iloc[head.layer * scan.n_heads + head.head]
        assert data["statistics"] == {"n_windows": scan.n_windows, "n_sequences": len(data["sequences"]),
                                      "mean_max_activation": row["mean_max_attention"],
                                      "top_decile_from": row["top_decile_from"]}
    assert set(config["statistics_display"]) == set(data["statistics"])


@pytest.mark.parametrize("n_bins, bars", [(512, 32), (4096, 32), (1000, 50), (7, 7), (97, 1)])
def test_activation_histogram_keeps_every_window(n_bins, bars):
    counts = np.arange(n_bins, dtype=np.int64) % 5
    histogram = export.activation_histogram(counts)
    assert len(histogram["bin_values"]) == bars and sum(histogram["bin_values"]) == counts.sum()
    assert len(histogram["bin_edges"]) == bars + 1


def test_umap_records_take_the_frontends_shape():
    """views: a list of {embeddings, n_neighbors, min_dist}; a cluster names its points by (seq_idx, q, k)."""
    coords = {"d0": [0.0, 1.0, 2.0], "d1": [1.0, 1.0, 1.0], "d2": [0.0, 0.0, 0.0]}
    umap = {"d0": [5.0, 6.0, 7.0], "d1": [1.0, 2.0, 3.0], "d2": [0.0, 0.0, 0.0]}
    record = {"seq_idx": [0, 0, 1], "top_q": [3, 4, 2], "top_k": [1, 4, 0], "norms": [1.0, 2.0, 3.0],
              "pca": {k: coords for k in "QKOV"}, "views": {"pca": {k: coords for k in "QKOV"},
                                                            "umap": {k: umap for k in "QKOV"}},
              "clusters": [{"name": "late", "indices": [2, 0]}]}
    out = export.frontend_umap_record(record, 3)
    assert out["pca"] == record["pca"]
    assert out["views"] == [{"embeddings": {k: umap for k in "QKOV"}, "n_neighbors": 2, "min_dist": 0.1}]
    assert out["clusters"] == [{"name": "late", "points": [[1, 2, 0], [0, 3, 1]]}]
    del record["views"]
    assert "views" not in export.frontend_umap_record(record, 3)


def test_a_null_metric_does_not_cost_the_scatter_an_axis(scan):
    """The frontend's axes are the first row's numbers: the most complete row goes first; an empty column goes."""
    from headvis_core.atlas.run import METRIC_COLUMNS

    heads = all_heads(scan.n_layers, scan.n_heads)
    table = pd.DataFrame({"layer": [h.layer for h in heads], "head": [h.head for h in heads],
                          **{c: np.linspace(0.1, 0.9, len(heads)) for c in METRIC_COLUMNS}})
    table.loc[0, "induction"] = np.nan  # head 0.0 lacks one metric
    table["retrieval"] = np.nan  # no head has this one
    atlas = export.atlas_table(scan, table)
    rows, descriptions = export.scatter_table(scan, atlas)
    names = export.atlas_column_names()
    assert names["retrieval"] not in descriptions and all(names["retrieval"] not in r for r in rows)
    assert all(v is not None for v in rows[0].values()) and (rows[0]["layer"], rows[0]["head"]) != (0, 0)
    assert sorted((r["layer"], r["head"]) for r in rows) == [(h.layer, h.head) for h in heads]
    assert next(r for r in rows if (r["layer"], r["head"]) == (0, 0))[names["induction"]] is None


def test_a_scan_stored_before_the_headvis_statistics_exports_without_them(scan, tmp_path):
    arrays = {k: v for k, v in scan.arrays.items() if k not in ("score_sum", "high_totals", "high_weight",
                                                                 "high_slack")}
    old = ScanResult(arrays, scan.meta, path=None)
    export_headvis(old, tmp_path / "data")
    config = read(tmp_path / "data" / contract.CONFIG)
    row = read(tmp_path / "data" / contract.SCATTER)[0]
    assert "logit_std" not in row and "key_token_entropy" not in config["metrics"]
    assert row["qk_distance"] == pytest.approx(float(old.head_summary().loc[0, "qk_distance"]))
    assert validate_tree(tmp_path / "data") == []
