"""``ablate``: KL ranking of every head, an attribution-patching estimate of it, or a targeted search.

Examples::

    python -m headvis_core ablate --model smollm2-135m \\
        --prompt "When Mary and John went to the store, John gave a drink to" --mode kl --out kl.json
    python -m headvis_core ablate --model smollm2-135m \\
        --prompt "When Mary and John went to the store, John gave a drink to" --mode targeted --target " John" \\
        --out flip.json
    python -m headvis_core ablate --preset ioi --n-prompts 16 --kind resample --metric logit_diff --out ioi.json
    python -m headvis_core ablate --preset ioi --n-prompts 16 --metric logit_diff --mode estimate --refine 20 \\
        --out estimate.json

The result file of ``kl`` and ``targeted`` is an ablation experiment the
Ablation page can reopen; ``estimate`` writes every head's attribution-patching
estimate, the exact values of the top ``--refine`` heads and the agreement
figures. Every result goes into the result store (``--no-cache`` recomputes).
"""

import argparse
import json
from pathlib import Path

from headvis_core.cli.main import (
    add_cache_argument,
    add_model_arguments,
    check_output_file,
    load_model_from_args,
    non_negative_int,
    positive_int,
    report_stored,
    text_argument,
)
from headvis_core.errors import CorruptFileError, InputError

MODES = ("kl", "targeted", "estimate")


def read_prompt_file(path: str) -> tuple[list[str], list, list]:
    """Prompts from a prompt-set JSON (``prompts/`` format) or a text file with one prompt per line.

    The file is decoded like a corpus file (UTF-8, else Windows-1252; binary refused).
    """
    from headvis_core.data.text import read_text_file

    file = Path(path)
    text, _ = read_text_file(file, what=f"The prompts file {path!r}")
    if file.suffix.lower() == ".json":
        try:
            prompts = json.loads(text)["prompts"]
            texts = [p["text"] for p in prompts]
            if not all(isinstance(t, str) for t in texts):
                raise TypeError("every prompt's text must be a string")
            return texts, [p.get("answer") for p in prompts], [p.get("alternative") for p in prompts]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CorruptFileError(f"{file.name} is not a prompt set ({{\"prompts\": [{{\"text\": ...}}]}}): "
                                   f"{err}") from err
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"The prompts file {path!r} holds no prompts.")
    return lines, [None] * len(lines), [None] * len(lines)


def check_half_len(model, half_len: int) -> None:
    """An induction prompt is BOS + 2 x half_len tokens: refuse one longer than the context."""
    longest = (int(model.cfg.n_ctx) - 1) // 2
    if half_len > longest:
        raise InputError(f"--half-len {half_len} makes prompts of {2 * half_len + 1} tokens, longer than this "
                         f"model's context of {int(model.cfg.n_ctx)}: use at most {longest}.")


def build_prompts(model, args: argparse.Namespace):
    from headvis_core.data.prompt_pairs import induction_prompts, ioi_prompts, prompts_from_texts

    if args.preset == "ioi":
        template = args.template
        if template is None and args.kind != "zero":
            from headvis_core.data.ioi import load_templates

            template = load_templates()["templates"][0]
            print(f"IOI: {args.kind} ablation needs prompts of one length, so only the template {template!r} is used")
        return ioi_prompts(model, args.n_prompts, seed=args.seed, template=template)
    if args.preset == "induction":
        check_half_len(model, args.half_len)
        return induction_prompts(model, args.n_prompts, half_len=args.half_len, seed=args.seed)
    if args.prompts:
        texts, answers, alternatives = read_prompt_file(args.prompts)
        answers = [args.answer] * len(texts) if args.answer else answers
        alternatives = [args.alternative] * len(texts) if args.alternative else alternatives
        corrupted = None
        if args.corrupted_prompts:
            corrupted, _, _ = read_prompt_file(args.corrupted_prompts)
        return prompts_from_texts(model, texts, targets=answers if all(answers) else None,
                                  alternatives=alternatives if all(alternatives) else None,
                                  corrupted=corrupted, name=Path(args.prompts).stem)
    if args.prompt is None:
        raise InputError("Give a prompt (--prompt TEXT), a prompts file (--prompts FILE) or a preset (--preset).")
    return prompts_from_texts(model, [args.prompt], targets=[args.answer] if args.answer else None,
                              alternatives=[args.alternative] if args.alternative else None,
                              corrupted=[args.corrupted] if args.corrupted else None)


