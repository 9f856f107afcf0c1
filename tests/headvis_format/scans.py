"""A small stored scan of a tiny model on random words, shared by the headvis_format and projections tests."""

import random
from pathlib import Path

from headvis_core.data.corpus import open_corpus
from headvis_core.scan import ScanParams, run_scan

PARAMS = ScanParams(window_len=16, max_windows=40, examples_per_decile=2, top_examples=4, top_k_keys=3,
                    reservoir_size=30, histogram_bins=512)


def write_corpus(root: Path) -> Path:
    """Random lowercase words (every window differs), plus a line with markup to check escaping."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))) for _ in range(400)]
    words[5:5] = ["<script>alert(1)</script>"]
    (root / "a.txt").write_text(" ".join(words), encoding="utf-8")
    return root


def tiny_scan(loaded, tmp: Path, params: ScanParams = PARAMS):
    return run_scan(loaded, open_corpus(str(write_corpus(tmp / "corpus"))), params, out_dir=tmp / "scans")
