"""Prompt templates with named slots, expanded over ranges of values and tokenized.

A template is text with ``{slot}`` references, for example the greater-than
prompt of Hanna et al. 2023::

    The {noun} lasted from the year {XX}{YY} to the year {XX}

Each slot is defined by one string ``name=definition``:

* a range of integers, ends included, optional step: ``year=1000..1999``,
  ``year=1000..1999:10``; a start written with a leading zero pads every
  value to its width (``YY=02..98`` gives ``02, 03, ...``);
* a list: ``noun=war,feud,expedition`` (or ``|`` as separator when values hold commas);
* a list file in ``prompts/``: ``name=@sweeps:ioi_names`` (key ``ioi_names`` of
  ``prompts/sweeps.json``, looked up at the top level and under ``"lists"``),
  ``name=@ioi_templates:names`` or ``city=@my_cities.txt`` (one value a line). A
  JSON list of objects gives companion slots: ``city=@sweeps:foreign_cities``
  with entries ``{"city": "Berlin", "country": "Germany"}`` also defines ``{country}``;
* a value derived from another slot: a slice ``XX=year[:2]``, ``YY=year[2:]``,
  ``d=year[0]``, or an offset ``next=year+1`` (keeps the base's zero padding).

Range, list and file slots are *swept*: a sweep runs every combination of their
values (one slot gives a curve, two a grid). ``[[marked words]]`` in the template
(the brackets are removed) can be named as positions; ``{{`` and ``}}`` write
literal braces.

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

import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from headvis_core.data.prompt_library import PROMPTS_DIR
from headvis_core.errors import InputError

MAX_VALUES = 100_000
RESERVED_NAMES = {"last", "first", "bos", "mark"}
_NAME = r"[A-Za-z_]\w*"
_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*(?::\s*(\d+))?\s*$")
_SLICE = re.compile(rf"^\s*({_NAME})\s*\[\s*(-?\d*)\s*(:?)\s*(-?\d*)\s*\]\s*$")
_OFFSET = re.compile(rf"^\s*({_NAME})\s*([+-])\s*(\d+)\s*$")
_TEMPLATE_PIECE = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{([^{}]*)\}|[{}]")
_POSITION = re.compile(
    rf"^\s*(?:(?P<word>last|first|bos)|(?P<index>-?\d+)|\{{?(?P<name>{_NAME})\}}?(?:#(?P<occ>\d+))?"
    rf"(?::(?P<edge>first|last))?)\s*(?P<offset>[+-]\s*\d+)?\s*$")


# ----------------------------------------------------------------------------- slots

@dataclass(frozen=True)
class SlotDef:
    """One slot: swept (``kind`` range, list or file) or derived from another slot."""

    name: str
    kind: str  # "range", "list", "file" or "derived"
    definition: str
    values: Sequence[Any] = ()  # swept slots: ints (range) or strings; lazily a range for ranges
    records: Optional[tuple[dict[str, str], ...]] = None  # file slots with companion values
    base: Optional[str] = None  # derived: the slot it is computed from
    op: Optional[tuple] = None  # derived: ("slice", start, stop) | ("index", i) | ("offset", n)
    width: int = 0  # zero padding of range values

    @property
    def swept(self) -> bool:
        return self.kind != "derived"

    @property
    def numeric(self) -> bool:
        return self.kind == "range"

    def __len__(self) -> int:
        return len(self.values)

    def text_of(self, value: Any) -> str:
        return str(value).zfill(self.width) if self.kind == "range" and self.width else str(value)

    def companions(self) -> list[str]:
        return sorted({k for r in self.records or () for k in r} - {self.name})


def _int_or_none(text: str) -> Optional[int]:
    return int(text) if text not in ("", None) else None


def parse_slot(spec: str, folder: Path = PROMPTS_DIR) -> SlotDef:
    """Parse ``name=definition`` (see the module docstring) into a :class:`SlotDef`."""
    if not spec or "=" not in spec:
        raise InputError(f"{spec!r} is not a slot definition: write name=values, for example year=1000..1999, "
                         "noun=war,feud or XX=year[:2].")
    name, definition = (part.strip() for part in spec.split("=", 1))
    name = name.strip("{} ")
    if not re.fullmatch(_NAME, name):
        raise InputError(f"{name!r} is not a slot name: use letters, digits and _ (for example year).")
    if name.lower() in RESERVED_NAMES:
        raise InputError(f"{name!r} is reserved for positions; call the slot something else.")
    if not definition:
        raise InputError(f"Slot {name!r} has no values: write {name}=1000..1999, {name}=a,b,c or {name}=@file.")
    match = _RANGE.match(definition)
    if match:
        return _range_slot(name, definition, *match.groups())
    match = _SLICE.match(definition)
    if match and not definition.strip().startswith("@"):
        base, start, colon, stop = match.groups()
        op = ("slice", _int_or_none(start), _int_or_none(stop)) if colon else ("index", int(start or 0))
        if not colon and start == "":
            raise InputError(f"Slot {name}: write an index or a slice, for example {base}[0] or {base}[:2].")
        return SlotDef(name, "derived", definition, base=base, op=op)
    match = _OFFSET.match(definition)
    if match:
        base, sign, amount = match.groups()
        return SlotDef(name, "derived", definition, base=base, op=("offset", int(amount) * (1 if sign == "+" else -1)))
    if definition.startswith("@"):
        return _file_slot(name, definition, folder)
    separator = "|" if "|" in definition else ","
    items = [item.strip() for item in definition.split(separator)]
    if any(item == "" for item in items):
        raise InputError(f"Slot {name!r} has an empty value in {definition!r}; remove the extra {separator!r}.")
    return SlotDef(name, "list", definition, values=tuple(items))


def _range_slot(name: str, definition: str, start_text: str, stop_text: str, step_text: Optional[str]) -> SlotDef:
    start, stop, step = int(start_text), int(stop_text), int(step_text) if step_text else 1
    if step <= 0:
        raise InputError(f"Slot {name}: the step must be a positive whole number, not {step}.")
    if stop < start:
        raise InputError(f"Slot {name}: the range {definition} is empty (it ends before it starts); "
                         f"did you mean {stop}..{start}?")
    digits = start_text.lstrip("-")
    width = len(digits) if digits.startswith("0") and len(digits) > 1 else 0
    return SlotDef(name, "range", definition, values=range(start, stop + 1, step), width=width)


def _file_slot(name: str, definition: str, folder: Path) -> SlotDef:
    reference = definition[1:].strip()
    stem, _, key = reference.partition(":")
    root = folder.resolve()
    candidates = [root / stem] if "." in Path(stem).name else [root / f"{stem}.json", root / f"{stem}.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None or root not in path.resolve().parents:
        known = sorted(p.name for p in root.glob("*") if p.suffix in (".json", ".txt"))
        raise InputError(f"Slot {name}: no list file {stem!r} in prompts/ (there are: {', '.join(known)}).")
    if path.suffix == ".json":
        raw = json.loads(path.read_text(encoding="utf-8"))
        items = _json_list(raw, key, name, path.name)
    else:
        if key:
            raise InputError(f"Slot {name}: {path.name} is a plain list; write @{stem} without a key.")
        items = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
    if not items:
        raise InputError(f"Slot {name}: the list {reference!r} is empty.")
    if all(isinstance(item, dict) for item in items):
        if any(name not in item for item in items):
            raise InputError(f"Slot {name}: every entry of {reference!r} needs a {name!r} field "
                             f"(the entries have {', '.join(sorted(items[0]))}).")
        records = tuple({str(k): str(v) for k, v in item.items()} for item in items)
        return SlotDef(name, "file", definition, values=tuple(r[name] for r in records), records=records)
    if not all(isinstance(item, (str, int, float)) for item in items):
        raise InputError(f"Slot {name}: {reference!r} must be a list of strings or of objects.")
    return SlotDef(name, "file", definition, values=tuple(str(item) for item in items))


def _json_list(raw: Any, key: str, name: str, filename: str) -> list:
    if not key:
        if isinstance(raw, list):
            return raw
        lists = sorted(k for k, v in {**raw, **raw.get("lists", {})}.items() if isinstance(v, list))
        raise InputError(f"Slot {name}: say which list of {filename} to use, e.g. @{Path(filename).stem}:"
                         f"{lists[0] if lists else 'key'} (lists: {', '.join(lists)}).")
    for scope in (raw, raw.get("lists", {}) if isinstance(raw, dict) else {}):
        value = scope
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, list):
            return value
    lists = sorted(k for k, v in {**raw, **raw.get("lists", {})}.items() if isinstance(v, list))
    raise InputError(f"Slot {name}: {filename} has no list {key!r} (lists: {', '.join(lists)}).")


def _derive(slot: SlotDef, base_text: str) -> str:
    kind = slot.op[0]
    if kind == "slice":
        return base_text[slot.op[1]:slot.op[2]]
    if kind == "index":
        try:
            return base_text[slot.op[1]]
        except IndexError:
            return ""
    try:
        number = int(base_text)
    except ValueError:
        raise InputError(f"Slot {slot.name}={slot.definition}: {base_text!r} is not a whole number.") from None
    width = len(base_text) if base_text.startswith("0") and len(base_text) > 1 else 0
    return str(number + slot.op[1]).zfill(width)


# ----------------------------------------------------------------------------- template text

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
            if not re.fullmatch(_NAME, name):
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


# ----------------------------------------------------------------------------- positions

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


# ----------------------------------------------------------------------------- the sweep spec and plan

@dataclass(frozen=True)
class SweepSpec:
    """Everything that defines a sweep, as the user writes it (page, CLI, preset)."""

    template: str
    slots: tuple[str, ...]  # "name=definition" strings
    query: str = "last"
    key: Optional[str] = None  # default: the first swept slot's first token
    answers: tuple[str, ...] = ()  # answer tokens at the answer position, may hold {slot}
    greater_than: Optional[str] = None  # slot holding the number the answer should exceed
    answer_at: str = "last"


@dataclass
class SweepPlan:
    """A sweep expanded and tokenized: one row per value, positions resolved."""

    spec: SweepSpec
    swept: list[str]  # the sweep's axes: slots with more than one value (first = x)
    numeric: dict[str, bool]  # whether each swept slot is a range of integers
    values: pd.DataFrame  # one row per kept value: every slot's value
    texts: list[str]
    token_ids: list[list[int]]  # including BOS
    n_prefix: int  # special tokens the model prepends (BOS)
    query_pos: np.ndarray  # [value]
    key_pos: np.ndarray  # [value]
    answer_pos: np.ndarray  # [value]
    answer_labels: list[str]
    answer_ids: np.ndarray  # [value, answer]
    greater_than_refs: Optional[list[str]]  # the reference number of each value, as digits
    majority_length: int
    odd_values: pd.DataFrame  # values whose token count differs from the majority (kept or dropped)
    dropped_odd: bool
    n_total: int  # values before any were dropped
    warnings: list[str] = field(default_factory=list)

    @property
    def n_values(self) -> int:
        return len(self.texts)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.token_ids], dtype=np.int64)


def describe_values(values: pd.DataFrame, swept: Sequence[str], limit: int = 8) -> str:
    """``year=1000, year=1001, ... and 5 more`` for error messages and reports."""
    rows = [", ".join(f"{name}={row[name]}" for name in swept) for _, row in values.head(limit).iterrows()]
    more = len(values) - len(rows)
    return "; ".join(rows) + (f" ... and {more} more" if more > 0 else "")


def _ordered_slots(defs: dict[str, SlotDef], companions: Sequence[str] = ()) -> list[str]:
    """Slot names in an order where each derived slot comes after its base (and no cycles)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, chain: list[str]) -> None:
        if name in order or (name in companions and name not in defs):
            return
        if name in visiting:
            raise InputError(f"The derived slots form a loop: {' -> '.join(chain + [name])}.")
        slot = defs[name]
        if not slot.swept:
            if slot.base not in defs and slot.base not in companions:
                defined = ", ".join(list(defs) + list(companions)) or "none"
                raise InputError(f"Slot {name}={slot.definition} is derived from {{{slot.base}}}, which is not "
                                 f"defined (defined: {defined}).")
            visiting.add(name)
            visit(slot.base, chain + [name])
            visiting.discard(name)
        order.append(name)

    for name in defs:
        visit(name, [])
    return order


