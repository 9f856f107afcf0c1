"""Custom sequences (against the model's own pattern), deep links, and the export-headvis command."""

import json

import numpy as np
import pytest

from headvis_core.cli.main import main
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.headvis_format.custom import (
    add_custom_sequence,
    delete_custom_sequence,
    read_custom_sequences,
)
from headvis_core.headvis_format.export import export_headvis
from headvis_core.headvis_format.links import parse_deep_link
from headvis_core.headvis_format.validate import validate_tree
from headvis_core.hooks import capture, pattern_hook
from tests.headvis_format.scans import tiny_scan


@pytest.fixture(scope="module")
def scan(tiny_llama, tmp_path_factory):
    return tiny_scan(tiny_llama, tmp_path_factory.mktemp("custom"))


def test_custom_sequences_are_added_kept_and_deleted(tiny_llama, scan, tmp_path):
    head = HeadRef(1, 3)
    text = "the cat sat <b>on</b> the mat, the cat"
    first = add_custom_sequence(tiny_llama, scan.path, head, text)
    second = add_custom_sequence(tiny_llama, scan.path, head, "abc abc abc")
    assert (first["sequence_id"], second["sequence_id"]) == (1, 2)
    assert [s["text"] for s in read_custom_sequences(scan.path, head)] == [text, "abc abc abc"]
    assert read_custom_sequences(scan.path, HeadRef(0, 0)) == []

    # the kept entries are the model's own top-5 weights of each query, rounded
    tokens = tiny_llama.model.to_tokens(text)
    _, cache = capture(tiny_llama.model, tokens, [pattern_hook(1)])
    dense = cache[pattern_hook(1)][0, 3].numpy()
    n = dense.shape[0]
    assert first["seq_len"] == n and first["interval"] == -1
    for index, value in zip(first["attention_indices"], first["attention_values"]):
        q, k = divmod(index, n)
        assert value == round(float(dense[q, k]), 4) and k <= q
        assert (dense[q] > dense[q, k] + 1e-4).sum() < 5  # among the row's 5 largest

    out = tmp_path / "data"
    export_headvis(scan, out)
    exported = json.loads((out / "custom_sequences" / "L1H3.json").read_text())["sequences"]
    assert [s["sequence_id"] for s in exported] == ["c1", "c2"]  # the frontend's mark of a custom sequence
    assert validate_tree(out) == []

    assert delete_custom_sequence(scan.path, head, 1)
    assert not delete_custom_sequence(scan.path, head, 1)
    assert [s["sequence_id"] for s in read_custom_sequences(scan.path, head)] == [2]
    assert add_custom_sequence(tiny_llama, scan.path, head, "x y")["sequence_id"] == 3


def test_custom_sequence_bad_input(tiny_llama, scan, tmp_path):
    with pytest.raises(InputError, match="empty"):
        add_custom_sequence(tiny_llama, scan.path, HeadRef(0, 0), "   ")
    with pytest.raises(InputError, match="out of range"):
        add_custom_sequence(tiny_llama, scan.path, HeadRef(5, 0), "text")
    with pytest.raises(InputError, match="Open a scan"):
        add_custom_sequence(tiny_llama, tmp_path / "missing", HeadRef(0, 0), "text")


def test_deep_links():
    link = parse_deep_link({"layer": "1", "head": "2", "tab": "pca", "interval": "7"}, 2, 4)
    assert (link.layer, link.head, link.tab, link.interval, link.notes) == (1, 2, "pca", 7, ())
    assert parse_deep_link(link.params(), 2, 4) == link
    custom = parse_deep_link({"layer": "0", "head": "1", "interval": "-1"}, 2, 4)
    assert custom.custom and custom.tab == "custom"
    hostile = parse_deep_link({"layer": "9", "head": "x", "tab": "<script>", "interval": "inf"}, 2, 4)
    assert (hostile.layer, hostile.head, hostile.tab, hostile.interval) == (0, 0, "examples", 10)
    assert len(hostile.notes) == 4
    assert parse_deep_link({}, 2, 4) == parse_deep_link({"interval": "10"}, 2, 4)
    # links copied from the HeadVis frontend use its tab names
    for theirs, ours in (("sequences", "examples"), ("metrics", "tokens"), ("umap", "pca")):
        link = parse_deep_link({"layer": "1", "head": "3", "tab": theirs, "interval": "10", "reduction": "max"}, 2, 4)
        assert (link.tab, link.notes) == (ours, ())


