"""Projections: pair norms against an explicit loop, the decomposition summing to the head's output, the running
top-N against a brute force, the stored PCA reproducing the projection of its own inputs, store, prompt, figures."""

import json

import numpy as np
import pytest
import torch

from headvis_core.errors import InputError
from headvis_core.heads import HeadRef, all_heads
from headvis_core.headvis_format.export import export_headvis
from headvis_core.headvis_format.validate import validate_tree
from headvis_core.hooks import capture, z_hook
from headvis_core.projections.pairs import KINDS, attention_hooks, head_weights, kv_head, pair_norms, vectors_at
from headvis_core.projections.pca import fit_pca
from headvis_core.projections.prompt import pair_vectors, project_prompt, stored_pairs_table
from headvis_core.projections.run import ProjectionParams, collect_pairs, project_scan, scan_windows
from headvis_core.projections.store import load_projections
from headvis_core.scan.store import MANIFEST
from headvis_core.viz.projections import COLOR_OPTIONS, projection_figure
from tests.headvis_format.scans import tiny_scan

PARAMS = ProjectionParams(max_pairs=60, max_windows=12, batch_size=5)


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama"])
def projected(request, tmp_path_factory):
    loaded = request.getfixturevalue(request.param)
    scan = tiny_scan(loaded, tmp_path_factory.mktemp("proj"))
    return loaded, scan, project_scan(loaded, scan, PARAMS)


def activations(loaded, tokens, head):
    _, cache = capture(loaded.model, tokens, attention_hooks(head.layer) + [z_hook(head.layer)])
    names = attention_hooks(head.layer)
    kv = kv_head(loaded.model, head.head)
    return (cache[names[0]][:, head.head], cache[names[1]][:, :, head.head], cache[names[2]][:, :, kv],
            cache[names[3]][:, :, kv], cache[z_hook(head.layer)][:, :, head.head])


def test_pair_outputs_sum_to_the_heads_output_and_norms_match_a_loop(projected):
    loaded, scan, _ = projected
    _, tokens = scan_windows(scan, 3)
    tokens = torch.from_numpy(tokens)
    for head in (HeadRef(0, 1), HeadRef(1, 3)):
        pattern, q, k, v, z = activations(loaded, tokens, head)
        w_o = head_weights(loaded.model, head)
        norms = pair_norms(pattern, v, w_o)
        b, n = 1, pattern.shape[-1]
        rows = torch.full((n * n,), b)
        qs, ks = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
        o = vectors_at(pattern, q, k, v, w_o, rows, qs, ks)["O"].reshape(n, n, -1)
        # sum over keys of each pair's contribution = the head's output z W_O at that query
        assert np.allclose(o.sum(1), (z[b] @ w_o).numpy(), atol=1e-5)
        for qi in range(n):
            for ki in range(n):
                expected = 0.0 if qi == 0 or ki == 0 or ki > qi else \
                    float(torch.linalg.norm(pattern[b, qi, ki] * v[b, ki] @ w_o))
                assert norms[b, qi, ki].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_running_top_pairs_equal_a_brute_force_over_all_windows(projected):
    loaded, scan, _ = projected
    _, tokens = scan_windows(scan, 7)
    tokens = torch.from_numpy(tokens)
    head = HeadRef(1, 2)
    found = collect_pairs(loaded, tokens, [head], max_pairs=25, batch_size=3)[head]
    pattern, _, _, v, _ = activations(loaded, tokens, head)
    norms = pair_norms(pattern, v, head_weights(loaded.model, head)).numpy()
    everything = sorted(((-norms[b, qi, ki], b, qi, ki) for b, qi, ki in zip(*np.nonzero(norms))))[:25]
    assert [(b, qi, ki) for _, b, qi, ki in everything] == list(zip(found.rows, found.queries, found.keys))
    assert np.allclose(found.norms, [-x[0] for x in everything], rtol=1e-5)


def test_stored_pca_reproduces_the_projection_of_its_own_inputs(projected):
    loaded, scan, projections = projected
    stored = load_projections(scan.path)
    assert stored is not None and stored.heads == all_heads(scan.n_layers, scan.n_heads)
    tokens = torch.from_numpy(stored.arrays["window_tokens"])
    for head in (HeadRef(0, 0), HeadRef(1, 3)):
        p = stored.head(head)
        assert len(p.norms) == PARAMS.max_pairs and np.all(np.diff(p.norms) <= 0)
        vectors = pair_vectors(loaded, tokens, head, p.rows, p.queries, p.keys)
        for kind in KINDS:
            fit = p.fits[kind]
            assert np.allclose(fit.components @ fit.components.T, np.eye(3), atol=1e-6)
            assert np.allclose(fit.transform(vectors[kind]), p.coords[kind], atol=1e-4)
            # an independent PCA (numpy SVD) gives the same coordinates up to each axis's sign
            centred = vectors[kind].astype(np.float64) - vectors[kind].mean(0)
            u, s, _ = np.linalg.svd(centred, full_matrices=False)
            assert np.allclose(np.abs(u[:, :3] * s[:3]), np.abs(p.coords[kind]), atol=1e-4)
            assert fit.explained.sum() <= 1 + 1e-9


