"""Named token positions: parsing and resolution on character offsets."""

import pytest

from headvis_core.errors import InputError
from headvis_core.sweeps.positions import parse_position, resolve_position
from headvis_core.sweeps.template import parse_template, render


def test_parse_positions():
    assert parse_position("last").kind == "last"
    assert parse_position("year:first").edge == "first"
    spec = parse_position("{name}#2:first+1")
    assert (spec.kind, spec.name, spec.occurrence, spec.edge, spec.offset) == ("slot", "name", 2, "first", 1)
    assert parse_position("mark#2").occurrence == 2 and parse_position("-2").index == -2
    assert parse_position("year").edge == "last"
    with pytest.raises(InputError, match="not a position"):
        parse_position("year:middle")


def test_overlap_resolution_on_merged_tokens():
    # a GPT-2-like split of " 1732" into " 17" + "32": the year's first token starts before the year
    rendered = render(parse_template("from {year} on"), {"year": "1732"})
    offsets = [(0, 4), (4, 7), (7, 9), (9, 12)]  # "from", " 17", "32", " on"
    assert resolve_position(parse_position("year:first"), rendered, offsets, 1, 5) == 2
    assert resolve_position(parse_position("year:last"), rendered, offsets, 1, 5) == 3
    assert resolve_position(parse_position("year:first-3"), rendered, offsets, 1, 5) is None