def _estimate_record(loaded, args, metric: str, prompts, refined) -> dict:
    table = refined.table
    return {"format": "headvis-ablation-estimate", "version": 1, "model": loaded.info.name, "mode": "estimate",
            "kind": args.kind, "metric": metric, "prompts": list(prompts.texts), "refine": args.refine,
            "estimate": {"passes": refined.estimate.passes, "seconds": refined.estimate.seconds,
                         "note": refined.estimate.note, "clean": refined.estimate.clean},
            "exact_seconds": refined.exact.seconds, "agreement": refined.agreement.to_dict(),
            "heads": [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
                      for row in table.to_dict(orient="records")]}


def _run(args: argparse.Namespace) -> int:
    from headvis_core.ablation.experiments import AblationExperiment, save_experiment
    from headvis_core.ablation.ranking import check_metric, rank_heads_by_ablation
    from headvis_core.ablation.targeted import targeted_search
    from headvis_core.ablation.values import make_ablation
    from headvis_core.limits import check_ablation_memory
    from headvis_core.progress import tqdm_progress
    from headvis_core.storage import atomic_write_json
    from headvis_core.store import kinds
    from headvis_core.store.results import cached
    from headvis_core.tokens import single_token_id

    out = check_output_file(args.out, "--out")
    if args.prompts:
        read_prompt_file(args.prompts)  # a missing or binary file fails before the model loads
    loaded = load_model_from_args(args)
    model = loaded.model
    prompts = build_prompts(model, args)
    metric = args.metric or ("loss" if args.preset == "induction" else "kl")
    if args.mode in ("kl", "estimate"):
        check_metric(metric, prompts)
    elif args.target:
        single_token_id(model, args.target)  # fail before any progress bar is drawn
    check_ablation_memory(model, prompts, args.mode)
    if prompts.skipped_names:
        print(f"IOI: skipped {len(prompts.skipped_names)} names that are not one token for this model: "
              f"{', '.join(prompts.skipped_names)}")
    ablation = make_ablation(model, args.kind, prompts)
    if args.mode == "estimate":
        from headvis_core.ablation.estimate import estimate_heads, refine_estimate

        n_heads = loaded.info.n_layers * loaded.info.n_heads
        refine = min(args.refine, n_heads)

        def compute_estimate():
            estimate = estimate_heads(model, prompts, ablation, metric=metric,
                                      progress=tqdm_progress("attribution patching"))
            return refine_estimate(model, prompts, estimate, refine, ablation=ablation, engine=args.engine,
                                   progress=tqdm_progress(f"refining the top {refine} exactly"))

        stored = cached(kinds.ESTIMATE, loaded, kinds.estimate_inputs(prompts, args.kind, metric, refine),
                        compute_estimate, refresh=args.no_cache)
        report_stored(stored, "estimate")
        refined = stored.value
        print(f"estimate of all {n_heads} heads by {metric} ({args.kind} ablation, {len(prompts)} prompt(s)): "
              f"{refined.estimate.seconds:.1f} s, {refined.estimate.passes}; {refined.estimate.note}")
        print(f"exact values of the estimate's top {refine}: {refined.exact.seconds:.1f} s")
        print(f"agreement: {refined.agreement.summary}")
        print(refined.table.head(args.top).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        path = atomic_write_json(out, _estimate_record(loaded, args, metric, prompts, refined))
        print(f"saved {path}")
        return 0
    if args.mode == "kl":
        stored = cached(kinds.KL_RANKING, loaded, kinds.ranking_inputs(prompts, args.kind, metric, args.top),
                        lambda: rank_heads_by_ablation(model, prompts, ablation, metric=metric, top_n=args.top,
                                           engine=args.engine, progress=tqdm_progress("ablating heads")),
                        refresh=args.no_cache)
        report_stored(stored, "ranking")
        result = stored.value
        print(f"{len(result.table)} heads ranked by {metric} ({args.kind} ablation, {len(prompts)} prompt(s)) "
              f"in {result.seconds:.1f} s")
        print(result.table.head(args.top).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    else:
        inputs = kinds.targeted_inputs(prompts, args.kind, args.target or None, args.budget, not args.no_prune)
        stored = cached(kinds.TARGETED, loaded, inputs,
                        lambda: targeted_search(model, prompts, args.target or None, ablation, budget=args.budget,
                                                prune=not args.no_prune, engine=args.engine,
                                                progress=tqdm_progress("searching")),
                        refresh=args.no_cache)
        report_stored(stored, "targeted search")
        result = stored.value
        print(result.summary)
        print(result.trajectory.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    experiment = AblationExperiment(
        model=loaded.info.name, mode=args.mode, kind=args.kind, metric=metric if args.mode == "kl" else "margin",
        prompts=prompts.texts, result=result,
        settings={"preset": args.preset, "target": args.target, "budget": args.budget,
                  "n_prompts": len(prompts), "seed": args.seed})
    path = save_experiment(experiment, out)
    print(f"saved {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from headvis_core.ablation.runner import ENGINES
    from headvis_core.ablation.values import ABLATION_KINDS

    parser = subparsers.add_parser(
        "ablate", help="ablate heads: KL ranking of all heads, an instant estimate, or the heads that flip a "
                       "prediction",
        description="Zero, mean or resample ablation of attention heads at hook_z.")
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", type=text_argument, help="one prompt, scored at its last token")
    source.add_argument("--prompts", metavar="FILE", help="prompt-set JSON (prompts/ format) or one prompt per line")
    source.add_argument("--preset", choices=["ioi", "induction"], help="generated IOI or repeated-token prompts")
    parser.add_argument("--mode", choices=MODES, default="kl",
                        help="kl: exact ranking of every head; estimate: attribution patching of every head, "
                             "the top --refine refined exactly; targeted: heads that flip the prediction")
    parser.add_argument("--target", metavar="TOKEN", type=text_argument,
                        help="targeted mode: the token to make the top prediction (one token, with its leading "
                             "space: ' John')")
    parser.add_argument("--kind", choices=ABLATION_KINDS, default="zero")
    parser.add_argument("--metric", choices=["kl", "logit_diff", "loss"],
                        help="kl and estimate modes: what ranks the heads (default kl; loss for the induction "
                             "preset)")
    parser.add_argument("--answer", metavar="TOKEN", type=text_argument,
                        help="target token of the logit difference")
    parser.add_argument("--alternative", metavar="TOKEN", type=text_argument,
                        help="alternative token of the logit difference")
    parser.add_argument("--corrupted", metavar="TEXT", type=text_argument,
                        help="corrupted prompt for resample ablation (same length)")
    parser.add_argument("--corrupted-prompts", metavar="FILE", help="corrupted prompts, one per prompt")
    parser.add_argument("--budget", type=positive_int, default=10,
                        help="targeted mode: most heads to ablate (default 10)")
    parser.add_argument("--no-prune", action="store_true", help="targeted mode: keep every head the search added")
    parser.add_argument("--refine", type=positive_int, default=20,
                        help="estimate mode: heads of the estimate's top computed exactly (default 20)")
    parser.add_argument("--n-prompts", type=positive_int, default=8, help="presets: how many prompts (default 8)")
    parser.add_argument("--template", type=text_argument,
                        help="IOI preset: use only this template (needed for resample/mean ablation)")
    parser.add_argument("--half-len", type=positive_int, default=20,
                        help="induction preset: length of each copy")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--top", type=positive_int, default=10,
                        help="kl and estimate modes: heads to print (kl: and prediction shifts kept)")
    parser.add_argument("--engine", choices=ENGINES, default="replay", help=argparse.SUPPRESS)
    parser.add_argument("--out", required=True, metavar="result.json", help="where to write the result JSON")
    add_cache_argument(parser)
    parser.set_defaults(func=_run)
