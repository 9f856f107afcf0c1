"""Slots of a prompt template: named values a sweep runs over, and values derived from them.

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
values (one slot gives a curve, two a grid); :func:`combinations` expands them.
"""

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from headvis_core.data.prompt_library import PROMPTS_DIR
from headvis_core.data.text import read_text_file
from headvis_core.errors import InputError

MAX_VALUES = 100_000
RESERVED_NAMES = {"last", "first", "bos", "mark"}
SLOT_NAME = r"[A-Za-z_]\w*"
_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*(?::\s*(\d+))?\s*$")
_SLICE = re.compile(rf"^\s*({SLOT_NAME})\s*\[\s*(-?\d*)\s*(:?)\s*(-?\d*)\s*\]\s*$")
_OFFSET = re.compile(rf"^\s*({SLOT_NAME})\s*([+-])\s*(\d+)\s*$")
# two dots with no list separator, file or brackets around them: meant as a range (year=a..b, year=1..2:x)
_LOOKS_LIKE_RANGE = re.compile(r"^[^@,|\[\]]*\.\.[^,|]*$")


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
    if not re.fullmatch(SLOT_NAME, name):
        raise InputError(f"{name!r} is not a slot name: use letters, digits and _ (for example year).")
    if name.lower() in RESERVED_NAMES:
        raise InputError(f"{name!r} is reserved for positions; call the slot something else.")
    if not definition:
        raise InputError(f"Slot {name!r} has no values: write {name}=1000..1999, {name}=a,b,c or {name}=@file.")
    match = _RANGE.match(definition)
    if match:
        return _range_slot(name, definition, *match.groups())
    refuse_malformed_range(name, definition)
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


def refuse_malformed_range(name: str, definition: str) -> None:
    """Refuse a definition written as a range whose ends are not whole numbers (``year=a..b``).

    It would otherwise be a list of one value, the literal text ``a..b``. A list
    holding such text (``x=a..b,c``) stays a list.
    """
    if _LOOKS_LIKE_RANGE.match(definition) and not _RANGE.match(definition):
        raise InputError(f"Slot {name}: {definition.strip()!r} is not a range of whole numbers; write "
                         f"START..STOP[:STEP] with whole numbers, for example {name}=1000..1999:10.")


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
    text, _ = read_text_file(path, f"Slot {name}: the list file {path.name}")  # UTF-8 or Windows-1252
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"Slot {name}: {path.name} is not valid JSON ({err}).") from None
        items = _json_list(raw, key, name, path.name)
    else:
        if key:
            raise InputError(f"Slot {name}: {path.name} is a plain list; write @{stem} without a key.")
        items = [line.strip() for line in text.splitlines()
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


def _json_lists(raw: Any) -> list[str]:
    """Names of the lists of a JSON list file (top level and under ``"lists"``), for messages."""
    if not isinstance(raw, dict):
        return []
    nested = raw.get("lists") if isinstance(raw.get("lists"), dict) else {}
    return sorted(k for k, v in {**raw, **nested}.items() if isinstance(v, list))


def _json_list(raw: Any, key: str, name: str, filename: str) -> list:
    if not key:
        if isinstance(raw, list):
            return raw
        lists = _json_lists(raw)
        raise InputError(f"Slot {name}: say which list of {filename} to use, e.g. @{Path(filename).stem}:"
                         f"{lists[0] if lists else 'key'} (lists: {', '.join(lists) or 'none'}).")
    nested = raw.get("lists", {}) if isinstance(raw, dict) else {}
    for scope in (raw, nested):
        value = scope
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, list):
            return value
    raise InputError(f"Slot {name}: {filename} has no list {key!r} (lists: {', '.join(_json_lists(raw)) or 'none'}).")


def derive(slot: SlotDef, base_text: str) -> str:
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


def ordered_slots(defs: dict[str, SlotDef], companions: Sequence[str] = ()) -> list[str]:
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
    """Parse every ``name=definition`` (blank lines skipped); a name defined twice is refused."""
    defs: dict[str, SlotDef] = {}
    for spec in specs:
        if not spec or not spec.strip():
            continue
        slot = parse_slot(spec.strip(), folder)
        if slot.name in defs:
            raise InputError(f"Slot {slot.name!r} is defined twice.")
        defs[slot.name] = slot
    return defs


def _unravel(index: int, sizes: Sequence[int]) -> tuple[int, ...]:
    out = []
    for size in reversed(sizes):
        index, rest = divmod(index, size)
        out.append(rest)
    return tuple(reversed(out))


def combinations(defs: dict[str, SlotDef], swept: Sequence[str], companions: Sequence[str],
                 order: Sequence[str], sample: Optional[int] = None, seed: int = 0) -> pd.DataFrame:
    """Every combination of the ``swept`` slots' values (or a seeded sample), then the derived slots.

    One row per combination, one column per slot (companion fields of list
    files included); derived slots are computed in ``order`` (bases first).
    """
    sizes = [len(defs[name]) for name in swept]
    total = int(np.prod(sizes, dtype=object))
    if sample is not None and sample < total:
        rng = np.random.default_rng(seed)
        if total < 2**62:
            chosen = np.sort(rng.choice(total, size=sample, replace=False))
        else:
            chosen = np.unique(rng.integers(0, total, size=sample))
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
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(list(swept) + list(companions))))
    for name in order:
        slot = defs[name]
        if not slot.swept:
            base = defs.get(slot.base)
            base_texts = frame[slot.base].map(base.text_of) if base is not None else frame[slot.base].astype(str)
            frame[name] = [derive(slot, text) for text in base_texts]
    return frame
