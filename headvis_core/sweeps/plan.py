"""A sweep planned: the spec expanded over its slot values, tokenized, positions and answers resolved.

:func:`build_plan` takes a :class:`SweepSpec` as the user writes it (page,
CLI, preset) and returns a :class:`SweepPlan` that :mod:`headvis_core.sweeps.run`
runs in batches. Every problem a user can cause (an undefined slot, too many
values, a prompt longer than the context, a position or answer token that
does not exist for some values) raises :class:`InputError` listing the values.
"""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from headvis_core.data.prompt_library import PROMPTS_DIR
from headvis_core.errors import InputError
from headvis_core.sweeps.positions import PositionSpec, parse_position, resolve_position
from headvis_core.sweeps.slots import MAX_VALUES, SlotDef, combinations, define_slots, ordered_slots
from headvis_core.sweeps.template import ParsedTemplate, Rendered, fill_text, parse_template, render
from headvis_core.tokens import visible


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


def _check_slots_defined(spec: SweepSpec, template: ParsedTemplate, known: set[str]) -> None:
    referenced = template.slot_names + [name for answer in spec.answers if answer
                                        for name in parse_template(answer, allow_blank=True).slot_names]
    if spec.greater_than:
        referenced.append(spec.greater_than)
    undefined = [n for n in dict.fromkeys(referenced) if n not in known]
    if undefined:
        defined = ", ".join(sorted(known)) or "none"
        raise InputError(f"Slot {{{undefined[0]}}} is used but not defined (defined: {defined}). Add a line "
                         f"such as {undefined[0]}=1000..1999 or {undefined[0]}=a,b,c.")


def _slots_used(spec: SweepSpec, defs: dict[str, SlotDef]) -> set[str]:
    """The slots the template, the answers, greater-than or the positions use, with the slots they need."""
    used = set(parse_template(spec.template).slot_names)
    for answer in spec.answers:
        if answer:
            used |= set(parse_template(answer, allow_blank=True).slot_names)
    if spec.greater_than:
        used.add(spec.greater_than)
    for position in (spec.query, spec.key, spec.answer_at):
        if position:
            name = parse_position(position).name
            if name:
                used.add(name)
    for slot in defs.values():  # a list file's slot is used where any of its fields is
        if slot.records and used & set(slot.companions()):
            used.add(slot.name)
    frontier = list(used)
    while frontier:  # a derived slot uses its base
        slot = defs.get(frontier.pop())
        if slot is not None and slot.base and slot.base not in used:
            used.add(slot.base)
            frontier.append(slot.base)
    return used


def check_slots_used(spec: SweepSpec, folder: Path = PROMPTS_DIR) -> None:
    """Refuse a slot the template, answers and positions never use: it would turn a curve into a grid.

    :func:`expand_values` (so :func:`build_plan`) calls it; the CLI calls it before loading a model.
    """
    _refuse_unused_slots(spec, define_slots(spec.slots, folder))


def _refuse_unused_slots(spec: SweepSpec, defs: dict[str, SlotDef]) -> None:
    used = _slots_used(spec, defs)
    unused = [name for name in defs if name not in used]
    if unused:
        many = len(unused) > 1
        raise InputError(f"Slot{'s' if many else ''} {', '.join(unused)} {'are' if many else 'is'} defined but "
                         "not used in the template, the answers or the positions; each value would repeat the "
                         "same prompt (an unused slot turns the sweep into a grid). Remove "
                         f"{'them' if many else 'it'} or use {{{unused[0]}}} in the template.")


def _sweep_axes(defs: dict[str, SlotDef]) -> tuple[list[str], list[str]]:
    """``(swept slots, axes)``: the axes are the swept slots with more than one value (at most two)."""
    swept = [name for name in defs if defs[name].swept]
    if not swept:
        raise InputError("No slot to sweep: give at least one slot a range (year=1000..1999), a list or a file.")
    # a one-value slot is a constant, not an axis of the sweep
    axes = [name for name in swept if len(defs[name]) > 1] or swept[:1]
    if len(axes) > 2:
        raise InputError(f"At most two slots can vary in one sweep (a curve or a grid); {', '.join(axes)} all "
                         "have several values. Fix all but two to one value.")
    return swept, axes


