"""Comparing two atlases: matching recovers planted counterparts, depth bins, same-shape deltas, CLI."""

import numpy as np
import pandas as pd
import pytest

from headvis_core.atlas.classes import classify_heads
from headvis_core.atlas.run import METRIC_COLUMNS, AtlasResult
from headvis_core.cli.main import main
from headvis_core.compare.deltas import CHANGE_THRESHOLD, delta_grid, head_deltas, same_shape
from headvis_core.compare.depth import behaviour_by_depth, depth_bins, relative_depth
from headvis_core.compare.matching import MATCH_METRICS, match_heads, tukey_fence
from headvis_core.compare.run import compare_atlases, compare_models
from headvis_core.errors import InputError
from headvis_core.viz.compare import comparison_report_html, delta_heatmap, depth_figure, pairs_figure, side_by_side


def random_table(n_layers: int, n_heads: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    table = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel()})
    for metric in METRIC_COLUMNS:
        table[metric] = rng.uniform(0, 1, len(table))
    table["copying"] = rng.uniform(-1, 1, len(table))
    return classify_heads(table)


def atlas(table: pd.DataFrame, name: str = "m") -> AtlasResult:
    return AtlasResult(table=table, model_name=name, n_layers=int(table.layer.max()) + 1,
                       n_heads=int(table["head"].max()) + 1, probe="test <probe>", notes=[], top_tokens={},
                       examples={}, seconds=0.0)


def test_a_relabelled_copy_is_matched_back_exactly():
    a = random_table(4, 3, seed=0)
    order = np.random.default_rng(1).permutation(len(a))
    b = a.iloc[order].reset_index(drop=True)
    b[["layer", "head"]] = a[["layer", "head"]].to_numpy()  # same profiles, shuffled over the grid
    matching = match_heads(a, b, 4, 4)
    assert len(matching.pairs) == 12 and np.allclose(matching.pairs.distance, 0)
    for row in matching.pairs.itertuples():
        source = a[(a.layer == row.layer_a) & (a["head"] == row.head_a)].index[0]
        assert order[b[(b.layer == row.layer_b) & (b["head"] == row.head_b)].index[0]] == source
    assert matching.unmatched.empty and matching.outliers.empty


def test_the_assignment_is_optimal_against_every_permutation_of_a_small_case():
    from itertools import permutations

    from scipy.spatial.distance import cdist

    a, b = random_table(1, 5, seed=2), random_table(1, 5, seed=3)
    cost = cdist(a[list(MATCH_METRICS)].to_numpy(), b[list(MATCH_METRICS)].to_numpy())
    best = min(sum(cost[i, p[i]] for i in range(5)) for p in permutations(range(5)))
    assert match_heads(a, b, 1, 1).pairs.distance.sum() == pytest.approx(best)


def test_unpaired_heads_and_outliers():
    a = random_table(2, 4, seed=4)
    rng = np.random.default_rng(5)
    b = a.copy()  # B = A plus a third layer of near-copies of A's layer 0, with a little noise everywhere
    extra = a[a.layer == 0].copy().assign(layer=2)
    b = pd.concat([b, extra], ignore_index=True)
    b[list(MATCH_METRICS)] += rng.normal(0, 0.02, (len(b), len(MATCH_METRICS)))
    b.loc[b.index[-4], list(MATCH_METRICS)] = 25.0  # head 2.0: nothing in A is anywhere near it
    b = classify_heads(b.drop(columns=["behaviour", "confidence", "behaviours"]))
    matching = match_heads(a, b, 2, 3)
    assert len(matching.pairs) == 8 and len(matching.unmatched) == 4
    assert set(matching.unmatched.model) == {"B"}
    outliers = matching.outliers
    assert list(outliers.kind) == ["no counterpart"] and (outliers.layer.iloc[0], outliers["head"].iloc[0]) == (2, 0)
    assert tukey_fence(np.array([])) == float("inf")


def test_relative_depth_and_behaviour_counts():
    assert relative_depth([0, 29], 30).tolist() == pytest.approx([0.5 / 30, 29.5 / 30])
    assert depth_bins(np.arange(18), 18).tolist() == [0] * 4 + [1] * 3 + [2] * 4 + [3] * 3 + [4] * 4
    table = random_table(5, 2, seed=5)
    depth = behaviour_by_depth(table, 5, "m")
    assert depth.heads.sum() == 10
    for _label, rows in depth.groupby("depth"):
        assert rows.heads.sum() == 2 and rows.share.sum() == pytest.approx(1.0)


