"""Range reports shared by the Prompt sweeps page and ``headvis sweep``: exact ranges, words and table."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from headvis_core.errors import InputError
from headvis_core.sweeps.ranges import curve_range_reports, level_bounds, ranges_table
from headvis_core.sweeps.result import SweepResult


def sweep(table: pd.DataFrame, swept: list[str], numeric: dict[str, bool]) -> SweepResult:
    plan = SimpleNamespace(swept=swept, numeric=numeric)  # ranges read only these two fields of the plan
    return SweepResult(table=table, plan=plan, heads=[], curves=["attn 0.1"])


def test_one_slot_in_numeric_order_with_gaps_and_min_length():
    years = [1005, 1000, 1001, 1002, 1003, 1004, 1006]  # shuffled: ranges follow the numeric order
    curve = {1000: 0.9, 1001: 0.8, 1002: 0.1, 1003: 0.7, 1004: 0.2, 1005: 0.95, 1006: 0.6}
    result = sweep(pd.DataFrame({"year": years, "attn 0.1": [curve[y] for y in years]}), ["year"], {"year": True})

    [report] = curve_range_reports(result, "attn 0.1", 0.5)
    assert report.row is None and report.label == "attn 0.1"
    assert [(r.start, r.stop, r.n_values) for r in report.ranges] == [(1000, 1001, 2), (1003, 1003, 1),
                                                                       (1005, 1006, 2)]
    assert report.description == ("attn 0.1 >= 0.5 for year 1000-1001 (2 values, peak 0.90); "
                                  "1003 (1 value, peak 0.70); 1005-1006 (2 values, peak 0.95).")

    [merged] = curve_range_reports(result, "attn 0.1", 0.5, max_gap=1, min_length=5, limit=1)
    assert [(r.start, r.stop, r.n_values) for r in merged.ranges] == [(1000, 1006, 7)]
    [below] = curve_range_reports(result, "attn 0.1", 0.15, above=False)
    assert below.description == "attn 0.1 <= 0.15 for year 1002 (1 value, peak 0.10)."
    [never] = curve_range_reports(result, "attn 0.1", 0.99)
    assert never.description == "attn 0.1 is never >= 0.99 (its max is 0.95 at year 1005)."

    table = ranges_table([report])
    assert list(table.columns) == ["from", "to", "n_values", "peak", "mean"]
    assert table.to_dict("list") == {"from": [1000, 1003, 1005], "to": [1001, 1003, 1006], "n_values": [2, 1, 2],
                                     "peak": [0.9, 0.7, 0.95], "mean": [pytest.approx(0.85), 0.7,
                                                                        pytest.approx(0.775)]}


def test_two_slots_report_per_value_of_the_second():
    table = pd.DataFrame({"a": [1, 2, 3, 1, 2, 3], "b": ["x", "x", "x", "y", "y", "y"],
                          "attn 0.1": [0.9, 0.9, 0.1, 0.1, 0.1, 0.8]})
    reports = curve_range_reports(sweep(table, ["a", "b"], {"a": True, "b": False}), "attn 0.1", 0.5)
    assert [(r.row, r.label) for r in reports] == [("x", "attn 0.1 (b=x)"), ("y", "attn 0.1 (b=y)")]
    assert reports[1].description == "attn 0.1 (b=y) >= 0.5 for a 3 (1 value, peak 0.80)."
    rows = ranges_table(reports, "b")
    assert rows[["b", "from", "to"]].values.tolist() == [["x", 1, 2], ["y", 3, 3]]
    assert ranges_table([], "b").columns.tolist() == ["b", "from", "to", "n_values", "peak", "mean"]


@pytest.mark.parametrize("level", [float("nan"), float("inf")])
def test_a_non_finite_level_is_an_input_error(level):
    result = sweep(pd.DataFrame({"year": [1, 2], "attn 0.1": [0.1, 0.2]}), ["year"], {"year": True})
    with pytest.raises(InputError, match="finite"):
        curve_range_reports(result, "attn 0.1", level)


def test_level_bounds_cover_the_curve_and_at_least_zero_to_one():
    assert level_bounds([0.2, 0.5, np.nan]) == (0.0, 1.0)
    assert level_bounds([-3.14, 2.01, np.inf]) == (-3.2, 2.1)
    assert level_bounds([np.nan, np.nan]) == (0.0, 1.0)
    assert level_bounds([]) == (0.0, 1.0)