def _check_size(sizes: Sequence[int], total: int, sample: Optional[int]) -> None:
    if sample is not None:
        if sample <= 0:
            raise InputError("The sample size must be a positive number of values.")
        if sample > MAX_VALUES:
            raise InputError(f"A sample of {sample} values is over the limit of {MAX_VALUES}.")
    if total > MAX_VALUES and sample is None:
        raise InputError(f"The sweep has {total:,} combinations ({' x '.join(map(str, sizes))}), over the limit of "
                         f"{MAX_VALUES:,}. Narrow the ranges, add a step (year=1000..1999:10) or sweep a random "
                         "sample (sample=N).")


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
    _check_slots_defined(spec, template, set(defs) | set(companions))
    _refuse_unused_slots(spec, defs)
    order = ordered_slots(defs, list(companions))
    swept, axes = _sweep_axes(defs)
    sizes = [len(defs[name]) for name in swept]
    total = int(np.prod(sizes, dtype=object))
    _check_size(sizes, total, sample)
    frame = combinations(defs, swept, list(companions), order, sample=sample, seed=seed)
    return axes, frame, total


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


def _parse_positions(spec: SweepSpec, swept: list[str], frame: pd.DataFrame,
                     template: ParsedTemplate) -> dict[str, PositionSpec]:
    """The query, key and answer positions, checked against the slots and marks of the template."""
    positions = {"query": parse_position(spec.query or "last"),
                 "key": parse_position(spec.key or f"{swept[0]}:first"),
                 "answer": parse_position(spec.answer_at or "last")}
    for position in positions.values():
        if position.kind == "slot" and position.name not in frame.columns:
            raise InputError(f"The position {position.spec!r} names slot {{{position.name}}}, which is not defined.")
        if position.kind == "slot" and position.name not in template.slot_names:
            raise InputError(f"The position {position.spec!r} names slot {{{position.name}}}, which does not appear "
                             "in the template text.")
        if position.kind == "mark" and template.n_marks < position.occurrence:
            raise InputError(f"The position {position.spec!r} needs {position.occurrence} [[marked]] word(s) in the "
                             f"template, which has {template.n_marks}.")
    return positions


def _check_context(model: Any, spec: SweepSpec, lengths: np.ndarray, text_values: list[dict[str, str]],
                   frame: pd.DataFrame, swept: list[str]) -> None:
    n_ctx = int(model.cfg.n_ctx)
    # greater-than may append all but the last digit of the reference (digit tokenizers)
    extra_tokens = max(len(text_values[0].get(spec.greater_than, "")) - 1, 0) if spec.greater_than else 0
    too_long = np.flatnonzero(lengths + extra_tokens > n_ctx)
    if len(too_long):
        raise InputError(f"The prompt is longer than the model's context of {n_ctx} tokens for {len(too_long)} "
                         f"values (up to {int(lengths.max()) + extra_tokens} tokens): "
                         f"{describe_values(frame.iloc[too_long], swept)}. Shorten the template.")


@dataclass
class _Tokenized:
    """The sweep's prompts, one entry per value, as far as the plan has got."""

    frame: pd.DataFrame
    rendered: list[Rendered]
    texts: list[str]
    token_ids: list[list[int]]
    offsets: list[list[tuple[int, int]]]
    text_values: list[dict[str, str]]

    def keep(self, rows: np.ndarray) -> "_Tokenized":
        return _Tokenized(frame=self.frame.iloc[rows].reset_index(drop=True),
                          rendered=[self.rendered[i] for i in rows], texts=[self.texts[i] for i in rows],
                          token_ids=[self.token_ids[i] for i in rows], offsets=[self.offsets[i] for i in rows],
                          text_values=[self.text_values[i] for i in rows])


def _odd_lengths(frame: pd.DataFrame, lengths: np.ndarray, swept: list[str],
                 drop: bool) -> tuple[int, np.ndarray, pd.DataFrame, list[str]]:
    """``(majority length, odd mask, odd values, warnings)``: values whose token count differs from most."""
    majority = Counter(lengths.tolist()).most_common(1)[0][0]
    odd_mask = lengths != majority
    odd_values = frame[odd_mask].assign(n_tokens=lengths[odd_mask])
    warnings: list[str] = []
    if odd_mask.any():
        verb = "left out" if drop else "kept"
        warnings.append(f"{int(odd_mask.sum())} of {len(frame)} values tokenize into a different number of tokens "
                        f"than most ({majority}); {verb}: {describe_values(odd_values, swept)}.")
    return majority, odd_mask, odd_values, warnings


