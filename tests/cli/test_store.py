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


def test_results_of_changed_weights_are_not_shown_as_current(tmp_path, capsys):
    """A local model directory whose weights file changed by one value gets its atlas computed afresh."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from headvis_core.models.random_models import RANDOM_PRESETS, random_model_dir

    folder = tmp_path / "model"
    shutil.copytree(random_model_dir(RANDOM_PRESETS["tiny-gpt2"]), folder)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)
    args = ["atlas", "--model", str(folder), "--n-seqs", "2", "--seq-len", "16"]
    assert main(args + ["--out", str(tmp_path / "a.csv")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.csv")]) == 0
    assert "from the result store" in capsys.readouterr().out
    weights_file = next(folder.glob("*.safetensors"))
    weights = load_file(weights_file)
    name = next(n for n, t in weights.items() if t.dtype == torch.float32 and t.numel() > 1)
    weights[name].view(-1)[0] += 0.5  # one value of one tensor
    save_file(weights, weights_file, metadata={"format": "pt"})
    assert main(args + ["--out", str(tmp_path / "c.csv")]) == 0
    assert "from the result store" not in capsys.readouterr().out
