"""UMAP as an option of the projections: stored beside the PCA, deterministic for a seed, exported as ``views``;
a clear refusal where umap-learn is missing."""

import json

import numpy as np
import pytest

from headvis_core.cli.main import main
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.headvis_format.export import export_headvis
from headvis_core.headvis_format.validate import validate_tree
from headvis_core.projections import umap_fit
from headvis_core.projections.pairs import KINDS
from headvis_core.projections.run import ProjectionParams, project_scan
from headvis_core.projections.store import load_projections
from tests.app import conftest as page_fixtures
from tests.headvis_format.scans import tiny_scan

HEADS = [HeadRef(0, 0), HeadRef(1, 1)]
PARAMS = ProjectionParams(max_pairs=40, max_windows=8, batch_size=4, umap=True, seed=3)
scans_dir = page_fixtures.scans_dir  # the page tests' fixtures, for the page's UMAP choice
text_dir = page_fixtures.text_dir
needs_umap = pytest.mark.skipif(not umap_fit.umap_available(), reason="umap-learn is not installed (optional; "
                                f"pip install {umap_fit.PIN})")


@pytest.fixture(scope="module")
def projected(tiny_llama, tmp_path_factory):
    if not umap_fit.umap_available():
        pytest.skip(f"umap-learn is not installed (optional; pip install {umap_fit.PIN})")
    scan = tiny_scan(tiny_llama, tmp_path_factory.mktemp("umap"))
    return tiny_llama, scan, project_scan(tiny_llama, scan, PARAMS, heads=HEADS)


@needs_umap
def test_umap_is_stored_beside_the_pca_and_deterministic(projected):
    loaded, scan, _ = projected
    stored = load_projections(scan.path)
    assert stored is not None and stored.has_umap and stored.meta["params"]["seed"] == 3
    again = project_scan(loaded, scan, PARAMS, heads=HEADS, save=False)
    for head in HEADS:
        p = stored.head(head)
        for kind in KINDS:
            layout = p.umap[kind]
            assert layout.shape == (len(p.norms), 3) and np.isfinite(layout).all()
            assert np.array_equal(layout, again.head(head).umap[kind])  # same seed, same layout
            assert np.array_equal(p.coords[kind], again.head(head).coords[kind])
    other = project_scan(loaded, scan, ProjectionParams(**{**PARAMS.__dict__, "seed": 4}), heads=HEADS[:1],
                         save=False)
    assert not np.array_equal(other.head(HEADS[0]).umap["Q"], stored.head(HEADS[0]).umap["Q"])


@needs_umap
def test_umap_layout_keeps_neighbours_together():
    """Two far-apart blobs stay apart in the layout (UMAP preserves local structure)."""
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(0, 1, (40, 16)), rng.normal(30, 1, (40, 16))])
    layout = umap_fit.fit_umap(data, 2, seed=0)
    a, b = layout[:40], layout[40:]
    gap = np.linalg.norm(a.mean(0) - b.mean(0))
    spread = max(np.linalg.norm(a - a.mean(0), axis=1).max(), np.linalg.norm(b - b.mean(0), axis=1).max())
    assert gap > 2 * spread
    with pytest.raises(InputError, match="at least 5 pairs"):
        umap_fit.fit_umap(data[:4], 3)


@needs_umap
def test_export_writes_views_only_with_umap(projected, tmp_path):
    _, scan, projections = projected
    out = tmp_path / "data"
    export_headvis(scan, out)
    assert validate_tree(out) == []
    config = json.loads((out / "config.json").read_text())
    assert config["has_umap"] and config["umap_heads"] == [[h.layer, h.head] for h in HEADS]
    record = json.loads((out / "umap" / "L1H1.json").read_text())
    p = projections.head(HeadRef(1, 1))
    # the frontend reads views as a list of UMAP layouts, {embeddings, n_neighbors, min_dist}; PCA stays in pca
    assert len(record["views"]) == 1 and set(record["views"][0]) == {"embeddings", "n_neighbors", "min_dist"}
    for kind in KINDS:
        for c in range(3):
            assert np.allclose(record["views"][0]["embeddings"][kind][f"d{c}"], p.umap[kind][:, c], atol=1e-5)
    record["views"][0]["embeddings"]["K"]["d2"] = record["views"][0]["embeddings"]["K"]["d2"][:-1]
    (out / "umap" / "L1H1.json").write_text(json.dumps(record))
    problems = validate_tree(out)
    assert [(p.file, p.field) for p in problems] == [("umap/L1H1.json", "views[0].embeddings.K")]