def test_export_command(scan, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["export-headvis", "--scan", str(scan.path), "--out", str(out)]) == 0
    assert "checked against the HeadVis contract" in capsys.readouterr().out
    assert main(["export-headvis", "--check", str(out)]) == 0
    assert "valid HeadVis data" in capsys.readouterr().out
    assert main(["export-headvis", "--scan", str(scan.path), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export-headvis", "--scan", str(scan.path), "--out", str(out), "--force"]) == 0
    capsys.readouterr()
    heads = out / "heads" / "L0H0.json"
    heads.write_text(heads.read_text().replace('"interval":', '"interval":"x","old":', 1))
    assert main(["export-headvis", "--check", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "heads/L0H0.json" in err and "interval" in err
    assert main(["export-headvis", "--scan", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert main(["export-headvis", "--scan", str(out), "--out", str(tmp_path / "o")]) == 2
    assert main(["export-headvis", "--scan", str(scan.path), "--out", str(tmp_path / "o"),
                 "--keys-per-query", "0"]) == 2
    assert not (tmp_path / "o").exists()
    assert main(["export-headvis", "--scan", str(scan.path), "--out", "/proc/headvis-data"]) == 2
    assert "system folder" in capsys.readouterr().err


def test_custom_sequences_of_an_imported_tree_sit_in_the_tree(tiny_llama, scan, tmp_path):
    from headvis_core.headvis_format.importer import import_headvis

    out = tmp_path / "data"
    export_headvis(scan, out)
    tree = import_headvis(out)
    add_custom_sequence(tiny_llama, tree.path, HeadRef(0, 2), "hello there")
    assert validate_tree(out) == []
    assert np.array(json.loads((out / "custom_sequences/L0H2.json").read_text())["sequences"]).size == 1


def test_an_unwritable_destination_is_a_clear_error(scan, tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(InputError, match="Cannot write the HeadVis data.*Permission denied"):
        export_headvis(scan, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_custom_sequences_in_a_headvis_tree_get_the_frontends_ids(tiny_llama, scan, tmp_path):
    out = tmp_path / "data"
    export_headvis(scan, out)
    head = HeadRef(0, 2)
    old = {"sequence_id": 4, "interval": -1, "tokens": ["a"], "attention_indices": [0], "attention_values": [1.0],
           "seq_len": 1, "max_activation": 0.0}  # an id written before ids took the c prefix
    (out / "custom_sequences" / "L0H2.json").write_text(json.dumps({"sequences": [old]}))
    added = add_custom_sequence(tiny_llama, out, head, "one two")
    assert added["sequence_id"] == "c5" and added["interval"] == -1
    assert [s["sequence_id"] for s in read_custom_sequences(out, head)] == [4, "c5"]
    assert delete_custom_sequence(out, head, "c5") and delete_custom_sequence(out, head, 4)
    assert read_custom_sequences(out, head) == []


def test_check_command_lists_warnings_and_accepts_them(scan, tmp_path, capsys):
    out = tmp_path / "data"
    export_headvis(scan, out)
    (out / "custom_sequences" / "L0H1.json").unlink()  # as Neuronpedia's pipeline writes none
    assert main(["export-headvis", "--check", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "valid HeadVis data" in printed
    assert "warning: custom_sequences/L0H1.json: (file): missing" in printed