def test_pca_needs_more_pairs_than_components():
    with pytest.raises(InputError, match="at least 4 pairs"):
        fit_pca(np.random.default_rng(0).normal(size=(3, 8)), 3, "head 0.0's Q")
    with pytest.raises(InputError, match="PCA needs more pairs"):
        ProjectionParams(max_pairs=3).check()


def test_a_head_without_enough_pairs_is_skipped_with_its_reason(projected, tmp_path):
    loaded, scan, _ = projected
    from headvis_core.scan import ScanParams

    tiny = tiny_scan(loaded, tmp_path, ScanParams(window_len=2, max_windows=1, histogram_bins=64))
    with pytest.raises(InputError, match="No head could be projected.*at least 4 pairs"):
        project_scan(loaded, tiny, PARAMS)


def test_stale_projections_are_not_shown(projected, tmp_path):
    import shutil

    _, scan, _ = projected
    copy = tmp_path / "scan"
    shutil.copytree(scan.path, copy)
    assert load_projections(copy) is not None
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["sha256"] = "0" * 64
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert load_projections(copy) is None


def test_project_this_prompt(projected):
    loaded, scan, projections = projected
    head = HeadRef(1, 1)
    p = projections.head(head)
    text = "the cat <script>x</script> the cat the"
    table = project_prompt(loaded, p, text, n_pairs=10)
    assert len(table) == 10 and np.all(np.diff(table["norm"].values) <= 0)
    tokens = loaded.model.to_tokens(text)
    vectors = pair_vectors(loaded, tokens, head, table["row"].values, table["query"].values, table["key"].values)
    for kind in KINDS:
        expected = (vectors[kind].astype(np.float64) - p.fits[kind].mean) @ p.fits[kind].components.T
        assert np.allclose(table[[f"{kind}{c}" for c in range(3)]].values, expected, atol=1e-5)
    with pytest.raises(InputError):
        project_prompt(loaded, p, "  ")
    with pytest.raises(InputError):
        project_prompt(loaded, p, text, n_pairs=0)


def test_figures_escape_tokens(projected):
    loaded, scan, projections = projected
    head = HeadRef(0, 2)
    p = projections.head(head)
    table = stored_pairs_table(p, projections.arrays["window_tokens"], scan.token_strings)
    table.loc[0, "context"] = "<script>alert(1)</script>"
    overlay = project_prompt(loaded, p, "a b a b", n_pairs=3)
    for color_by in COLOR_OPTIONS:
        for dims in (2, 3):
            fig = projection_figure(table, "O", color_by, dims, explained=p.fits["O"].explained, overlay=overlay)
            hover = [t for trace in fig.data for t in trace.text]
            assert len(hover) == len(table) + len(overlay)
            assert not any("<script>" in t for t in hover) and any("&lt;script&gt;" in t for t in hover)


def test_export_writes_umap_from_stored_projections(projected, tmp_path):
    _, scan, projections = projected
    out = tmp_path / "data"
    export_headvis(scan, out)
    assert validate_tree(out) == []
    config = json.loads((out / "config.json").read_text())
    assert config["has_umap"] and len(config["umap_heads"]) == scan.n_layers * scan.n_heads
    record = json.loads((out / "umap" / "L1H1.json").read_text())
    sequences = json.loads((out / "umap" / "sequences.json").read_text())
    p = projections.head(HeadRef(1, 1))
    assert record["top_q"] == p.queries.tolist() and "views" not in record and record["clusters"] == []
    assert np.allclose(record["pca"]["K"]["d1"], p.coords["K"][:, 1], atol=1e-4)
    assert all(len(sequences[i]) > record["top_q"][j] for j, i in enumerate(record["seq_idx"]))


