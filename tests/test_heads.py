import pytest

from headvis_core.errors import InputError
from headvis_core.heads import HeadRef, all_heads, parse_head, parse_heads


def test_parse_forms():
    assert parse_head("5.1", 12, 12) == HeadRef(5, 1)
    assert parse_head("L5H1", 12, 12) == HeadRef(5, 1)
    assert parse_head(" 5:1 ", 12, 12) == HeadRef(5, 1)
    assert str(HeadRef(9, 6)) == "9.6"


def test_parse_list_keeps_order_and_drops_repeats():
    assert parse_heads("6.9, 5.1,6.9", 12, 12) == [HeadRef(6, 9), HeadRef(5, 1)]


@pytest.mark.parametrize("spec,message", [("30.1", "out of range"), ("2.9", "out of range"),
                                          ("abc", "not a head"), ("", "No heads")])
def test_bad_heads(spec, message):
    with pytest.raises(InputError, match=message):
        parse_heads(spec, 30, 9)


def test_all_heads_order():
    assert all_heads(2, 2) == [HeadRef(0, 0), HeadRef(0, 1), HeadRef(1, 0), HeadRef(1, 1)]


def test_from_label_inverts_str():
    assert HeadRef.from_label(str(HeadRef(9, 6))) == HeadRef(9, 6)
