"""Every class of bad input of issue #15 gives ``error: ...`` and exit status 2 from the CLI, never a traceback,
and a bad output path fails before any work is done."""

import os
import subprocess
import sys

import pytest

from headvis_core.cli.main import main
from tests.conftest import ROOT

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("in the way")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02PNG\x00" * 10)
    (tmp_path / "undecodable.txt").write_bytes(b"\x81\x8d\x8f\x90\x9d\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the cat sat on the mat. " * 50)
    return tmp_path


ATLAS = ["atlas", "--model", "tiny-gpt2", "--n-seqs", "2", "--seq-len", "16"]
SCAN = ["scan", "--model", "tiny-gpt2", "--corpus", "{tmp}/corpus", "--max-windows", "4"]
SWEEP = ["sweep", "--model", "tiny-llama", "--template", "In {year} the war ended.", "--heads", "0.1"]
ABLATE = ["ablate", "--model", "tiny-gpt2", "--prompt", PROMPT]
GRAPH = ["graph", "--model", "tiny-gpt2"]

# (id, argv, what the message must say); {tmp} is the test's folder
BAD_INPUTS = [
    # counts that are zero or negative, numbers that are not numbers
    ("atlas batch 0", ATLAS + ["--out", "{tmp}/m.csv", "--batch-size", "0"], "--batch-size: 0 is too small"),
    ("atlas batch -1", ATLAS + ["--out", "{tmp}/m.csv", "--batch-size", "-1"], "--batch-size: -1 is too small"),
    ("atlas induction -2", ATLAS + ["--out", "{tmp}/m.csv", "--n-induction-seqs", "-2"], "-2 is too small"),
    ("atlas n-seqs 0", ATLAS + ["--out", "{tmp}/m.csv", "--n-seqs", "0"], "0 is too small"),
    ("atlas seq-len 3", ATLAS + ["--out", "{tmp}/m.csv", "--seq-len", "3"], "too short"),
    ("atlas seq-len text", ATLAS + ["--out", "{tmp}/m.csv", "--seq-len", "ten"], "not a whole number"),
    ("atlas seed -1", ATLAS + ["--out", "{tmp}/m.csv", "--seed", "-1"], "-1 is too small"),
    ("scan batch 0", SCAN + ["--batch-size", "0"], "--batch-size: 0 is too small"),
    ("scan batch -1", SCAN + ["--batch-size", "-1"], "--batch-size: -1 is too small"),
    ("scan window 1", SCAN + ["--window", "1"], "--window: 1 is too small"),
    ("scan window past context", SCAN + ["--window", "8191"], "window length must be between"),
    ("scan max-windows -1", SCAN + ["--max-windows", "-1"], "-1 is too small"),
    ("scan examples 0", SCAN + ["--examples", "0"], "0 is too small"),
    ("scan corpus /", ["scan", "--model", "tiny-gpt2", "--corpus", "/"], "the whole filesystem or a system folder"),
    ("scan corpus /proc", ["scan", "--model", "tiny-gpt2", "--corpus", "/proc/self"], "a system folder"),
    ("atlas corpus /", ATLAS + ["--out", "{tmp}/m.csv", "--corpus", "/"], "the whole filesystem"),
    ("ablate top -1", ABLATE + ["--top", "-1", "--out", "{tmp}/r.json"], "--top: -1 is too small"),
    ("ablate top 0", ABLATE + ["--top", "0", "--out", "{tmp}/r.json"], "--top: 0 is too small"),
    ("ablate budget 0", ABLATE + ["--mode", "targeted", "--budget", "0", "--out", "{tmp}/r.json"], "0 is too small"),
    ("ablate refine 0", ABLATE + ["--mode", "estimate", "--refine", "0", "--out", "{tmp}/r.json"], "0 is too small"),
    ("ablate n-prompts 0", ["ablate", "--model", "tiny-gpt2", "--preset", "induction", "--n-prompts", "0",
                            "--out", "{tmp}/r.json"], "0 is too small"),
    ("induction half-len -3", ["ablate", "--model", "tiny-gpt2", "--preset", "induction", "--half-len", "-3",
                               "--out", "{tmp}/r.json"], "-3 is too small"),
    ("induction half-len past context", ["ablate", "--model", "tiny-gpt2", "--preset", "induction",
                                         "--half-len", "4000", "--out", "{tmp}/r.json"],
     "longer than this model's context of 256: use at most 127"),
    ("sweep level nan", SWEEP + ["--slot", "year=1000..1010", "--level", "nan"], "'nan' is not a finite number"),
    ("sweep level inf", SWEEP + ["--slot", "year=1000..1010", "--level", "inf"], "'inf' is not a finite number"),
    ("sweep level abc", SWEEP + ["--slot", "year=1000..1010", "--level", "abc"], "'abc' is not a number"),
    ("sweep range of letters", SWEEP + ["--slot", "year=a..b"], "is not a range of whole numbers"),
    ("sweep range with a letter", SWEEP + ["--slot", "year=1000..19x9"], "is not a range of whole numbers"),
    ("sweep unused slot", SWEEP + ["--slot", "year=1000..1010", "--slot", "noun=war,feud"],
     "noun is defined but not used"),
    ("sweep sample 0", SWEEP + ["--slot", "year=1000..1010", "--sample", "0"], "0 is too small"),
    ("sweep batch-tokens 0", SWEEP + ["--slot", "year=1000..1010", "--batch-tokens", "0"], "0 is too small"),
    ("graph top-k -1", GRAPH + ["--top-k", "-1"], "-1 is too small"),
    ("graph threshold nan", GRAPH + ["--threshold", "nan"], "not a finite number"),
    ("graph patch-max 0", GRAPH + ["--patch-max", "0"], "0 is too small"),
    ("store action", ["store", "drop"], "invalid choice"),
    # output paths, checked before any work
    ("atlas out is a folder", ATLAS + ["--out", "{tmp}/a_dir"], "is a folder"),
    ("atlas out in /proc", ATLAS + ["--out", "/proc/headvis.csv"], "system folder"),
    ("atlas report in /proc", ATLAS + ["--out", "{tmp}/m.csv", "--report", "/proc/self/report.html"],
     "system folder"),
    ("atlas out under a file", ATLAS + ["--out", "{tmp}/a_file/m.csv"], "is a file, so no folder can be made"),
    ("atlas out empty", ATLAS + ["--out", " "], "--out is empty"),
    ("scan out is a file", SCAN + ["--out", "{tmp}/a_file"], "is a file: give a folder"),
    ("scan out in /proc", SCAN + ["--out", "/proc/scans"], "system folder"),
    ("sweep out is a folder", SWEEP + ["--slot", "year=1000..1010", "--out", "{tmp}/a_dir"], "is a folder"),
    ("sweep figure in /sys", SWEEP + ["--slot", "year=1000..1010", "--figure", "/sys/f.html"], "system folder"),
    ("ablate out is a folder", ABLATE + ["--out", "{tmp}/a_dir"], "is a folder"),
    ("ablate out in /dev", ABLATE + ["--out", "/dev/shm/../r.json"], "system folder"),
    ("graph out suffix", GRAPH + ["--out", "{tmp}/g.txt"], "give a file ending in .graphml, .json, .html"),
    ("graph out in /proc", GRAPH + ["--out", "/proc/g.html"], "system folder"),
    # files that are not text
    ("ablate binary prompts", ["ablate", "--model", "tiny-gpt2", "--prompts", "{tmp}/binary.txt",
                               "--out", "{tmp}/r.json"], "is binary, not text"),
    ("ablate undecodable prompts", ["ablate", "--model", "tiny-gpt2", "--prompts", "{tmp}/undecodable.txt",
                                    "--out", "{tmp}/r.json"], "not text in UTF-8 or Windows-1252"),
    ("ablate empty prompts", ["ablate", "--model", "tiny-gpt2", "--prompts", "{tmp}/empty.txt",
                              "--out", "{tmp}/r.json"], "holds no prompts"),
    ("ablate missing prompts", ["ablate", "--model", "tiny-gpt2", "--prompts", "{tmp}/nothing.txt",
                                "--out", "{tmp}/r.json"], "does not exist"),
    ("ablate prompts is a folder", ["ablate", "--model", "tiny-gpt2", "--prompts", "{tmp}/a_dir",
                                    "--out", "{tmp}/r.json"], "is a folder"),
    # a placement split cannot go to Ray workers (each loads the model on one device)
    ("scan ray with device map", SCAN + ["--out", "{tmp}/s", "--ray", "auto", "--n-devices", "2"],
     "--n-devices cannot be used with --ray"),
    ("atlas ray with max memory", ATLAS + ["--out", "{tmp}/m.csv", "--ray", "auto", "--device-map", "auto",
                                           "--max-memory", '{"cpu": "1GiB"}'],
     "--device-map, --max-memory cannot be used with --ray"),
    ("scan stall 0", SCAN + ["--out", "{tmp}/s", "--stall-seconds", "0"], "--stall-seconds: 0 is too small"),
    ("scan ray bad address", SCAN + ["--out", "{tmp}/s", "--ray", "not an address"], "not a Ray cluster address"),
]


