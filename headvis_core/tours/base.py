"""What a tour is: steps, each a live computation on the loaded model with its figure and a sentence.

A :class:`Tour` is a list of :class:`Step`. A step names a function of
``(model, found, model_name, **settings)`` returning a :class:`StepResult`;
``found`` carries what earlier steps found (head labels, numbers: plain JSON
values) to the later ones, so a tour finds its heads on whatever model is
loaded. :func:`run_step` runs one step through the persistent result store
(:mod:`headvis_core.store`), keyed by the model's fingerprint, the tour, the
step, its settings and what the earlier steps found, so a second visit is
instant and a changed model is never shown stale results.
"""

import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import urlencode

import pandas as pd

from headvis_core.errors import InputError
from headvis_core.progress import ProgressCallback, report, scaled
from headvis_core.store.kinds import TOUR_STEP
from headvis_core.store.results import cached

STORE_KIND = TOUR_STEP
TOUR_FORMAT = 4  # bump when a step's computation changes, so stored steps are recomputed


@dataclass
class StepResult:
    """One step's outcome on one model."""

    sentence: str  # written from the result
    figure: Any = None  # plotly figure, or None
    table: Optional[pd.DataFrame] = None
    found: dict[str, Any] = field(default_factory=dict)  # JSON values handed to later steps
    convincing: bool = True  # False: the step found nothing that clears its bar, and the sentence says so
    link: str = ""  # the full page's URL path and query (a deep link into the app)
    seconds: float = 0.0  # compute time (the first time: a stored result keeps it)
    from_store: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    explanation: str
    paper: str
    function: str  # "module:function" under headvis_core.tours, e.g. "induction:second_copy_loss"
    settings: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> Callable[..., StepResult]:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(f"headvis_core.tours.{module}"), name)


@dataclass(frozen=True)
class Tour:
    key: str
    title: str
    summary: str
    steps: tuple[Step, ...]

    def step_index(self, key_or_number: Any) -> int:
        """A step's index from its key or its 1-based number (as a URL gives it)."""
        text = str(key_or_number).strip()
        for i, step in enumerate(self.steps):
            if step.key == text:
                return i
        try:
            number = int(text)
        except ValueError:
            number = 0
        if not 1 <= number <= len(self.steps):
            raise InputError(f"The {self.title} tour has steps 1-{len(self.steps)}; there is no step {text!r}.")
        return number - 1


def page_link(page: str, model_name: str, **params: Any) -> str:
    """A deep link to a page of the app (``Head_atlas?model=...&y=induction``)."""
    query = {"model": model_name, **{k: v for k, v in params.items() if v is not None}} if model_name else params
    return f"{page}?{urlencode(query)}" if query else page


def heads_text(labels: list[str]) -> str:
    return ", ".join(labels) if labels else "none"


def run_step(model: Any, tour: Tour, index: int, found: dict[str, Any], model_name: str = "",
             refresh: bool = False, use_store: bool = True, loaded: Any = None) -> StepResult:
    """Step ``index`` of ``tour`` on ``model``, from the store where it was computed before.

    ``found`` is updated in place with what the step found. ``loaded``: the
    ``LoadedModel`` (its fingerprint is the same as the model's; passed for
    its name in the store's listing).
    """
    step = tour.steps[index]
    function = step.resolve()

    def compute() -> StepResult:
        started = time.perf_counter()
        result = function(model, dict(found), model_name=model_name, **step.settings)
        result.seconds = time.perf_counter() - started
        return result

    if use_store:
        inputs = {"format": TOUR_FORMAT, "tour": tour.key, "step": step.key, "function": step.function,
                  "settings": step.settings, "found": found, "model_name": model_name}
        link = {"page": "pages/9_Tours.py", "query": {"tour": tour.key, "step": str(index + 1)}}
        stored = cached(STORE_KIND, loaded if loaded is not None else model, inputs, compute, refresh=refresh,
                        link=link)
        result = stored.value
        result.from_store = stored.from_store
        result.notes = list(result.notes) + list(stored.notes)
    else:
        result = compute()
    found.update(result.found)
    return result


def run_tour(model: Any, tour: Tour, upto: Optional[int] = None, model_name: str = "", refresh: bool = False,
             use_store: bool = True, loaded: Any = None,
             progress: Optional[ProgressCallback] = None) -> list[StepResult]:
    """Steps ``0..upto`` (default: all) in order, each fed what the earlier ones found."""
    last = len(tour.steps) - 1 if upto is None else int(upto)
    found: dict[str, Any] = {}
    results = []
    for i in range(last + 1):
        report(progress, i / (last + 1), f"step {i + 1}/{last + 1}: {tour.steps[i].title}")
        results.append(run_step(model, tour, i, found, model_name=model_name, refresh=refresh and i == last,
                                use_store=use_store, loaded=loaded))
        report(scaled(progress, 0.0, 1.0), (i + 1) / (last + 1), f"step {i + 1} done")
    return results
