"""``tour`` on the command line: notebook and HTML written, bad inputs refused before any work."""

import nbformat
import pytest

from headvis_core.cli.main import main


@pytest.fixture(autouse=True)
def private_store(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADVIS_STORE_DIR", str(tmp_path / "store"))


def test_tour_writes_a_notebook_and_an_html_page(tmp_path, capsys):
    notebook = tmp_path / "out" / "induction.ipynb"
    assert main(["tour", "--model", "tiny-llama", "--tour", "induction", "--out", str(notebook)]) == 0
    cells = nbformat.read(notebook, as_version=4).cells
    assert sum(c.cell_type == "code" for c in cells) == 8 and "'tiny-llama'" in cells[1].source
    page = tmp_path / "gt.html"
    assert main(["tour", "--model", "tiny-llama", "--tour", "greater-than", "--out", str(page)]) == 0
    out = capsys.readouterr().out
    assert "1. The year sweep" in out and "[nothing convincing]" in out and f"wrote {page}" in out
    text = page.read_text(encoding="utf-8")
    assert text.count("<section>") == 3 and "plotly" in text.lower()


@pytest.mark.parametrize("out, message", [("tour.txt", "ending in .ipynb, .html"), ("", "is empty"),
                                          ("/proc/tour.html", "system folder")])
def test_bad_output_paths_are_refused_before_any_work(tmp_path, capsys, out, message):
    target = out if out.startswith("/") or not out else str(tmp_path / out)
    assert main(["tour", "--model", "tiny-llama", "--tour", "ioi", "--out", target]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "tour.txt").exists()


def test_a_tour_the_model_cannot_run_is_an_error(tmp_path, capsys):
    assert main(["tour", "--model", "tiny-llama", "--tour", "ioi", "--out", str(tmp_path / "ioi.html")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "ioi.html").exists()