def define_slots(specs: Sequence[str], folder: Path = PROMPTS_DIR) -> dict[str, SlotDef]:
    defs: dict[str, SlotDef] = {}
    for spec in specs:
        if not spec or not spec.strip():
            continue
        slot = parse_slot(spec.strip(), folder)
        if slot.name in defs:
            raise InputError(f"Slot {slot.name!r} is defined twice.")
        defs[slot.name] = slot
    return defs


def expand_values(spec: SweepSpec, sample: Optional[int] = None, seed: int = 0,
                  folder: Path = PROMPTS_DIR) -> tuple[list[str], pd.DataFrame, int]:
    """Every combination of the swept slots' values (or a random sample of them), with derived values.

    Returns ``(axes, values [value, slot], total combinations)``: the axes are
    the swept slots with more than one value (a one-value slot is a constant).
    Refuses more than :data:`MAX_VALUES` combinations unless ``sample`` is given.
    """
    template = parse_template(spec.template)
    defs = define_slots(spec.slots, folder)
    companions = {c: s.name for s in defs.values() if s.records for c in s.companions()}
    for clash in set(companions) & set(defs):
        raise InputError(f"Slot {clash!r} is defined twice: by hand and as a field of {companions[clash]!r}'s list.")
    known = set(defs) | set(companions)
    referenced = template.slot_names + [name for answer in spec.answers if answer
                                        for name in parse_template(answer, allow_blank=True).slot_names]
    if spec.greater_than:
        referenced.append(spec.greater_than)
    undefined = [n for n in dict.fromkeys(referenced) if n not in known]
    if undefined:
        defined = ", ".join(sorted(known)) or "none"
        raise InputError(f"Slot {{{undefined[0]}}} is used but not defined (defined: {defined}). Add a line "
                         f"such as {undefined[0]}=1000..1999 or {undefined[0]}=a,b,c.")
    order = _ordered_slots(defs, list(companions))
    swept = [name for name in defs if defs[name].swept]
    if not swept:
        raise InputError("No slot to sweep: give at least one slot a range (year=1000..1999), a list or a file.")
    # a one-value slot is a constant, not an axis of the sweep
    axes = [name for name in swept if len(defs[name]) > 1] or swept[:1]
    if len(axes) > 2:
        raise InputError(f"At most two slots can vary in one sweep (a curve or a grid); {', '.join(axes)} all "
                         "have several values. Fix all but two to one value.")
    sizes = [len(defs[name]) for name in swept]
    total = int(np.prod(sizes, dtype=object))
    if sample is not None:
        if sample <= 0:
            raise InputError("The sample size must be a positive number of values.")
        if sample > MAX_VALUES:
            raise InputError(f"A sample of {sample} values is over the limit of {MAX_VALUES}.")
    if total > MAX_VALUES and sample is None:
        raise InputError(f"The sweep has {total:,} combinations ({' x '.join(map(str, sizes))}), over the limit of "
                         f"{MAX_VALUES:,}. Narrow the ranges, add a step (year=1000..1999:10) or sweep a random "
                         "sample (sample=N).")
    if sample is not None and sample < total:
        chosen = np.sort(np.random.default_rng(seed).choice(total, size=sample, replace=False)) if total < 2**62 \
            else np.unique(np.random.default_rng(seed).integers(0, total, size=sample))
        combos = [_unravel(int(i), sizes) for i in chosen]
    else:
        combos = itertools.product(*(range(n) for n in sizes))
    rows: list[dict[str, Any]] = []
    for combo in combos:
        row: dict[str, Any] = {}
        for name, index in zip(swept, combo):
            slot = defs[name]
            row[name] = slot.values[index]
            if slot.records:
                row.update({k: v for k, v in slot.records[index].items() if k != name})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(swept + [c for c in companions])))
    for name in order:
        slot = defs[name]
        if not slot.swept:
            base = defs.get(slot.base)
            base_texts = frame[slot.base].map(base.text_of) if base is not None else frame[slot.base].astype(str)
            frame[name] = [_derive(slot, text) for text in base_texts]
    return axes, frame, total


