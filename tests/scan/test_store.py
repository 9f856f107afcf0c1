"""Scan folders: the manifest's status is tied to the checksummed data it names."""

import json
import random

import numpy as np
import pytest

from headvis_core.data.corpus import open_corpus
from headvis_core.errors import CorruptFileError
from headvis_core.scan import ScanParams, list_scans, load_scan, run_scan
from headvis_core.scan.store import MANIFEST, read_stage, write_stage
from tests.conftest import interrupted_scan


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    rng = random.Random(1)
    root = tmp_path_factory.mktemp("store_corpus")
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 5))) for _ in range(200)]
    (root / "a.txt").write_text(" ".join(words) + "\n")
    return root


def edit_manifest(folder, **changes):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.update(changes)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_a_stage_round_trips_without_its_stage_in_the_meta(tmp_path):
    arrays = {"x": np.arange(5, dtype=np.int64)}
    write_stage(tmp_path, "partial", arrays, {"n_windows": 4}, {"windows_done": 4})
    status, read_arrays, meta = read_stage(tmp_path)
    assert status == "partial" and meta == {"n_windows": 4}
    assert np.array_equal(read_arrays["x"], arrays["x"])


def test_a_manifest_edited_to_complete_over_a_checkpoint_is_refused(tmp_path):
    write_stage(tmp_path, "partial", {"x": np.zeros(3)}, {"n_windows": 4}, {"windows_done": 4})
    edit_manifest(tmp_path, status="complete")
    with pytest.raises(CorruptFileError, match="says 'complete'.*'partial'"):
        read_stage(tmp_path)
    edit_manifest(tmp_path, status="partial")  # put back: readable again
    assert read_stage(tmp_path)[0] == "partial"


def test_a_partial_scan_marked_complete_is_recomputed_not_shown(tiny_gpt2, text_dir, tmp_path):
    corpus = open_corpus(str(text_dir))
    params = ScanParams(window_len=8, max_windows=16, examples_per_decile=1, reservoir_size=8)
    interrupted_scan(tiny_gpt2, corpus, params, tmp_path / "a", 4)
    [stored] = list_scans(tmp_path / "a")
    assert (stored.status, stored.windows) == ("partial", 8)
    edit_manifest(stored.folder, status="complete", windows_done=16)
    with pytest.raises(CorruptFileError, match="edited or damaged"):
        load_scan(stored.folder)
    messages = []
    redone = run_scan(tiny_gpt2, corpus, params, out_dir=tmp_path / "a", batch_size=4,
                      progress=lambda f, m: messages.append(m))
    assert any("edited or damaged" in m and "Recomputing" in m for m in messages)
    whole = run_scan(tiny_gpt2, corpus, params, out_dir=tmp_path / "b", batch_size=4)
    assert redone.n_windows == whole.n_windows == 16 and redone.meta["resumed_from"] == 0
    for name in whole.arrays:
        assert np.array_equal(redone.arrays[name], whole.arrays[name], equal_nan=True), name
    assert load_scan(redone.path).n_windows == 16
