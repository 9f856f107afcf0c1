"""A tour as a Jupyter notebook (``nbformat``: one code cell per step, calling headvis_core directly, so a
student can rerun and change it) or as a standalone HTML page with its figures."""

from pathlib import Path
from typing import Any, Sequence

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from headvis_core.storage import atomic_write_text
from headvis_core.tours.base import StepResult, Tour
from headvis_core.viz.tours import tour_html

FORMATS = (".ipynb", ".html")


def _markdown_text(text: str) -> str:
    """Plain text for a markdown cell: characters markdown or HTML would interpret are escaped."""
    for char in "\\`*_[]<>#|":
        text = text.replace(char, "\\" + char)
    return text


def step_code(tour: Tour, index: int, model_name: str) -> str:
    """The code cell of step ``index``: the step function with its settings written out."""
    step = tour.steps[index]
    module, function = step.function.split(":")
    arguments = "".join(f", {name}={value!r}" for name, value in step.settings.items())
    return (f"from headvis_core.tours import {module}\n\n"
            f"result = {module}.{function}(model, found, model_name={model_name!r}{arguments})\n"
            "found.update(result.found)  # what later steps build on\n"
            "print(result.sentence)\n"
            "display_result(result)")


SETUP = '''from headvis_core.models.loader import load_model

MODEL = {model!r}
loaded = load_model(MODEL)
model = loaded.model
found = {{}}  # what each step finds, handed to the next steps


def display_result(result):
    """Show a step's figure and table when run in Jupyter; do nothing elsewhere."""
    try:
        from IPython.display import display
    except ImportError:
        return
    if result.figure is not None:
        display(result.figure)
    if result.table is not None:
        display(result.table.head(20))'''


def tour_notebook(tour: Tour, model_name: str) -> Any:
    cells = [new_markdown_cell(f"# {_markdown_text(tour.title)}\n\n{_markdown_text(tour.summary)}\n\n"
                               f"Model: `{model_name}` (change `MODEL` below to run the tour on another one)."),
             new_code_cell(SETUP.format(model=model_name))]
    for index, step in enumerate(tour.steps):
        cells.append(new_markdown_cell(f"## {index + 1}. {_markdown_text(step.title)}\n\n"
                                       f"{_markdown_text(step.explanation)}\n\n*{_markdown_text(step.paper)}*"))
        cells.append(new_code_cell(step_code(tour, index, model_name)))
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


def notebook_text(tour: Tour, model_name: str) -> str:
    notebook = tour_notebook(tour, model_name)
    nbformat.validate(notebook)
    return nbformat.writes(notebook)


def html_text(tour: Tour, results: Sequence[StepResult], model_name: str) -> str:
    return tour_html(tour.title, tour.summary, model_name, tour.steps, results)


def write_export(path: Path, tour: Tour, model_name: str, results: Sequence[StepResult] = ()) -> Path:
    """Write the notebook (``.ipynb``) or the HTML page (``.html``, from ``results``) atomically."""
    if path.suffix.lower() == ".ipynb":
        return atomic_write_text(path, notebook_text(tour, model_name))
    return atomic_write_text(path, html_text(tour, results, model_name))
