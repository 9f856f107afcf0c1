"""Slot definitions: ranges, lists, list files, derived slots, bad definitions."""

import json

import pytest

from headvis_core.errors import InputError
from headvis_core.sweeps.slots import parse_slot


def test_range_slot_with_step_and_padding():
    slot = parse_slot("year=1000..1999")
    assert slot.kind == "range" and len(slot) == 1000 and slot.values[0] == 1000 and slot.values[-1] == 1999
    assert list(parse_slot("y = 1000..1010:5").values) == [1000, 1005, 1010]
    padded = parse_slot("YY=02..98")
    assert padded.text_of(padded.values[0]) == "02" and len(padded) == 97


def test_list_and_derived_slots():
    assert parse_slot("noun=war, feud ,expedition").values == ("war", "feud", "expedition")
    assert parse_slot("place=Paris, France|Lyon, France").values == ("Paris, France", "Lyon, France")
    assert parse_slot("XX=year[:2]").op == ("slice", None, 2)
    assert parse_slot("YY=year[2:]").op == ("slice", 2, None)
    assert parse_slot("d=year[0]").op == ("index", 0)
    assert parse_slot("next=year+1").op == ("offset", 1)


def test_list_files_from_prompts():
    names = parse_slot("name=@sweeps:ioi_names")
    assert "John" in names.values and "Mary" not in names.values
    assert "Mary" in parse_slot("name=@ioi_templates:names").values
    cities = parse_slot("city=@sweeps:foreign_cities")
    assert cities.companions() == ["country"] and cities.records[cities.values.index("Berlin")]["country"] == "Germany"


def test_text_list_file_and_folder_escape(tmp_path):
    (tmp_path / "colours.txt").write_text("# a comment\nred\n\ngreen\n")
    (tmp_path / "sets.json").write_text(json.dumps({"lists": {"fruit": ["apple", "pear"]}}))
    assert parse_slot("c=@colours.txt", folder=tmp_path).values == ("red", "green")
    assert parse_slot("f=@sets:fruit", folder=tmp_path).values == ("apple", "pear")
    with pytest.raises(InputError, match="no list file"):
        parse_slot("c=@../../etc/passwd", folder=tmp_path)
    with pytest.raises(InputError, match="no list 'veg'"):
        parse_slot("f=@sets:veg", folder=tmp_path)


@pytest.mark.parametrize("spec, message", [
    ("year", "not a slot definition"),
    ("year=1999..1000", "empty.*did you mean 1000..1999"),
    ("year=1..10:0", "step must be a positive"),
    ("five cities=Paris", "not a slot name"),
    ("last=1..3", "reserved"),
    ("noun=war,,feud", "empty value"),
    ("year=", "no values"),
    ("year=a..b", "not a range of whole numbers"),
    ("year=1000..x", "not a range of whole numbers"),
    ("year=1..10:x", "not a range of whole numbers"),
])
def test_bad_slot_definitions(spec, message):
    with pytest.raises(InputError, match=message):
        parse_slot(spec)


def test_text_like_a_range_inside_a_list_stays_a_list():
    assert parse_slot("x=a..b,c").values == ("a..b", "c")


def test_list_files_are_read_like_any_text_file(tmp_path):
    """A Latin-1 list file reads as Windows-1252 (as the corpus reader does); binary and broken JSON are refused."""
    (tmp_path / "cafes.txt").write_bytes("caf\u00e9\ncr\u00e8me\n".encode("latin-1"))
    (tmp_path / "utf8.txt").write_text("\ufeffna\u00efve\n", encoding="utf-8")  # a BOM is dropped
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "broken.json").write_text('{"names": ["a", ')
    (tmp_path / "number.json").write_text("3")
    assert parse_slot("c=@cafes.txt", folder=tmp_path).values == ("caf\u00e9", "cr\u00e8me")
    assert parse_slot("w=@utf8.txt", folder=tmp_path).values == ("na\u00efve",)
    with pytest.raises(InputError, match="binary"):
        parse_slot("i=@image.txt", folder=tmp_path)
    with pytest.raises(InputError, match="not valid JSON"):
        parse_slot("n=@broken:names", folder=tmp_path)
    with pytest.raises(InputError, match="say which list"):
        parse_slot("n=@number", folder=tmp_path)
    with pytest.raises(InputError, match="no list 'names'"):
        parse_slot("n=@number:names", folder=tmp_path)