def _unravel(index: int, sizes: Sequence[int]) -> tuple[int, ...]:
    out = []
    for size in reversed(sizes):
        index, rest = divmod(index, size)
        out.append(rest)
    return tuple(reversed(out))


def _text_values(frame: pd.DataFrame, defs_width: dict[str, int]) -> list[dict[str, str]]:
    columns = list(frame.columns)
    out = []
    for row in frame.itertuples(index=False, name=None):
        out.append({c: (str(v).zfill(defs_width[c]) if defs_width.get(c) else str(v)) for c, v in zip(columns, row)})
    return out


def _tokenize(model: Any, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]], int]:
    """Token ids as the model sees them (BOS included) and character offsets of the non-special tokens."""
    tokenizer = model.tokenizer
    sample_full = model.to_tokens(texts[0], truncate=False)[0].tolist()
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        bodies, offsets = encoded["input_ids"], [list(map(tuple, o)) for o in encoded["offset_mapping"]]
    else:  # slow tokenizers have no offsets: find each token's end by tokenizing growing prefixes
        bodies, offsets = [], []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ends = [len(tokenizer.decode(ids[:i + 1])) for i in range(len(ids))]
            bodies.append(ids)
            offsets.append([(0 if i == 0 else ends[i - 1], ends[i]) for i in range(len(ids))])
    n_prefix = len(sample_full) - len(bodies[0])
    prefix = sample_full[:n_prefix]
    if n_prefix < 0 or sample_full[n_prefix:] != bodies[0]:
        raise InputError("This model's tokenizer adds tokens in ways the sweep cannot follow (its token ids "
                         "differ from the tokenizer's own); use another model.")
    for text, body in list(zip(texts, bodies))[1:3]:  # the model's special tokens do not depend on the text
        if model.to_tokens(text, truncate=False)[0].tolist() != prefix + body:
            raise InputError("This model's tokenizer adds tokens in ways the sweep cannot follow.")
    return [prefix + body for body in bodies], offsets, n_prefix


