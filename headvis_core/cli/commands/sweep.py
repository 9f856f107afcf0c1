"""``sweep``: run a prompt template over a range of slot values, write a CSV, report threshold ranges.

Example (the year-range test on SmolLM2)::

    python -m headvis_core sweep --model smollm2-135m \\
        --template "The war lasted from the year {year} to the year" --slot year=1000..1999 \\
        --query year:last --key year:first --heads 2.3,4.4 --level 0.5 --out sweep.csv
"""

import argparse

from headvis_core.cli.main import (
    add_cache_argument,
    add_model_arguments,
    check_output_file,
    finite_float,
    non_negative_int,
    positive_int,
    report_stored,
    text_argument,
)
from headvis_core.errors import InputError


def slot_argument(text: str) -> str:
    """An argparse type for ``--slot NAME=VALUES``: text decoded, and a range of non-numbers refused.

    ``year=a..b`` would otherwise be a list of one value, the literal text ``a..b``
    (:func:`headvis_core.sweeps.slots.refuse_malformed_range`, which the slot parser applies too).
    """
    from headvis_core.sweeps.slots import refuse_malformed_range

    text = text_argument(text)
    name, sep, definition = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not a slot: write NAME=VALUES, for example year=1000..1999")
    try:
        refuse_malformed_range(name.strip(), definition)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _list_presets() -> int:
    from headvis_core.sweeps.presets import load_presets

    for entry in load_presets():
        print(f"{entry.id:<20} {entry.name}")
        print(f"{'':<20} template: {entry.spec.template}")
        print(f"{'':<20} slots: {'  '.join(entry.spec.slots)}")
    return 0


def _spec_from_args(args: argparse.Namespace):
    from headvis_core.sweeps.plan import SweepSpec
    from headvis_core.sweeps.presets import preset

    chosen = preset(args.preset) if args.preset else None
    base = chosen.spec if chosen else SweepSpec(template="", slots=())
    template = args.template if args.template is not None else base.template
    if not template:
        raise InputError("Give a template (--template TEXT) or a preset (--preset ID; --list-presets shows them).")
    slots = tuple(args.slot) if args.slot else base.slots
    if not slots:
        raise InputError("Give at least one slot, for example --slot year=1000..1999.")
    spec = SweepSpec(template=template, slots=slots, query=args.query or base.query, key=args.key or base.key,
                     answers=tuple(args.answer) if args.answer else base.answers,
                     greater_than=args.greater_than if args.greater_than is not None else base.greater_than)
    return spec, chosen


