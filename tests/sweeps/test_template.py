"""Template text: slots, marks, literal braces, bad templates."""

import pytest

from headvis_core.errors import InputError
from headvis_core.sweeps.template import parse_template, render


def test_template_slots_marks_and_braces():
    template = parse_template("When [[Mary]] and {name} met, {name} said {{hi}}")
    assert template.slot_names == ["name"] and template.n_marks == 1
    rendered = render(template, {"name": "John"})
    assert rendered.text == "When Mary and John met, John said {hi}"
    assert [rendered.text[s:e] for s, e in rendered.slot_spans["name"]] == ["John", "John"]
    assert [rendered.text[s:e] for s, e in rendered.mark_spans] == ["Mary"]


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("a {five cities} b", "not a slot name"), ("a { b", "lone"),
    ("[[a [[b]] c]]", "unbalanced or nested"), ("[[a b", "without its closing"),
])
def test_bad_templates(text, message):
    with pytest.raises(InputError, match=message):
        parse_template(text)