def build_plan(model: Any, spec: SweepSpec, drop_odd_lengths: bool = False, sample: Optional[int] = None,
               seed: int = 0, folder: Path = PROMPTS_DIR) -> SweepPlan:
    """Expand ``spec`` over its values, tokenize every prompt and resolve the named positions.

    Args:
        drop_odd_lengths: leave out values whose prompt has a different number
            of tokens than most (they are listed in ``odd_values`` either way).
        sample: sweep a random sample of this many combinations (seeded).
    Raises:
        InputError: an undefined slot, an empty or too large range, a prompt
            longer than the context, a position or answer token that does not
            exist for some values (the values are listed).
    """
    swept, frame, total = expand_values(spec, sample=sample, seed=seed, folder=folder)
    defs = define_slots(spec.slots, folder)
    widths = {name: slot.width for name, slot in defs.items() if slot.width}
    template = parse_template(spec.template)
    query, key = parse_position(spec.query or "last"), parse_position(spec.key or f"{swept[0]}:first")
    answer_at = parse_position(spec.answer_at or "last")
    for position in (query, key, answer_at):
        if position.kind == "slot" and position.name not in frame.columns:
            raise InputError(f"The position {position.spec!r} names slot {{{position.name}}}, which is not defined.")
        if position.kind == "slot" and position.name not in template.slot_names:
            raise InputError(f"The position {position.spec!r} names slot {{{position.name}}}, which does not appear "
                             "in the template text.")
        if position.kind == "mark" and template.n_marks < position.occurrence:
            raise InputError(f"The position {position.spec!r} needs {position.occurrence} [[marked]] word(s) in the "
                             f"template, which has {template.n_marks}.")
    text_values = _text_values(frame, widths)
    rendered = [render(template, values) for values in text_values]
    texts = [r.text for r in rendered]
    if any(not t.strip() for t in texts):
        raise InputError("The template gives an empty prompt for some values.")
    token_ids, offsets, n_prefix = _tokenize(model, texts)
    lengths = np.array([len(ids) for ids in token_ids])
    n_ctx = int(model.cfg.n_ctx)
    # greater-than may append all but the last digit of the reference (digit tokenizers)
    extra_tokens = max(len(text_values[0].get(spec.greater_than, "")) - 1, 0) if spec.greater_than else 0
    too_long = np.flatnonzero(lengths + extra_tokens > n_ctx)
    if len(too_long):
        raise InputError(f"The prompt is longer than the model's context of {n_ctx} tokens for {len(too_long)} "
                         f"values (up to {int(lengths.max()) + extra_tokens} tokens): "
                         f"{describe_values(frame.iloc[too_long], swept)}. Shorten the template.")
    majority = Counter(lengths.tolist()).most_common(1)[0][0]
    odd_mask = lengths != majority
    odd_values = frame[odd_mask].assign(n_tokens=lengths[odd_mask])
    warnings: list[str] = []
    if odd_mask.any():
        verb = "left out" if drop_odd_lengths else "kept"
        warnings.append(f"{int(odd_mask.sum())} of {len(frame)} values tokenize into a different number of tokens "
                        f"than most ({majority}); {verb}: {describe_values(odd_values, swept)}.")
    keep = np.flatnonzero(~odd_mask) if drop_odd_lengths else np.arange(len(frame))
    frame = frame.iloc[keep].reset_index(drop=True)
    rendered = [rendered[i] for i in keep]
    texts = [texts[i] for i in keep]
    token_ids = [token_ids[i] for i in keep]
    offsets = [offsets[i] for i in keep]
    text_values = [text_values[i] for i in keep]

    positions = {}
    for label, position in (("query", query), ("key", key), ("answer", answer_at)):
        found = [resolve_position(position, r, o, n_prefix, len(ids))
                 for r, o, ids in zip(rendered, offsets, token_ids)]
        missing = [i for i, p in enumerate(found) if p is None]
        if missing:
            raise InputError(f"The {label} position {position.spec!r} does not exist for {len(missing)} of "
                             f"{len(found)} values: {describe_values(frame.iloc[missing], swept)}.")
        positions[label] = np.array(found, dtype=np.int64)
    bad_order = np.flatnonzero(positions["key"] > positions["query"])
    if len(bad_order):
        warnings.append(f"The key comes after the query for {len(bad_order)} values, so a causal model's attention "
                        f"there is 0: {describe_values(frame.iloc[bad_order], swept)}.")

    answer_labels = [a for a in spec.answers if a]
    answer_ids = np.zeros((len(texts), len(answer_labels)), dtype=np.int64)
    for j, answer in enumerate(answer_labels):
        ids_of: dict[str, list[int]] = {}
        bad: list[int] = []
        for i, values in enumerate(text_values):
            filled = fill_text(answer, values, "answer")
            if filled not in ids_of:
                ids_of[filled] = (model.to_tokens(filled, prepend_bos=False, truncate=False)[0].tolist()
                                  if filled else [])
            ids = ids_of[filled]
            if len(ids) != 1:
                bad.append(i)
            else:
                answer_ids[i, j] = ids[0]
        if bad:
            example = fill_text(answer, text_values[bad[0]], "answer")
            pieces = [model.to_single_str_token(t) for t in ids_of[example]]
            hint = "Answers must be one token; most words need a leading space, as in ' Mary'."
            if len(bad) == len(text_values) and not parse_template(answer, allow_blank=True).slot_names:
                raise InputError(f"The answer {answer!r} is not a single token for this model: it tokenizes into "
                                 f"{pieces}. {hint}")
            raise InputError(f"The answer {answer!r} is not a single token for {len(bad)} of {len(text_values)} "
                             f"values (e.g. {example!r} tokenizes into {pieces}): "
                             f"{describe_values(frame.iloc[bad], swept)}. {hint}")

    refs = None
    if spec.greater_than:
        refs = [values[spec.greater_than] for values in text_values]
        bad = [i for i, r in enumerate(refs) if not r.isdigit() or len(r) > 3 or len(r) != len(refs[0])]
        if bad:
            raise InputError(f"Greater-than needs {{{spec.greater_than}}} to be a number of the same 1 to 3 digits "
                             f"for every value; it is not for {len(bad)} values (e.g. {refs[bad[0]]!r}): "
                             f"{describe_values(frame.iloc[bad], swept)}. Derive it, as in YY=year[2:].")
        if not (positions["answer"] == lengths[keep] - 1).all():
            raise InputError("Greater-than reads the prediction after the last token: leave the answer position "
                             "at 'last'.")

    return SweepPlan(spec=spec, swept=swept, numeric={n: defs[n].numeric for n in swept}, values=frame,
                     texts=texts, token_ids=token_ids, n_prefix=n_prefix, query_pos=positions["query"],
                     key_pos=positions["key"], answer_pos=positions["answer"], answer_labels=answer_labels,
                     answer_ids=answer_ids, greater_than_refs=refs, majority_length=int(majority),
                     odd_values=odd_values.reset_index(drop=True), dropped_odd=drop_odd_lengths, n_total=total,
                     warnings=warnings)


