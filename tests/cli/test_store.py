"""The CLI subcommands share the result store: the same request twice does the work once."""

import json

from headvis_core.cli.main import main

ATLAS = ["atlas", "--model", "tiny-gpt2", "--n-seqs", "2", "--seq-len", "16"]


def test_atlas_twice_computes_once_and_no_cache_recomputes(tmp_path, capsys):
    assert main(ATLAS + ["--out", str(tmp_path / "a.csv")]) == 0
    assert "from the result store" not in capsys.readouterr().out
    assert main(ATLAS + ["--out", str(tmp_path / "b.csv")]) == 0
    assert "atlas: from the result store, computed at" in capsys.readouterr().out
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert main(ATLAS + ["--out", str(tmp_path / "c.csv"), "--no-cache"]) == 0
    assert "from the result store" not in capsys.readouterr().out
    assert main(ATLAS + ["--out", str(tmp_path / "d.csv"), "--seed", "1"]) == 0  # other inputs: computed
    assert "from the result store" not in capsys.readouterr().out


def test_store_list_and_clear(tmp_path, capsys):
    assert main(ATLAS + ["--out", str(tmp_path / "a.csv")]) == 0
    assert main(["ablate", "--model", "tiny-gpt2", "--prompt", "The cat sat on the", "--top", "2",
                 "--out", str(tmp_path / "r.json")]) == 0
    assert main(["ablate", "--model", "tiny-gpt2", "--prompt", "The cat sat on the", "--top", "2",
                 "--out", str(tmp_path / "r2.json")]) == 0
    assert "ranking: from the result store" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["result"] == json.loads((tmp_path / "r2.json").read_text())[
        "result"]
    assert main(["store", "list"]) == 0
    listed = capsys.readouterr().out
    assert "atlas" in listed and "kl_ranking" in listed and "2 result(s)" in listed
    assert main(["store", "list", "--kind", "atlas"]) == 0
    assert "1 result(s)" in capsys.readouterr().out
    assert main(["store", "clear", "--kind", "kl_ranking"]) == 0
    assert "removed 1 stored result(s)" in capsys.readouterr().out
    assert main(["store", "clear"]) == 0
    assert "removed 1 stored result(s)" in capsys.readouterr().out
    assert main(["store", "list"]) == 0
    assert "no stored results" in capsys.readouterr().out


def test_a_damaged_stored_result_is_recomputed_and_said_so(tmp_path, capsys, monkeypatch):
    from headvis_core.store.results import default_store

    assert main(ATLAS + ["--out", str(tmp_path / "a.csv")]) == 0
    capsys.readouterr()
    results, _ = default_store()._open()
    (key,) = list(results.iterkeys())
    data = bytearray(results.get(key))
    data[-100] ^= 0xFF  # one byte of the pickled atlas (small values live in the database, not in files)
    results.set(key, bytes(data))
    assert main(ATLAS + ["--out", str(tmp_path / "b.csv")]) == 0
    out = capsys.readouterr().out
    assert "note: The stored atlas result was damaged" in out and "from the result store" not in out
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
