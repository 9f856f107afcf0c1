"""The atlas's metrics in the export's scatter: values equal the atlas's, NaN as null, refusals, CLI --atlas."""

import json

import numpy as np
import pandas as pd
import pytest

from headvis_core.atlas.run import METRIC_COLUMNS, METRICS, compute_atlas
from headvis_core.cli.main import main
from headvis_core.errors import InputError
from headvis_core.heads import all_heads
from headvis_core.headvis_format.export import (
    METRIC_DESCRIPTIONS,
    atlas_column_names,
    export_headvis,
    scan_statistic_descriptions,
)
from headvis_core.headvis_format.importer import open_any_scan
from headvis_core.headvis_format.validate import validate_tree
from tests.headvis_format.scans import tiny_scan


@pytest.fixture(scope="module")
def scan_and_atlas(tiny_gpt2, tmp_path_factory):
    scan = tiny_scan(tiny_gpt2, tmp_path_factory.mktemp("atlas_scan"))
    atlas = compute_atlas(tiny_gpt2.model, n_seqs=4, seq_len=24, n_induction_seqs=4, batch_size=4,
                          model_name=scan.meta["model"]["name"])
    return scan, atlas


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_scatter_carries_the_atlas_metrics_and_the_validator_passes(scan_and_atlas, tmp_path):
    scan, atlas = scan_and_atlas
    table = atlas.table.copy()
    table.loc[3, "retrieval"] = np.nan  # an undefined metric of one head
    out = tmp_path / "data"
    export_headvis(scan, out, atlas=table)
    assert validate_tree(out) == []
    rows = read(out / "scatter_data.json")
    config = read(out / "config.json")
    names = atlas_column_names()
    statistics = scan_statistic_descriptions()
    assert names["mean_distance"] == "atlas_mean_distance"
    assert names["logit_std"] == ("atlas_logit_std" if "logit_std" in statistics else "logit_std")
    summary = scan.head_summary().set_index(["layer", "head"])
    kept = [c for c in statistics if c in summary.columns and summary[c].notna().any()]
    assert config["metrics"] == list(METRIC_DESCRIPTIONS) + kept + [names[c] for c in METRIC_COLUMNS]
    for m in METRICS:
        assert m.definition in config["metric_descriptions"][names[m.column]]
    assert sorted((r["layer"], r["head"]) for r in rows) == [(h.layer, h.head) for h in all_heads(scan.n_layers,
                                                                                                   scan.n_heads)]
    assert sum(v is None for v in rows[0].values()) == min(sum(v is None for v in r.values()) for r in rows)
    by_head = table.set_index(["layer", "head"])
    for row in rows:
        assert list(row)[:2] == ["layer", "head"] and set(config["metrics"]) == set(row) - {"layer", "head"}
        for column in METRIC_COLUMNS:
            expected = float(by_head.loc[(row["layer"], row["head"]), column])
            if np.isnan(expected):
                assert row[names[column]] is None
            else:
                assert row[names[column]] == expected  # exact: JSON round-trips a float64
        for column in kept:  # the scan's own HeadVis statistics, NaN as null
            expected = float(summary.loc[(row["layer"], row["head"]), column])
            assert row[column] == (None if np.isnan(expected) else expected)
    row_of = {(r["layer"], r["head"]): r for r in rows}
    assert row_of[(int(table.loc[3, "layer"]), int(table.loc[3, "head"]))]["retrieval"] is None
    assert "NaN" not in (out / "scatter_data.json").read_text()
    # the scan's own metrics are unchanged and the round trip still exact
    plain = tmp_path / "plain"
    export_headvis(scan, plain)
    assert sorted([{k: r[k] for k in ("layer", "head", *METRIC_DESCRIPTIONS)} for r in rows],
                  key=lambda r: (r["layer"], r["head"])) == \
        sorted([{k: r[k] for k in ("layer", "head", *METRIC_DESCRIPTIONS)} for r in read(plain / "scatter_data.json")],
               key=lambda r: (r["layer"], r["head"]))
    imported = open_any_scan(out)
    for head in all_heads(scan.n_layers, scan.n_heads):
        assert [(e.window_index, e.score) for e in scan.top_examples(head)] == \
               [(e.window_index, e.score) for e in imported.top_examples(head)]
        for a, b in zip(scan.deciles(head), imported.deciles(head), strict=True):
            assert [(e.window_index, e.score) for e in a.examples] == [(e.window_index, e.score) for e in b.examples]
    imported_summary = imported.head_summary()
    assert imported_summary[["layer", "head"]].values.tolist() == [[h.layer, h.head] for h in all_heads(
        scan.n_layers, scan.n_heads)]
    assert np.allclose(imported_summary[names["logit_std"]].to_numpy(), by_head[["logit_std"]].to_numpy().ravel())


def test_an_atlas_result_is_accepted_and_another_models_refused(scan_and_atlas, tmp_path):
    scan, atlas = scan_and_atlas
    export_headvis(scan, tmp_path / "a", atlas=atlas)
    rows = {(r["layer"], r["head"]): r for r in read(tmp_path / "a" / "scatter_data.json")}
    assert rows[(0, 0)]["induction"] == float(atlas.table.set_index(["layer", "head"]).loc[(0, 0), "induction"])
    atlas.model_name, name = "gpt2", atlas.model_name
    try:
        with pytest.raises(InputError, match="The atlas is of gpt2"):
            export_headvis(scan, tmp_path / "b", atlas=atlas)
    finally:
        atlas.model_name = name
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("change, message", [
    (lambda t: t.iloc[:-1], "not this model's atlas"),
    (lambda t: pd.concat([t, t.iloc[:1]]), "some repeated"),
    (lambda t: t.assign(layer=t["layer"] + 5), "not this model's atlas"),
    (lambda t: t.drop(columns=["logit_std"]), "lacks the columns logit_std"),
    (lambda t: t.assign(induction="high"), "not a number"),
    (lambda t: t.assign(induction=np.inf), "infinite"),
])
def test_an_atlas_of_another_shape_is_refused_before_writing(scan_and_atlas, tmp_path, change, message):
    scan, atlas = scan_and_atlas
    with pytest.raises(InputError, match=message):
        export_headvis(scan, tmp_path / "data", atlas=change(atlas.table.copy()))
    assert not (tmp_path / "data").exists()


def test_cli_atlas_option(scan_and_atlas, tmp_path, capsys):
    scan, atlas = scan_and_atlas
    csv = tmp_path / "atlas.csv"
    atlas.table.to_csv(csv, index=False)  # as `headvis_core atlas --out` writes it
    out = tmp_path / "data"
    assert main(["export-headvis", "--scan", str(scan.path), "--out", str(out), "--atlas", str(csv)]) == 0
    row = {(r["layer"], r["head"]): r for r in read(out / "scatter_data.json")}[(0, 1)]
    column = atlas_column_names()["query_token_entropy"]
    assert row[column] == float(atlas.table.set_index(["layer", "head"]).loc[(0, 1), "query_token_entropy"])
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    atlas.table.iloc[:2].to_csv(bad, index=False)
    assert main(["export-headvis", "--scan", str(scan.path), "--out", str(tmp_path / "x"), "--atlas", str(bad)]) == 2
    assert "not this model's atlas" in capsys.readouterr().err
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00bad")
    assert main(["export-headvis", "--scan", str(scan.path), "--out", str(tmp_path / "y"), "--atlas",
                 str(tmp_path / "binary.csv")]) == 2
    assert main(["export-headvis", "--scan", str(scan.path), "--out", str(tmp_path / "z"), "--atlas",
                 str(tmp_path / "missing.csv")]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("x", "y", "z"))
