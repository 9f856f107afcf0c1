"""Threshold ranges of a sweep curve, described in words and as a table.

The HeadVis year test asks for which values of a slot a head's attention (or the
model's answer) reaches a level: "attn 4.4 >= 0.5 for year 1000-1986". The
Prompt sweeps page and ``headvis sweep`` both report ranges through
:func:`curve_range_reports`; the detection itself is
:func:`headvis_core.sweeps.thresholds.detect_ranges`.
"""

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from headvis_core.errors import InputError
from headvis_core.sweeps.result import SweepResult
from headvis_core.sweeps.thresholds import DetectedRange, curve_ranges, describe_ranges

RANGE_COLUMNS = ["from", "to", "n_values", "peak", "mean"]


@dataclass(frozen=True)
class RangeReport:
    """The ranges of one curve along the first swept slot, for one value of the second slot.

    ``row`` is that second-slot value (``None`` for a one-slot sweep); ``label`` names the curve
    and the row (``"attn 2.3 (noun=war)"``); ``description`` is one sentence for people.
    """

    row: Any
    label: str
    ranges: list[DetectedRange]
    description: str


def curve_range_reports(result: SweepResult, curve: str, level: float, above: bool = True,
                        min_length: int = 1, max_gap: int = 0, limit: int = 12) -> list[RangeReport]:
    """Where ``curve`` is at or above (``above=False``: at or below) ``level``, per second-slot value.

    Ranges are maximal runs of consecutive first-slot values (numeric slots in numeric order),
    merged across gaps of at most ``max_gap`` values and dropped when shorter than
    ``min_length`` (:func:`headvis_core.sweeps.thresholds.detect_ranges`). ``limit`` caps the ranges
    named in each description. A non-finite ``level`` is an :class:`InputError`.
    """
    if not np.isfinite(level):
        raise InputError(f"The level must be a finite number (got {level}).")
    by_row = curve_ranges(result, curve, level, above=above, min_length=min_length, max_gap=max_gap)
    x = result.swept[0]
    reports = []
    for row, found in by_row.items():
        values, points = _ordered_curve(result, curve, row)
        label = curve if row is None else f"{curve} ({result.swept[1]}={row})"
        description = describe_ranges(found, x, label, level, values, points, above=above, limit=limit)
        reports.append(RangeReport(row=row, label=label, ranges=found, description=description))
    return reports


def ranges_table(reports: Sequence[RangeReport], second_slot: Optional[str] = None) -> pd.DataFrame:
    """One row per range: ``[second_slot,] from, to, n_values, peak, mean`` (for a CSV download)."""
    columns = ([second_slot] if second_slot else []) + RANGE_COLUMNS
    rows = []
    for report in reports:
        for found in report.ranges:
            row = {second_slot: report.row} if second_slot else {}
            row.update({"from": found.start, "to": found.stop, "n_values": found.n_values,
                        "peak": found.peak, "mean": found.mean})
            rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def level_bounds(curve: Sequence[float]) -> tuple[float, float]:
    """A level slider's range for a curve: at least [0, 1], widened to the curve's finite values
    (rounded outwards to tenths), so that logit differences and probabilities both fit."""
    points = np.asarray(curve, dtype=float)
    finite = points[np.isfinite(points)]
    if not len(finite):
        return 0.0, 1.0
    low = min(0.0, float(np.floor(finite.min() * 10) / 10))
    high = max(1.0, float(np.ceil(finite.max() * 10) / 10))
    return low, high


def _ordered_curve(result: SweepResult, curve: str, row: Any) -> tuple[list, np.ndarray]:
    """The first slot's values and the curve for one second-slot value, in the order ranges use."""
    table = result.table if row is None else result.table[result.table[result.swept[1]] == row]
    x = result.swept[0]
    ordered = table.sort_values(x, kind="stable") if result.plan.numeric.get(x) else table
    return ordered[x].tolist(), ordered[curve].to_numpy(float)
