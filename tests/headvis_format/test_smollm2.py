"""Real-model tier: a SmolLM2 scan of 64 windows of ../shared/corpus exported, validated and read back; the stored
PCA of a known previous-token head reproduces the projection of its own inputs."""

import numpy as np
import pytest
import torch

from headvis_core.data.corpus import open_corpus
from headvis_core.heads import HeadRef, all_heads
from headvis_core.headvis_format.export import export_headvis
from headvis_core.headvis_format.importer import import_headvis
from headvis_core.headvis_format.validate import validate_tree
from headvis_core.projections.pairs import KINDS
from headvis_core.projections.prompt import pair_vectors
from headvis_core.projections.run import ProjectionParams, project_scan
from headvis_core.scan import ScanParams, run_scan

PREVIOUS_TOKEN_HEAD = HeadRef(16, 0)  # most of its attention outside position 0 goes to the previous token


@pytest.fixture(scope="module")
def smollm2_scan(smollm2, corpus_dir, tmp_path_factory):
    corpus = open_corpus(str(corpus_dir / "gutenberg"))
    return run_scan(smollm2, corpus, ScanParams(window_len=32, max_windows=64, examples_per_decile=2),
                    out_dir=tmp_path_factory.mktemp("smol"), batch_size=8)


def test_smollm2_export_passes_the_contract_and_round_trips(smollm2_scan, tmp_path):
    scan = smollm2_scan
    assert scan.n_windows == 64
    summary = export_headvis(scan, tmp_path / "data")
    assert summary.n_heads == 270 and validate_tree(tmp_path / "data") == []
    imported = import_headvis(tmp_path / "data")
    for head in all_heads(30, 9):
        for a, b in zip(scan.deciles(head), imported.deciles(head), strict=True):
            assert (a.decile, a.n_windows, [(e.window_index, e.score) for e in a.examples]) == \
                   (b.decile, b.n_windows, [(e.window_index, e.score) for e in b.examples])
        ours, theirs = scan.top_tokens(head, "key", n=10), imported.top_tokens(head, "key", n=10)
        assert ours["token"].tolist() == theirs["token"].tolist()
        assert np.array_equal(ours["mean_attention"].values, theirs["mean_attention"].values)


def test_smollm2_pca_of_a_previous_token_head(smollm2, smollm2_scan):
    projections = project_scan(smollm2, smollm2_scan, ProjectionParams(max_pairs=300, max_windows=16),
                               heads=[PREVIOUS_TOKEN_HEAD])
    p = projections.head(PREVIOUS_TOKEN_HEAD)
    assert len(p.norms) == 300
    assert np.mean(p.queries - p.keys == 1) > 0.5  # its strongest pairs are previous-token pairs
    tokens = torch.from_numpy(projections.arrays["window_tokens"])
    vectors = pair_vectors(smollm2, tokens, PREVIOUS_TOKEN_HEAD, p.rows, p.queries, p.keys)
    for kind in KINDS:
        assert np.allclose(p.fits[kind].transform(vectors[kind]), p.coords[kind], atol=1e-3)