def test_same_shape_deltas_and_changed_heads():
    a = random_table(3, 2, seed=6)
    b = a.copy()
    b.loc[(b.layer == 1) & (b["head"] == 0), "induction"] += 0.5
    b.loc[(b.layer == 2) & (b["head"] == 1), "entropy"] += CHANGE_THRESHOLD / 2  # too small to count
    b = classify_heads(b.drop(columns=["behaviour", "confidence", "behaviours"]))
    deltas = head_deltas(a, b)
    assert same_shape(a, b) and len(deltas) == 6
    changed = deltas[deltas.changed]
    assert [(int(r.layer), int(r.head)) for r in changed.itertuples()] == [(1, 0)]
    assert changed.largest_change.iloc[0] == "induction" and changed.largest_delta.iloc[0] == pytest.approx(0.5)
    grid = delta_grid(deltas, "induction", 3, 2)
    assert grid[1, 0] == pytest.approx(0.5) and np.count_nonzero(grid) == 1
    with pytest.raises(InputError, match="same shape"):
        head_deltas(a, random_table(2, 2, seed=7))
    with pytest.raises(InputError, match="No metric"):
        delta_grid(deltas, "bogus", 3, 2)


def test_comparison_figures_and_escaped_report():
    a, b = random_table(3, 2, seed=8), random_table(3, 2, seed=9)
    comparison = compare_atlases(atlas(a, "<script>alert(1)</script>"), atlas(b, "b"), "<script>alert(1)</script>",
                                 "b")
    assert comparison.same_shape and len(comparison.summary()) == 4
    for fig in (side_by_side(comparison), depth_figure(comparison.depth), pairs_figure(comparison.matching),
                delta_heatmap(comparison, "copying")):
        assert fig.data
    page = comparison_report_html(comparison)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "test &lt;probe&gt;" in page and "Same shape: per-head changes" in page
    different = compare_atlases(atlas(a), atlas(random_table(2, 3, seed=10)))
    assert not different.same_shape and different.changed.empty
    assert "Same shape" not in comparison_report_html(different)
    with pytest.raises(ValueError, match="same shape"):
        delta_heatmap(different)


def test_compare_models_loads_one_model_at_a_time():
    from headvis_core.models.loader import load_model

    live = []

    def loader(name):
        def load():
            assert not live, "the first model is still held"
            loaded = load_model(name, device="cpu")
            live.append(name)
            import weakref

            weakref.finalize(loaded, live.remove, name)
            return loaded
        return load

    comparison = compare_models(loader("tiny-llama"), loader("tiny-gemma3"), "tiny-llama", "tiny-gemma3",
                                n_seqs=4, seq_len=24)
    assert (comparison.atlas_a.n_layers, comparison.atlas_b.n_layers) == (2, 3)
    assert len(comparison.matching.pairs) == 8 and len(comparison.matching.unmatched) == 4


def test_cli_writes_the_report_and_csvs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--model", "tiny-llama", "--model", "tiny-llama", "--out", str(out),
                 "--n-seqs", "4", "--seq-len", "24"]) == 0
    printed = capsys.readouterr().out
    assert "0 of 8 heads changed" in printed
    assert {p.name for p in out.iterdir()} == {"report.html", "heads.csv", "pairs.csv", "unmatched.csv",
                                               "depth.csv", "deltas.csv"}
    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) == 8 and (pairs.distance == 0).all()
    assert main(["compare", "--model", "tiny-llama", "--model", "tiny-gemma3", "--out", str(out),
                 "--n-seqs", "4", "--seq-len", "24"]) == 0
    assert not (out / "deltas.csv").exists()  # a stale same-shape file is not left beside a new comparison
    assert len(pd.read_csv(out / "heads.csv")) == 8 + 12


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-llama"], "exactly two models"),
    (["--model", "tiny-llama", "--model", "tiny-gpt2", "--seq-len", "4"], "too short"),
    (["--model", "tiny-llama", "--model", "tiny-gpt2", "--corpus", "/no/such/folder"], "does not exist"),
])
def test_cli_errors_before_any_model_loads(tmp_path, capsys, argv, message):
    assert main(["compare", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_an_output_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["compare", "--model", "tiny-llama", "--model", "tiny-gpt2", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