def tokenization_report(model: Any, plan: SweepPlan, n_samples: int = 5) -> pd.DataFrame:
    """How a few sample values tokenize: their tokens and where the query and key land.

    Samples spread over the sweep (first, last and between), plus up to two
    values with an odd token count, so a digit-splitting tokenizer shows itself.
    """
    from headvis_core.tokens import visible

    n = plan.n_values
    picks = list(dict.fromkeys(np.linspace(0, n - 1, num=min(n_samples, n)).round().astype(int).tolist()))
    if len(plan.odd_values) and not plan.dropped_odd:
        lengths = plan.lengths
        picks += np.flatnonzero(lengths != plan.majority_length)[:2].tolist()
    rows = []
    for i in dict.fromkeys(picks):
        pieces = [visible(model.to_single_str_token(t)) for t in plan.token_ids[i]]
        q, k = int(plan.query_pos[i]), int(plan.key_pos[i])
        rows.append({
            "value": ", ".join(str(plan.values.iloc[i][s]) for s in plan.swept),
            "n_tokens": len(pieces),
            "tokens": " | ".join(pieces[plan.n_prefix:]),
            "query": f"{q}:{pieces[q]}",
            "key": f"{k}:{pieces[k]}",
        })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- presets

PRESETS_FILE = PROMPTS_DIR / "sweeps.json"


