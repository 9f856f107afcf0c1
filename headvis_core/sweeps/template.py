"""Prompt template text: ``{slot}`` references, ``[[marked]]`` words, and filling them in.

A template is text with ``{slot}`` references, for example the greater-than
prompt of Hanna et al. 2023::

    The {noun} lasted from the year {XX}{YY} to the year {XX}

``[[marked words]]`` (the brackets are removed) can be named as positions;
``{{`` and ``}}`` write literal braces. :func:`render` records where each slot
and mark lands in the filled text, so positions can be found after tokenizing.
"""

import re
from dataclasses import dataclass

from headvis_core.errors import InputError
from headvis_core.sweeps.slots import SLOT_NAME

_TEMPLATE_PIECE = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{([^{}]*)\}|[{}]")


@dataclass(frozen=True)
class ParsedTemplate:
    """The template cut into literal text, slot references and mark boundaries."""

    pieces: tuple[tuple[str, str], ...]  # ("text", s) | ("slot", name) | ("mark", "[[" or "]]")

    @property
    def slot_names(self) -> list[str]:
        return list(dict.fromkeys(value for kind, value in self.pieces if kind == "slot"))

    @property
    def n_marks(self) -> int:
        return sum(1 for kind, value in self.pieces if kind == "mark" and value == "[[")


def parse_template(text: str, allow_blank: bool = False) -> ParsedTemplate:
    """Cut ``text`` into pieces; ``allow_blank`` accepts whitespace-only text (an answer token such as ``" "``)."""
    if text is None or (not text.strip() and not (allow_blank and text)):
        raise InputError("The template is empty: write a prompt with a slot, for example "
                         "'The war lasted from the year {year} to the year'.")
    pieces: list[tuple[str, str]] = []
    position, depth = 0, 0
    for match in _TEMPLATE_PIECE.finditer(text):
        if match.start() > position:
            pieces.append(("text", text[position:match.start()]))
        token = match.group(0)
        if token in ("{{", "}}"):
            pieces.append(("text", token[0]))
        elif token in ("[[", "]]"):
            depth += 1 if token == "[[" else -1
            if depth not in (0, 1):
                raise InputError("The template's [[marks]] are unbalanced or nested: write [[word]] around "
                                 "each marked word, one at a time.")
            pieces.append(("mark", token))
        elif token in ("{", "}"):
            raise InputError(f"The template has a lone {token!r} at character {match.start()}: write {{slot}} "
                             "for a slot, or {{ and }} for literal braces.")
        else:
            name = match.group(1).strip()
            if not re.fullmatch(SLOT_NAME, name):
                raise InputError(f"{{{match.group(1)}}} is not a slot name: use letters, digits and _ "
                                 "(for example {city1}).")
            pieces.append(("slot", name))
        position = match.end()
    if position < len(text):
        pieces.append(("text", text[position:]))
    if depth:
        raise InputError("The template has a [[ without its closing ]].")
    return ParsedTemplate(tuple(pieces))


@dataclass(frozen=True)
class Rendered:
    text: str
    slot_spans: dict[str, list[tuple[int, int]]]  # character spans of each occurrence
    mark_spans: list[tuple[int, int]]


def render(template: ParsedTemplate, values: dict[str, str]) -> Rendered:
    """Fill the slots with ``values`` (text), recording the character spans of slots and marks."""
    parts: list[str] = []
    length = 0
    slot_spans: dict[str, list[tuple[int, int]]] = {}
    mark_spans: list[tuple[int, int]] = []
    mark_start = 0
    for kind, value in template.pieces:
        if kind == "text":
            parts.append(value)
            length += len(value)
        elif kind == "slot":
            text = values[value]
            slot_spans.setdefault(value, []).append((length, length + len(text)))
            parts.append(text)
            length += len(text)
        elif value == "[[":
            mark_start = length
        else:
            mark_spans.append((mark_start, length))
    return Rendered("".join(parts), slot_spans, mark_spans)


def fill_text(text: str, values: dict[str, str], what: str = "text") -> str:
    """Fill ``{slot}`` references in a short string such as an answer token (`` {IO}``)."""
    template = parse_template(text, allow_blank=True)
    missing = [n for n in template.slot_names if n not in values]
    if missing:
        raise InputError(f"The {what} {text!r} uses slot {{{missing[0]}}}, which is not defined.")
    return render(template, values).text