def test_without_umap_learn_asking_for_umap_is_refused_clearly(tiny_gpt2, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(umap_fit, "umap_available", lambda: False)
    assert not umap_fit.umap_available()
    with pytest.raises(InputError, match="umap-learn.*only PCA"):
        ProjectionParams(umap=True).check()
    ProjectionParams().check()  # PCA alone needs nothing more
    scan = tiny_scan(tiny_gpt2, tmp_path)
    out = tmp_path / "data"
    assert main(["export-headvis", "--scan", str(scan.path), "--out", str(out), "--umap"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "umap-learn" in err and not out.exists()
    assert load_projections(scan.path) is None  # refused before any work


@needs_umap
def test_the_figure_draws_the_umap_layout(projected):
    _, scan, projections = projected
    from headvis_core.projections.prompt import stored_pairs_table
    from headvis_core.viz.projections import projection_figure

    p = projections.head(HeadRef(0, 0))
    table = stored_pairs_table(p, projections.arrays["window_tokens"], scan.token_strings)
    assert np.array_equal(table["umap_V2"].to_numpy(), p.umap["V"][:, 2])
    fig = projection_figure(table, "V", "distance", 3, p.fits["V"].explained, overlay=table.head(3), method="UMAP")
    assert len(fig.data) == 1  # a UMAP layout has no rotation for a prompt's pairs
    assert np.array_equal(np.asarray(fig.data[0].z), p.umap["V"][:, 2])
    assert fig.layout.scene.xaxis.title.text == "UMAP1"
    pca = projection_figure(table, "V", "distance", 2, p.fits["V"].explained)
    assert np.array_equal(np.asarray(pca.data[0].x), p.coords["V"][:, 0])
    assert pca.layout.xaxis.title.text.startswith("PC1")


def test_a_umap_figure_without_umap_coordinates_is_refused():
    import pandas as pd

    from headvis_core.viz.projections import projection_figure

    table = pd.DataFrame({"Q0": [0.0], "Q1": [1.0]})
    with pytest.raises(ValueError, match="no UMAP coordinates"):
        projection_figure(table, "Q", method="UMAP")


@needs_umap
def test_the_dataset_examples_page_computes_and_shows_umap(scans_dir, text_dir):
    from tests.app.test_dataset_examples import run_scan_on_page
    from tests.conftest import app_test

    at = run_scan_on_page(app_test("pages/3_Dataset_examples.py", layer=1, head=1, tab="pca").run(), text_dir)
    assert not at.exception and not at.error, at.exception
    at.number_input(key="ex_pca_pairs").set_value(20)
    at.checkbox(key="ex_pca_umap").check()
    at = at.button(key="ex_pca_run").click().run()
    assert not at.exception and not at.error, at.exception
    assert at.radio(key="pca_method").options == ["PCA", "UMAP"]
    at = at.radio(key="pca_method").set_value("UMAP").run()
    assert not at.exception and not at.error, at.exception
    at.text_input(key="pca_prompt").set_value("a b c a b c")
    at = at.run()
    assert any("keeps no rotation" in c.value for c in at.caption)
    stored = load_projections(next(scans_dir.iterdir()))
    assert stored is not None and stored.has_umap


def test_without_umap_learn_the_page_offers_pca_only(scans_dir, text_dir, monkeypatch):
    from tests.app.test_dataset_examples import run_scan_on_page
    from tests.conftest import app_test

    monkeypatch.setattr(umap_fit, "umap_available", lambda: False)
    at = run_scan_on_page(app_test("pages/3_Dataset_examples.py", tab="pca").run(), text_dir)
    assert at.checkbox(key="ex_pca_umap").disabled
    at.number_input(key="ex_pca_pairs").set_value(20)
    at = at.button(key="ex_pca_run").click().run()
    assert not at.exception and not at.error, at.exception
    assert not any(r.key == "pca_method" for r in at.radio)


@needs_umap
def test_cli_umap_flag(tiny_gpt2, tmp_path, capsys):
    scan = tiny_scan(tiny_gpt2, tmp_path)
    out = tmp_path / "data"
    assert main(["export-headvis", "--scan", str(scan.path), "--out", str(out), "--umap", "--seed", "1",
                 "--pca-pairs", "20", "--pca-windows", "4"]) == 0
    assert validate_tree(out) == []
    stored = load_projections(scan.path)
    assert stored.has_umap and stored.meta["params"]["seed"] == 1
    record = json.loads((out / "umap" / "L0H0.json").read_text())
    assert np.allclose(record["views"][0]["embeddings"]["O"]["d0"], stored.head(HeadRef(0, 0)).umap["O"][:, 0],
                       atol=1e-5)
