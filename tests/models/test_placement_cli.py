"""The CLI's placement options (``--device-map``, ``--n-devices``, ``--max-memory``): a bad value is
``error: ...`` and exit status 2 before any work, as in tests/cli/test_bad_inputs.py; a good one loads."""

import sys

import pytest

from headvis_core.cli.main import main

SWEEP = ["sweep", "--model", "tiny-llama", "--template", "In {year} the war ended.", "--heads", "0.1",
         "--slot", "year=1000..1003"]

BAD_PLACEMENTS = [
    ("device and device-map", ["--device", "cpu", "--device-map", "auto"], "Give --device or --device-map, not both"),
    ("n-devices 0", ["--n-devices", "0"], "--n-devices: 0 is too small"),
    ("n-devices -1", ["--n-devices", "-1"], "--n-devices: -1 is too small"),
    ("n-devices text", ["--n-devices", "two"], "'two' is not a whole number"),
    ("n-devices past the GPUs", ["--n-devices", "4"], "n_devices=4, but this machine has"),
    ("device-map and n-devices", ["--device-map", "auto", "--n-devices", "2"], "not both"),
    ("device-map unknown", ["--device-map", "fastest"], "neither a strategy"),
    ("device-map bad JSON", ["--device-map", "{model: cpu}"], "--device-map is not valid JSON"),
    ("device-map meta", ["--device-map", '{"": "meta"}'], "meta device holds no weights"),
    ("device-map disk", ["--device-map", '{"model": "cpu", "lm_head": "disk"}'], "disk offload is not supported"),
    ("device-map missing GPU", ["--device-map", '{"": 3}'], "GPU 3 does not exist"),
    ("device-map unknown module", ["--device-map", '{"model.nothing": "cpu", "": "cpu"}'], "does not have"),
    ("device-map misses modules", ["--device-map", '{"lm_head": "cpu"}'], "places no module holding"),
    ("max-memory alone", ["--max-memory", '{"cpu": "1GB"}'], "give one of them too"),
    ("max-memory bad JSON", ["--device-map", "auto", "--max-memory", "{cpu: 1GB}"], "--max-memory is not valid JSON"),
    ("max-memory bad size", ["--device-map", "auto", "--max-memory", '{"cpu": "a lot"}'], "not a size"),
    ("max-memory zero", ["--device-map", "auto", "--max-memory", '{"cpu": 0}'], "more than 0 bytes"),
    ("max-memory too small", ["--device-map", "auto", "--max-memory", '{"cpu": "1KB"}'], "across its devices"),
]


@pytest.mark.parametrize("extra, message", [c[1:] for c in BAD_PLACEMENTS], ids=[c[0] for c in BAD_PLACEMENTS])
def test_a_bad_placement_is_an_error_message_and_status_2(extra, message, tmp_path, capsys):
    out = tmp_path / "s.csv"
    with pytest.raises(SystemExit) as exit_info:  # argparse refusals exit from inside parse_args
        sys.exit(main(SWEEP + ["--out", str(out)] + extra))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") or "\nerror: " in captured.err, captured.err
    assert message in captured.err, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()


def test_a_device_map_runs_a_command_and_gives_the_plain_result(tmp_path):
    plain, split = tmp_path / "plain.csv", tmp_path / "split.csv"
    assert main(SWEEP + ["--no-cache", "--out", str(plain)]) == 0
    assert main(SWEEP + ["--no-cache", "--out", str(split), "--device-map",
                         '{"model": "cpu", "lm_head": "cpu"}']) == 0
    assert split.read_text() == plain.read_text()
    assert main(SWEEP + ["--no-cache", "--out", str(split), "--device-map", "sequential", "--max-memory",
                         '{"cpu": "2GiB"}']) == 0
    assert split.read_text() == plain.read_text()
