import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import headvis_core.data.corpus as corpus_module
from headvis_core.data.corpus import DOCUMENT_SEPARATOR, encode, iter_window_batches, iter_windows, open_corpus
from headvis_core.errors import InputError


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first document, line one\nline two\n", encoding="utf-8")
    (root / "sub" / "b.txt").write_text("second document with \u00e9 and \u4e2d\n", encoding="utf-8")
    (root / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\nnot json\n" + json.dumps({"other": 1}) + "\n"
                                  + json.dumps({"text": "fourth"}) + "\n", encoding="utf-8")
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (root / "broken.txt").write_bytes(b"ok \x81\x8d\x8f\x90 \xff\xfe bad")  # neither UTF-8 nor cp1252
    (root / "notes.md").write_text("ignored: not a .txt file")
    (root / "empty.txt").write_text("")
    return root


def test_folder_reads_text_and_jsonl_and_counts_skipped_files(folder):
    corpus = open_corpus(str(folder))
    names = [p.name for p in corpus.files]
    assert names == ["a.txt", "c.jsonl", "latin1.txt", "b.txt"]  # sorted by relative path
    assert {(s.path, s.reason) for s in corpus.skipped} == {("image.txt", "binary"),
                                                            ("broken.txt", "not text in UTF-8 or Windows-1252")}
    assert [p.endswith("latin1.txt") for p in corpus.recoded] == [True]
    assert "skipped 2 unreadable" in corpus.description


def test_windows_are_the_joined_token_stream_cut_in_order(folder, tiny_gpt2):
    tok = tiny_gpt2.model.tokenizer
    corpus = open_corpus(str(folder))
    expected_text = DOCUMENT_SEPARATOR.join([
        "first document, line one\nline two\n", "third", "fourth", "caf\u00e9 cr\u00e8me\n",
        "second document with \u00e9 and \u4e2d\n"])
    expected = encode(tok, expected_text)
    windows = list(iter_windows(corpus, tok, 7))
    assert [w.index for w in windows] == list(range(len(expected) // 7))
    assert np.concatenate([w.tokens for w in windows]).tolist() == expected[:len(windows) * 7]
    batches = list(iter_window_batches(corpus, tok, 7, batch_size=3, block_chars=5))  # tiny blocks: same stream
    assert np.concatenate([b.tokens for b in batches]).ravel().tolist() == expected[:len(windows) * 7]
    assert [len(b.indices) for b in batches][:-1] == [3] * (len(batches) - 1)
    assert batches[-1].fraction_read == 1.0


def test_resuming_and_limiting_windows(folder, tiny_gpt2):
    tok = tiny_gpt2.model.tokenizer
    corpus = open_corpus(str(folder))
    all_windows = np.concatenate([b.tokens for b in iter_window_batches(corpus, tok, 5, 4)], axis=0)
    limited = list(iter_window_batches(corpus, tok, 5, 4, max_windows=6, start=2))
    assert np.concatenate([b.indices for b in limited]).tolist() == [2, 3, 4, 5]
    assert np.array_equal(np.concatenate([b.tokens for b in limited]), all_windows[2:6])


def test_single_txt_and_jsonl_files(tmp_path, tiny_gpt2):
    txt = tmp_path / "one.txt"
    txt.write_text("abcdefghij")
    corpus = open_corpus(str(txt))
    assert corpus.kind == "txt" and len(list(iter_windows(corpus, tiny_gpt2.model.tokenizer, 3))) == 3
    jsonl = tmp_path / "one.jsonl"
    jsonl.write_text(json.dumps({"body": "abcdef"}) + "\n")
    with pytest.raises(InputError, match="'text' field"):
        list(iter_windows(open_corpus(str(jsonl)), tiny_gpt2.model.tokenizer, 3))
    assert len(list(iter_windows(open_corpus(str(jsonl), text_field="body"), tiny_gpt2.model.tokenizer, 3))) == 2


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no readable"),  # empty folder
    (lambda d: (d / "x.bin.txt").write_bytes(b"\x00\x01\x02"), "x.bin.txt is binary"),
    (lambda d: (d / "blank.txt").write_text(""), "no readable"),
])
def test_folders_without_text_are_refused(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(InputError, match=message):
        open_corpus(str(tmp_path))


def test_bad_paths_and_files(tmp_path, tiny_gpt2):
    with pytest.raises(InputError, match="No corpus"):
        open_corpus("  ")
    with pytest.raises(InputError, match="no file or folder"):
        open_corpus(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="no file or folder"):
        open_corpus("missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        open_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="binary"):
        open_corpus(str(tmp_path / "bin.txt"))
    (tmp_path / "short.txt").write_text("ab")
    with pytest.raises(InputError, match="fewer than 8 tokens"):
        list(iter_windows(open_corpus(str(tmp_path / "short.txt")), tiny_gpt2.model.tokenizer, 8))


def test_dataset_name_fails_fast_offline(monkeypatch):
    import headvis_core.models.loader as models

    monkeypatch.setattr(models, "hub_reachable", lambda timeout=0: False)
    started = time.time()
    with pytest.raises(InputError, match="needs the network"):
        open_corpus("wikitext:wikitext-2-raw-v1:validation")
    assert time.time() - started < 5


def test_shared_corpus_opens(corpus_dir):
    corpus = open_corpus(str(corpus_dir / "gutenberg"))
    assert len(corpus.files) == 13 and not corpus.skipped  # README has no .txt suffix
    assert {p.split("/")[-1] for p in corpus.recoded} == {"chesterton-ball.txt", "shakespeare-caesar.txt"}


def test_unreadable_subfolders_and_files_are_skipped_with_a_note(folder, monkeypatch):
    """Permission errors are simulated (the tests may run as root, who reads everything)."""
    (folder / "locked").mkdir()
    (folder / "locked" / "secret.txt").write_text("never read")
    (folder / "locked_file.txt").write_text("never read either")
    real_scandir, real_looks_binary = os.scandir, corpus_module._looks_binary

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def looks_binary(path):
        if path.name == "locked_file.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real_looks_binary(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(corpus_module, "_looks_binary", looks_binary)
    corpus = open_corpus(str(folder))
    assert [p.name for p in corpus.files] == ["a.txt", "c.jsonl", "latin1.txt", "b.txt"]
    reasons = {s.path: s.reason for s in corpus.skipped}
    assert reasons["locked/"] == "unreadable folder (Permission denied)"
    assert reasons["locked_file.txt"] == "unreadable (Permission denied)"
    assert "skipped 4 unreadable" in corpus.description


def test_an_unreadable_root_folder_is_an_input_error(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("text")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(InputError, match=r"no readable.*\./ is unreadable folder \(Permission denied\)"):
        open_corpus(str(tmp_path))


@pytest.mark.parametrize("spec", ["/", "/proc", "/sys/kernel", "/dev", "/dev/null", "/proc/self/status",
                                  "/proc/../"])
def test_the_filesystem_root_and_system_folders_are_refused(spec):
    with pytest.raises(InputError, match="whole filesystem or a system folder"):
        open_corpus(spec)


def test_a_link_into_a_system_folder_is_refused(tmp_path):
    (tmp_path / "innocent").symlink_to("/proc")
    with pytest.raises(InputError, match="system folder"):
        open_corpus(str(tmp_path / "innocent"))
