"""Threshold ranges of a sweep curve: maximal runs of slot values where it is at or above a level.

For example "head 4.4 attends strongly for years 1000-1986".
"""

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from headvis_core.errors import InputError
from headvis_core.sweeps.result import SweepResult


@dataclass(frozen=True)
class DetectedRange:
    """A maximal run of consecutive values where the curve is at or above the level."""

    start: Any  # first value of the run (inclusive)
    stop: Any  # last value of the run (inclusive)
    start_index: int
    stop_index: int
    n_values: int
    peak: float
    mean: float

    def label(self) -> str:
        return str(self.start) if self.start_index == self.stop_index else f"{self.start}-{self.stop}"


def detect_ranges(values: Sequence[Any], curve: Sequence[float], level: float, above: bool = True,
                  min_length: int = 1, max_gap: int = 0) -> list[DetectedRange]:
    """Maximal runs of consecutive ``values`` (in the given order) where ``curve >= level``.

    With ``above=False``, runs where ``curve <= level``. A NaN never qualifies.
    Runs separated by at most ``max_gap`` failing values are merged (tolerating
    isolated dips); runs covering fewer than ``min_length`` values are dropped.
    ``n_values``, ``peak`` and ``mean`` count the values inside the run,
    including any merged gap.
    """
    values = list(values)
    y = np.asarray(curve, dtype=float)
    if len(values) != len(y):
        raise InputError(f"{len(values)} values but {len(y)} curve points.")
    if min_length < 1 or max_gap < 0:
        raise InputError("min_length must be at least 1 and max_gap at least 0.")
    with np.errstate(invalid="ignore"):
        hit = (y >= level) if above else (y <= level)
    hit &= ~np.isnan(y)
    runs: list[list[int]] = []
    for i in np.flatnonzero(hit):
        if runs and i - runs[-1][1] - 1 <= max_gap:
            runs[-1][1] = int(i)
        else:
            runs.append([int(i), int(i)])
    found = []
    for start, stop in runs:
        if stop - start + 1 < min_length:
            continue
        segment = y[start:stop + 1]
        found.append(DetectedRange(values[start], values[stop], start, stop, stop - start + 1,
                                   float(np.nanmax(segment)), float(np.nanmean(segment))))
    return found


def describe_ranges(ranges: Sequence[DetectedRange], slot: str, curve_label: str, level: float,
                    values: Optional[Sequence[Any]] = None, curve: Optional[Sequence[float]] = None,
                    above: bool = True, limit: int = 12) -> str:
    """One sentence: ``attn 4.4 >= 0.50 for year 1000-1986 (987 values, peak 0.97)``."""
    sign = ">=" if above else "<="
    if not ranges:
        text = f"{curve_label} is never {sign} {level:.3g}"
        if values is not None and curve is not None and len(curve) and not np.all(np.isnan(curve)):
            best = int(np.nanargmax(curve) if above else np.nanargmin(curve))
            text += f" (its {'max' if above else 'min'} is {curve[best]:.3g} at {slot} {values[best]})"
        return text + "."
    parts = [f"{r.label()} ({r.n_values} value{'s' if r.n_values != 1 else ''}, peak {r.peak:.2f})"
             for r in ranges[:limit]]
    more = f" and {len(ranges) - limit} more ranges" if len(ranges) > limit else ""
    return f"{curve_label} {sign} {level:.3g} for {slot} " + "; ".join(parts) + more + "."


def curve_ranges(result: SweepResult, curve: str, level: float, above: bool = True, min_length: int = 1,
                 max_gap: int = 0) -> dict[Any, list[DetectedRange]]:
    """Ranges along the first swept slot: one list for a 1-slot sweep (key ``None``),
    one per value of the second slot otherwise (values sorted along the first slot)."""
    if curve not in result.table.columns:
        raise InputError(f"No curve called {curve!r}; there are: {', '.join(result.curves)}.")
    x = result.swept[0]
    table = result.table
    if len(result.swept) == 1:
        ordered = table.sort_values(x, kind="stable") if result.plan.numeric.get(x) else table
        return {None: detect_ranges(ordered[x].tolist(), ordered[curve].to_numpy(float), level, above,
                                    min_length, max_gap)}
    y = result.swept[1]
    out = {}
    for y_value, group in table.groupby(y, sort=False):
        ordered = group.sort_values(x, kind="stable") if result.plan.numeric.get(x) else group
        out[y_value] = detect_ranges(ordered[x].tolist(), ordered[curve].to_numpy(float), level, above,
                                     min_length, max_gap)
    return out