def _run(args: argparse.Namespace) -> int:
    if args.list_presets:
        return _list_presets()
    from headvis_core.cli.main import load_model_from_args
    from headvis_core.heads import parse_heads
    from headvis_core.limits import check_sweep_memory
    from headvis_core.progress import tqdm_progress
    from headvis_core.storage import atomic_write_text
    from headvis_core.store.kinds import SWEEP, sweep_inputs
    from headvis_core.store.results import cached
    from headvis_core.sweeps.plan import build_plan, expand_values, tokenization_report
    from headvis_core.sweeps.presets import usable_heads
    from headvis_core.sweeps.ranges import curve_range_reports
    from headvis_core.sweeps.run import MAX_BATCH, run_sweep
    from headvis_core.sweeps.thresholds import curve_ranges

    out = check_output_file(args.out, "--out")
    figure_path = check_output_file(args.figure, "--figure")
    spec, chosen = _spec_from_args(args)
    # bad, undefined or unused slots (sweeps.plan.check_slots_used) fail before the model loads
    expand_values(spec, sample=args.sample, seed=args.seed)
    loaded = load_model_from_args(args)
    info = loaded.info
    if args.heads is not None:
        heads = parse_heads(args.heads, info.n_layers, info.n_heads) if args.heads.strip() else []
    elif chosen is not None:
        heads, skipped = usable_heads(chosen.heads_for(info.name), info.n_layers, info.n_heads)
        if skipped:
            print(f"note: the preset's heads {', '.join(skipped)} do not exist in {info.name}; skipped.")
    else:
        raise InputError("Give the heads to read, for example --heads 5.1,6.9 (or --heads '' for answers only).")
    plan = build_plan(loaded.model, spec, drop_odd_lengths=args.drop_odd, sample=args.sample, seed=args.seed)
    print(f"{plan.n_values} values over {', '.join(plan.swept)}; {plan.majority_length} tokens for most values.")
    print("How sample values tokenize:")
    print(tokenization_report(loaded.model, plan).to_string(index=False))
    for warning in plan.warnings:
        print(f"note: {warning}")
    check_sweep_memory(loaded.model, plan, args.batch_tokens, predictions=not args.no_predictions,
                       max_batch=MAX_BATCH)
    predictions = not args.no_predictions
    stored = cached(SWEEP, loaded, sweep_inputs(plan, heads, predictions),
                    lambda: run_sweep(loaded.model, plan, heads, predictions=predictions,
                                      batch_tokens=args.batch_tokens, progress=tqdm_progress("sweeping")),
                    refresh=args.no_cache)
    report_stored(stored, "sweep")
    result = stored.value
    if out:
        atomic_write_text(out, result.table.to_csv(index=False))
        print(f"wrote {len(result.table)} rows to {args.out}")
    level = args.level if args.level is not None else (chosen.level if chosen else 0.5)
    curves = [args.curve] if args.curve else [c for c in result.curves
                                              if c.startswith("attn ") or c in ("greater_than", "logit_diff")]
    for curve in curves:
        reports = curve_range_reports(result, curve, level, above=not args.below, min_length=args.min_length,
                                      max_gap=args.max_gap, limit=args.show_ranges)
        for report in reports:
            print(report.description)
    if figure_path:
        from headvis_core.viz.sweeps import sweep_figure

        first = curves[0]
        figure = sweep_figure(result, curves if len(plan.swept) == 1 else [first], level,
                              curve_ranges(result, first, level, above=not args.below, min_length=args.min_length,
                                           max_gap=args.max_gap), title=spec.template)
        atomic_write_text(figure_path, figure.to_html(include_plotlyjs=True, full_html=True))
        print(f"wrote the figure to {args.figure}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from headvis_core.sweeps.run import DEFAULT_BATCH_TOKENS

    parser = subparsers.add_parser(
        "sweep", help="run a prompt template over slot values; head attention and answers per value",
        description="Fill a template's {slots} with every value of their ranges, run the prompts in batches, "
                    "and read each head's attention from the query to the key position, answer probabilities "
                    "and a greater-than score. Ranges where a curve reaches --level are printed.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--preset", help="start from a preset of prompts/sweeps.json (see --list-presets)")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    parser.add_argument("--template", type=text_argument,
                        help="text with {slot} references, e.g. 'The war lasted from the year {year} to the year'")
    parser.add_argument("--slot", action="append", metavar="NAME=VALUES", type=slot_argument,
                        help="year=1000..1999, year=1000..1999:10, noun=war,feud, name=@sweeps:ioi_names, "
                             "XX=year[:2], next=year+1 (repeat for several slots)")
    parser.add_argument("--heads", help="heads whose attention is read, e.g. 5.1,6.9")
    parser.add_argument("--query", help="query position: last, SLOT:first, SLOT:last, mark, ... (default last)")
    parser.add_argument("--key", help="key position (default: the first slot's first token)")
    parser.add_argument("--answer", action="append", metavar="TOKEN", type=text_argument,
                        help="answer token read at the last position, may hold {slot} (repeatable), e.g. ' Mary'")
    parser.add_argument("--greater-than", metavar="SLOT", help="slot holding the number the answer should exceed (YY)")
    parser.add_argument("--level", type=finite_float,
                        help="report ranges where a curve is at or above this (default 0.5)")
    parser.add_argument("--below", action="store_true", help="report ranges at or below the level instead")
    parser.add_argument("--curve", help="only report this column (default: every head, greater_than, logit_diff)")
    parser.add_argument("--min-length", type=positive_int, default=1, help="drop ranges of fewer values")
    parser.add_argument("--max-gap", type=non_negative_int, default=0,
                        help="merge ranges split by at most this many values")
    parser.add_argument("--show-ranges", type=positive_int, default=30, help="print at most this many ranges per curve")
    parser.add_argument("--sample", type=positive_int, help="sweep a random sample of this many combinations")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--drop-odd", action="store_true",
                        help="leave out values that tokenize into a different number of tokens than most")
    parser.add_argument("--no-predictions", action="store_true",
                        help="attention only: stop the pass after the last head's layer (faster)")
    parser.add_argument("--batch-tokens", type=positive_int, default=DEFAULT_BATCH_TOKENS,
                        help=f"tokens per forward pass (default {DEFAULT_BATCH_TOKENS})")
    parser.add_argument("--out", help="write the table here (CSV)")
    parser.add_argument("--figure", help="write the plot here (standalone HTML)")
    add_cache_argument(parser)
    parser.set_defaults(func=_run)