@pytest.mark.parametrize("argv, message", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_an_error_message_and_status_2(argv, message, paths, capsys):
    argv = [arg.replace("{tmp}", str(paths)) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:  # argparse refusals exit from inside parse_args
        sys.exit(main(argv))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") or "\nerror: " in captured.err, captured.err
    assert message in captured.err, captured.err
    assert "Traceback" not in captured.err + captured.out
    written = {p.name for p in paths.iterdir()} - {"a_dir", "a_file", "binary.txt", "undecodable.txt", "empty.txt",
                                                   "corpus", "store"}
    assert written == set(), f"wrote {written} although the input was bad"


def test_a_request_over_the_memory_cap_is_refused_with_the_estimate_and_the_limit(paths, capsys, monkeypatch):
    monkeypatch.setenv("HEADVIS_MEMORY_CAP_GB", "0.01")  # below what the process already holds
    status = main(ATLAS + ["--out", str(paths / "m.csv")])
    err = capsys.readouterr().err
    assert status == 2 and "error: The atlas (4 sequences of 16 tokens per pass) needs about" in err
    assert "needs about" in err and "over the limit of 10 MiB" in err and "HEADVIS_MEMORY_CAP_GB" in err
    assert not (paths / "m.csv").exists()


def test_missing_output_folders_are_made_for_every_command(paths, capsys):
    deep = paths / "new" / "deeper"
    assert main(SWEEP + ["--slot", "year=1000..1003", "--out", str(deep / "s.csv"),
                         "--figure", str(deep / "f" / "s.html")]) == 0
    assert (deep / "s.csv").is_file() and (deep / "f" / "s.html").is_file()
    assert main(ATLAS + ["--out", str(deep / "a" / "m.csv")]) == 0
    assert main(ABLATE + ["--top", "2", "--out", str(deep / "b" / "r.json")]) == 0
    assert main(GRAPH + ["--out", str(deep / "c" / "g.json")]) == 0
    assert {p.name for p in (deep / "a").iterdir()} == {"m.csv"}


def test_a_prompts_file_in_latin1_is_read_as_the_corpus_reader_reads_it(paths, capsys):
    (paths / "latin1.txt").write_bytes("Le café de Zoé est près du".encode("latin-1"))
    assert main(["ablate", "--model", "tiny-gpt2", "--prompts", str(paths / "latin1.txt"), "--top", "1",
                 "--out", str(paths / "r.json")]) == 0
    import json

    assert json.loads((paths / "r.json").read_text())["prompts"] == ["Le café de Zoé est près du"]


def _run_bytes(*args: bytes | str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8", LC_ALL="C.UTF-8")
    return subprocess.run([sys.executable, "-m", "headvis_core", *args], cwd=ROOT, capture_output=True, env=env,
                          timeout=300)


def test_undecodable_bytes_in_a_prompt_are_decoded_like_a_file(tmp_path):
    result = _run_bytes("ablate", "--model", "tiny-gpt2", "--prompt", b"Le caf\xe9 de Zo\xe9 est", "--top", "1",
                        "--out", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr.decode()
    import json

    assert json.loads((tmp_path / "r.json").read_text())["prompts"] == ["Le café de Zoé est"]


def test_bytes_that_are_not_text_in_a_template_are_an_error(tmp_path):
    result = _run_bytes("sweep", "--model", "tiny-llama", "--template", b"In {year} \x81\x8d\x90 ended",
                        "--slot", "year=1..3", "--heads", "0.1")
    err = result.stderr.decode()
    assert result.returncode == 2 and err.startswith("error: ") and "not text" in err and "Traceback" not in err


def test_a_latin1_template_argument_sweeps(tmp_path):
    result = _run_bytes("sweep", "--model", "tiny-llama", "--template", b"En {year} le caf\xe9 ferma.",
                        "--slot", "year=1..3", "--heads", "0.1", "--out", str(tmp_path / "s.csv"))
    assert result.returncode == 0, result.stderr.decode()
    assert "caf" in (tmp_path / "s.csv").read_text(encoding="utf-8") or (tmp_path / "s.csv").is_file()