def _resolve_positions(prompts: _Tokenized, positions: dict[str, PositionSpec], n_prefix: int,
                       swept: list[str], warnings: list[str]) -> dict[str, np.ndarray]:
    """Each named position's token index for every value; a position missing for some value is refused."""
    resolved = {}
    for label, position in positions.items():
        found = [resolve_position(position, r, o, n_prefix, len(ids))
                 for r, o, ids in zip(prompts.rendered, prompts.offsets, prompts.token_ids)]
        missing = [i for i, p in enumerate(found) if p is None]
        if missing:
            raise InputError(f"The {label} position {position.spec!r} does not exist for {len(missing)} of "
                             f"{len(found)} values: {describe_values(prompts.frame.iloc[missing], swept)}.")
        resolved[label] = np.array(found, dtype=np.int64)
    bad_order = np.flatnonzero(resolved["key"] > resolved["query"])
    if len(bad_order):
        warnings.append(f"The key comes after the query for {len(bad_order)} values, so a causal model's attention "
                        f"there is 0: {describe_values(prompts.frame.iloc[bad_order], swept)}.")
    return resolved


def _answer_token_ids(model: Any, answer_labels: list[str], prompts: _Tokenized, swept: list[str]) -> np.ndarray:
    """``[value, answer]`` token id of each answer (slots filled per value); each must be one token."""
    text_values = prompts.text_values
    answer_ids = np.zeros((len(text_values), len(answer_labels)), dtype=np.int64)
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
                             f"{describe_values(prompts.frame.iloc[bad], swept)}. {hint}")
    return answer_ids


def _greater_than_refs(spec: SweepSpec, prompts: _Tokenized, answer_pos: np.ndarray,
                       swept: list[str]) -> Optional[list[str]]:
    """The reference number of each value (digits) for the greater-than metric, or ``None``."""
    if not spec.greater_than:
        return None
    refs = [values[spec.greater_than] for values in prompts.text_values]
    bad = [i for i, r in enumerate(refs) if not r.isdigit() or len(r) > 3 or len(r) != len(refs[0])]
    if bad:
        raise InputError(f"Greater-than needs {{{spec.greater_than}}} to be a number of the same 1 to 3 digits "
                         f"for every value; it is not for {len(bad)} values (e.g. {refs[bad[0]]!r}): "
                         f"{describe_values(prompts.frame.iloc[bad], swept)}. Derive it, as in YY=year[2:].")
    lengths = np.array([len(ids) for ids in prompts.token_ids])
    if not (answer_pos == lengths - 1).all():
        raise InputError("Greater-than reads the prediction after the last token: leave the answer position "
                         "at 'last'.")
    return refs


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
    positions = _parse_positions(spec, swept, frame, template)
    text_values = _text_values(frame, widths)
    rendered = [render(template, values) for values in text_values]
    texts = [r.text for r in rendered]
    if any(not t.strip() for t in texts):
        raise InputError("The template gives an empty prompt for some values.")
    token_ids, offsets, n_prefix = _tokenize(model, texts)
    lengths = np.array([len(ids) for ids in token_ids])
    _check_context(model, spec, lengths, text_values, frame, swept)
    majority, odd_mask, odd_values, warnings = _odd_lengths(frame, lengths, swept, drop_odd_lengths)
    keep = np.flatnonzero(~odd_mask) if drop_odd_lengths else np.arange(len(frame))
    prompts = _Tokenized(frame, rendered, texts, token_ids, offsets, text_values).keep(keep)
    resolved = _resolve_positions(prompts, positions, n_prefix, swept, warnings)
    answer_labels = [a for a in spec.answers if a]
    answer_ids = _answer_token_ids(model, answer_labels, prompts, swept)
    refs = _greater_than_refs(spec, prompts, resolved["answer"], swept)
    return SweepPlan(spec=spec, swept=swept, numeric={n: defs[n].numeric for n in swept}, values=prompts.frame,
                     texts=prompts.texts, token_ids=prompts.token_ids, n_prefix=n_prefix,
                     query_pos=resolved["query"], key_pos=resolved["key"], answer_pos=resolved["answer"],
                     answer_labels=answer_labels, answer_ids=answer_ids, greater_than_refs=refs,
                     majority_length=int(majority), odd_values=odd_values.reset_index(drop=True),
                     dropped_odd=drop_odd_lengths, n_total=total, warnings=warnings)


def tokenization_report(model: Any, plan: SweepPlan, n_samples: int = 5) -> pd.DataFrame:
    """How a few sample values tokenize: their tokens and where the query and key land.

    Samples spread over the sweep (first, last and between), plus up to two
    values with an odd token count, so a digit-splitting tokenizer shows itself.
    """
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
