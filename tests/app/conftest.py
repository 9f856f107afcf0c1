"""Fixtures shared by the page tests."""

import random

import pytest

from headvis_core.scan import store as scans


@pytest.fixture
def scans_dir(tmp_path, monkeypatch):
    folder = tmp_path / "scans"
    monkeypatch.setattr(scans, "scans_root", lambda: folder)
    return folder


@pytest.fixture
def text_dir(tmp_path, monkeypatch):
    rng = random.Random(1)
    root = tmp_path / "corpus"
    root.mkdir()
    monkeypatch.setenv("HEADVIS_CORPUS_ROOTS", str(root))  # the app reads corpora only under allowed roots
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 5))) for _ in range(200)]
    (root / "words.txt").write_text(" ".join(words))
    (root / "photo.txt").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")  # binary, named .txt
    return root
