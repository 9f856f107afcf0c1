"""Token positions named in template terms, resolved per prompt after tokenization.

Attention is read from a *query* to a *key* position, named per template and
resolved for each value after tokenization, so a slot that tokenizes into a
different number of tokens for some values still points at the right token:

* ``last`` (the last token), ``first`` (the first token after BOS), ``bos``, or
  an index (``5``, ``-2``);
* ``SLOT:first`` / ``SLOT:last`` (first or last token of the slot's text; plain
  ``SLOT`` is ``SLOT:last``), ``SLOT#2:first`` for its second occurrence;
* ``mark``, ``mark#2`` with the same ``:first``/``:last`` suffixes;
* any of these followed by an offset in tokens: ``year:last-1``, ``last-2``.

Character spans are mapped to tokens with the tokenizer's offset mapping (a
token belongs to a span if their characters overlap), which stays right for
tokenizers that split numbers into single digits (SmolLM2: `` 1986`` becomes
``' ', '1', '9', '8', '6'``) as well as those that merge digits (GPT-2).
"""

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from headvis_core.errors import InputError
from headvis_core.sweeps.slots import SLOT_NAME
from headvis_core.sweeps.template import Rendered

_POSITION = re.compile(
    rf"^\s*(?:(?P<word>last|first|bos)|(?P<index>-?\d+)|\{{?(?P<name>{SLOT_NAME})\}}?(?:#(?P<occ>\d+))?"
    rf"(?::(?P<edge>first|last))?)\s*(?P<offset>[+-]\s*\d+)?\s*$")


@dataclass(frozen=True)
class PositionSpec:
    """A token position named in template terms (see the module docstring)."""

    spec: str
    kind: str  # "last", "first", "bos", "index", "slot", "mark"
    name: Optional[str] = None
    occurrence: int = 1
    edge: str = "last"
    index: int = 0
    offset: int = 0


def parse_position(spec: str) -> PositionSpec:
    """Parse a position name (see the module docstring); :class:`InputError` if it is not one."""
    match = _POSITION.match(spec or "")
    if not match:
        raise InputError(f"{spec!r} is not a position: write last, first, bos, an index, SLOT:first, "
                         "SLOT:last, SLOT#2:first, mark or mark#2, optionally with +N or -N.")
    offset = int(match.group("offset").replace(" ", "")) if match.group("offset") else 0
    if match.group("word"):
        return PositionSpec(spec, match.group("word"), offset=offset)
    if match.group("index") is not None:
        return PositionSpec(spec, "index", index=int(match.group("index")), offset=offset)
    name = match.group("name")
    kind = "mark" if name == "mark" else "slot"
    return PositionSpec(spec, kind, name=None if kind == "mark" else name, occurrence=int(match.group("occ") or 1),
                        edge=match.group("edge") or "last", offset=offset)


def _span_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of tokens whose characters overlap ``[start, end)``."""
    return [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]


def resolve_position(position: PositionSpec, rendered: Rendered, offsets: Sequence[tuple[int, int]],
                     n_prefix: int, n_tokens: int) -> Optional[int]:
    """The token index of ``position`` in one tokenized prompt, or ``None`` if it does not exist there.

    ``offsets`` are character spans of the tokens after the ``n_prefix`` special
    tokens (BOS) that the model prepends.
    """
    if position.kind == "last":
        index = n_tokens - 1
    elif position.kind == "first":
        index = n_prefix
    elif position.kind == "bos":
        if n_prefix == 0:
            return None
        index = 0
    elif position.kind == "index":
        index = position.index if position.index >= 0 else n_tokens + position.index
    else:
        spans = rendered.mark_spans if position.kind == "mark" else rendered.slot_spans.get(position.name, [])
        if len(spans) < position.occurrence:
            return None
        start, end = spans[position.occurrence - 1]
        covered = _span_tokens(offsets, start, end)
        if not covered:
            return None
        index = n_prefix + (covered[0] if position.edge == "first" else covered[-1])
    index += position.offset
    return index if 0 <= index < n_tokens else None
