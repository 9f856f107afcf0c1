"""Sweep presets from prompts/sweeps.json."""

import pytest

from headvis_core.errors import InputError
from headvis_core.sweeps.plan import build_plan
from headvis_core.sweeps.presets import load_presets, preset


def test_presets_load_and_plan(smollm2):
    presets = load_presets()
    assert {p.id for p in presets} >= {"year_range", "greater_than", "cities", "ioi_names"}
    for entry in presets:
        plan = build_plan(smollm2.model, entry.spec)
        assert plan.n_values > 10, entry.id
    with pytest.raises(InputError, match="No sweep preset called 'nope'"):
        preset("nope")