@dataclass(frozen=True)
class SweepPreset:
    """A ready-made sweep from ``prompts/sweeps.json`` (its description field documents the format)."""

    id: str
    name: str
    note: str
    spec: SweepSpec
    heads: dict[str, str]  # model short name (or "default") -> "L.H,L.H"
    curve: Optional[str]
    level: float

    def heads_for(self, model_name: str) -> str:
        return self.heads.get(model_name, self.heads.get(model_name.lower(), self.heads.get("default", "")))


def load_presets(path: Path = PRESETS_FILE) -> list[SweepPreset]:
    from headvis_core.errors import CorruptFileError

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        presets = []
        for entry in raw["presets"]:
            spec = SweepSpec(template=entry["template"], slots=tuple(entry["slots"]),
                             query=entry.get("query", "last"), key=entry.get("key"),
                             answers=tuple(entry.get("answers", ())), greater_than=entry.get("greater_than"))
            presets.append(SweepPreset(id=entry["id"], name=entry.get("name", entry["id"]), note=entry.get("note", ""),
                                       spec=spec, heads=dict(entry.get("heads", {})), curve=entry.get("curve"),
                                       level=float(entry.get("level", 0.5))))
        return presets
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"The sweep presets file {path.name} is malformed: {err}") from err


def preset(preset_id: str, path: Path = PRESETS_FILE) -> SweepPreset:
    presets = load_presets(path)
    for candidate in presets:
        if candidate.id == preset_id:
            return candidate
    raise InputError(f"No sweep preset called {preset_id!r}; there are: {', '.join(p.id for p in presets)}.")
