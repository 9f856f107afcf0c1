import subprocess
import sys

from tests.conftest import ROOT


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "headvis_core", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_models_list_marks_offline_models():
    result = run_cli("models", "list")
    assert result.returncode == 0
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert rows["tiny-gpt2"].split()[2] == "yes"
    assert rows["gpt2"].split()[1] == "hub"


def test_cli_errors_are_messages_not_tracebacks():
    result = run_cli("models", "fetch", "gpt2")
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
