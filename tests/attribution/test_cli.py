"""``python -m headvis_core attribute``: the JSON on success, ``error: ...`` and exit 2 on bad input."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROMPT = "The cat sat on the mat. The cat sat on"


@pytest.fixture(autouse=True)
def private_store(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADVIS_STORE_DIR", str(tmp_path / "store"))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "headvis_core", "attribute", *args], cwd=ROOT, capture_output=True,
                          timeout=300)


def test_writes_the_edge_json(tmp_path):
    out = tmp_path / "sub" / "edge.json"
    result = run_cli("--model", "tiny-llama", "--prompt", PROMPT, "--head", "1.2", "--query", "20", "--key", "7",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["head"] == "1.2" and data["query"] == 20 and data["key"] == 7
    assert data["score"] == pytest.approx(sum(t["value"] for t in data["qk_terms"]), rel=1e-4, abs=1e-6)
    assert b"key side" in result.stdout
    again = run_cli("--model", "tiny-llama", "--prompt", PROMPT, "--head", "1.2", "--query", "20", "--key", "7",
                    "--out", str(out))
    assert again.returncode == 0 and b"from the result store" in again.stdout
    assert json.loads(out.read_text(encoding="utf-8")) == data


def test_writes_dictionary_features(tmp_path, tiny_llama):
    from headvis_core.attribution.sae import random_sae, save_sae

    folder = save_sae(tmp_path / "sae", **random_sae(tiny_llama.model, layer=1, d_sae=64))
    out = tmp_path / "edge.json"
    result = run_cli("--model", "tiny-llama", "--prompt", PROMPT, "--head", "1.2", "--query", "20", "--key", "7",
                     "--sae", str(folder), "--sae-side", "key", "--out", str(out))
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(out.read_text(encoding="utf-8"))
    assert any(row["component"].startswith("F") for row in data["key_side"])
    assert not any(row["component"].startswith("F") for row in data["query_side"])


@pytest.mark.parametrize("args, message", [
    (["--head", "1.2", "--query", "3", "--key", "9"], "comes after the query"),
    (["--head", "1.2", "--query", "300", "--key", "9"], "out of range"),
    (["--head", "7.2", "--query", "20", "--key", "9"], "out of range"),
    (["--head", "x", "--query", "20", "--key", "9"], "is not a head"),
    (["--head", "1.2", "--query", "-1", "--key", "0"], "too small"),
    (["--head", "1.2", "--query", "20", "--key", "9", "--sae", "/nonexistent/sae"], "No SAE folder"),
])
def test_bad_input_is_an_error_message(tmp_path, capsys, args, message):
    from headvis_core.cli.main import main

    try:  # argparse's own errors exit; the command's return status 2
        status = main(["attribute", "--model", "tiny-llama", "--prompt", PROMPT, *args,
                       "--out", str(tmp_path / "e.json")])
    except SystemExit as exit_:
        status = exit_.code
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    assert "error:" in stderr and message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "e.json").exists()


def test_unwritable_out_and_long_prompt_are_refused(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    os.chmod(blocked, 0o500)
    try:
        result = run_cli("--model", "tiny-llama", "--prompt", PROMPT, "--head", "1.2", "--query", "2", "--key", "1",
                         "--out", str(blocked / "e.json"))
    finally:
        os.chmod(blocked, 0o700)
    if os.geteuid() != 0:  # root can write anywhere
        assert result.returncode == 2 and b"cannot write" in result.stderr
    long = run_cli("--model", "tiny-llama", "--prompt", "x" * 300, "--head", "1.2", "--query", "2", "--key", "1",
                   "--out", str(tmp_path / "e.json"))
    assert long.returncode == 2 and b"context" in long.stderr and b"Traceback" not in long.stderr


def test_non_utf8_prompt_bytes_do_not_crash(tmp_path):
    """Bytes that are not UTF-8 are decoded as Windows-1252, as every text argument is."""
    prompt = os.fsencode("caf") + b"\xe9 au lait, caf\xe9"
    out = tmp_path / "e.json"
    result = subprocess.run([sys.executable, "-m", "headvis_core", "attribute", "--model", "tiny-llama", "--prompt",
                             prompt, "--head", "1.0", "--query", "5", "--key", "4", "--out", str(out)],
                            cwd=ROOT, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    tokens = json.loads(out.read_text(encoding="utf-8"))["tokens"]
    assert len(tokens) == 1 + len("caf\u00e9 au lait, caf\u00e9".encode("utf-8"))  # BOS + the UTF-8 bytes