def test_named_clusters_are_kept_exported_and_dropped_with_recomputed_projections(projected, tmp_path):
    import shutil

    from headvis_core.projections.clusters import delete_cluster, read_clusters, save_cluster
    from headvis_core.viz.projections import selected_rows

    loaded, scan, projections = projected
    folder = tmp_path / "scan"
    shutil.copytree(scan.path, folder)
    head = HeadRef(0, 3)
    p = projections.head(head)
    table = stored_pairs_table(p, projections.arrays["window_tokens"], scan.token_strings)
    fig = projection_figure(table, "Q", "query token")
    # a selection event carries each point's customdata: the row of the pairs table, whatever its trace
    points = [{"customdata": list(trace.customdata[0])} for trace in fig.data] + [{"customdata": [5]}]
    rows = selected_rows({"points": points})
    assert rows == sorted({int(t.customdata[0][0]) for t in fig.data} | {5})
    save_cluster(folder, head, "first", rows, len(p.norms))
    save_cluster(folder, head, "late", [1, 2], len(p.norms))
    save_cluster(folder, head, "first", [7, 3, 3], len(p.norms))
    assert read_clusters(folder, head) == [{"name": "late", "indices": [1, 2]}, {"name": "first", "indices": [3, 7]}]
    assert read_clusters(folder, HeadRef(0, 0)) == []
    for bad, message in (([], "Select some points"), ([len(p.norms)], "outside")):
        with pytest.raises(InputError, match=message):
            save_cluster(folder, head, "x", bad, len(p.norms))
    with pytest.raises(InputError, match="name"):
        save_cluster(folder, head, "  ", [1], len(p.norms))
    assert delete_cluster(folder, head, "late") and not delete_cluster(folder, head, "late")

    from headvis_core.scan import load_scan

    copied = load_scan(folder)
    export_headvis(copied, tmp_path / "data")
    record = json.loads((tmp_path / "data" / "umap" / "L0H3.json").read_text())
    # the frontend names a cluster's pairs by [seq_idx, top_q, top_k], its identity of a point
    assert record["clusters"] == [{"name": "first", "points": [[int(p.rows[i]), int(p.queries[i]), int(p.keys[i])]
                                                               for i in (3, 7)]}]
    assert validate_tree(tmp_path / "data") == []
    project_scan(loaded, copied, ProjectionParams(max_pairs=20, max_windows=4), heads=[head])
    assert read_clusters(folder, head) == []  # they named pairs of the old projections


def test_metric_colourings_draw_the_stored_per_pair_quantities(projected):
    """Colour by attention, norm, value norm, query position, distance: each point's colour is its pair's own
    value, checked against the model run again (A[q, k], ||A v_k W_O||, ||v_k W_O||)."""
    from headvis_core.viz.projections import COLOR_METRICS, color_options

    loaded, scan, projections = projected
    stored = load_projections(scan.path)
    tokens = torch.from_numpy(stored.arrays["window_tokens"])
    for head in (HeadRef(0, 1), HeadRef(1, 2)):
        p = stored.head(head)
        pattern, _, _, v, _ = activations(loaded, tokens, head)
        w_o = head_weights(loaded.model, head)
        rows, queries, keys = (torch.from_numpy(x.astype(np.int64)) for x in (p.rows, p.queries, p.keys))
        attention = pattern[rows, queries, keys].numpy()
        value_norm = (v[rows, keys] @ w_o).norm(dim=-1).numpy()
        expected = {"attention": attention, "norm": attention * value_norm, "value norm": value_norm,
                    "query position": p.queries, "distance": p.queries - p.keys}
        assert np.allclose(p.weights, attention, rtol=1e-5, atol=1e-7)
        table = stored_pairs_table(p, stored.arrays["window_tokens"], scan.token_strings)
        assert color_options(table) == list(COLOR_OPTIONS)
        for option in COLOR_METRICS:
            for dims in (2, 3):
                fig = projection_figure(table, "K", option, dims)
                drawn = np.asarray(fig.data[0].marker.color, np.float64)
                assert len(fig.data) == 1 and np.allclose(drawn, expected[option], rtol=1e-4, atol=1e-7), option
        # a typed prompt's pairs carry their own attention weights
        overlay = project_prompt(loaded, p, "a b c a b c", n_pairs=5)
        prompt_pattern = activations(loaded, loaded.model.to_tokens("a b c a b c"), head)[0]
        index = [torch.from_numpy(overlay[c].to_numpy().astype(np.int64)) for c in ("row", "query", "key")]
        assert np.allclose(overlay["weight"], prompt_pattern[index[0], index[1], index[2]].numpy(), rtol=1e-5)
        assert np.allclose(overlay["weight"] * overlay["value_norm"], overlay["norm"], rtol=1e-5)


def test_projections_stored_without_weights_offer_no_attention_colouring(projected):
    from headvis_core.projections.store import ProjectionSet
    from headvis_core.viz.projections import color_options

    _, scan, projections = projected
    old = ProjectionSet({k: v for k, v in projections.arrays.items() if k != "pair_weight"}, projections.meta)
    p = old.head(HeadRef(1, 0))
    assert p.weights is None
    table = stored_pairs_table(p, old.arrays["window_tokens"], scan.token_strings)
    assert "attention" not in color_options(table) and "value norm" not in color_options(table)
    assert "norm" in color_options(table) and "query position" in color_options(table)
    with pytest.raises(ValueError, match="recompute the projections"):
        projection_figure(table, "Q", "attention")
