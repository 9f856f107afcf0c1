"""``ablate``: KL ranking of every head, or a targeted search for heads that flip a prediction.

Examples::

    python -m headvis_core ablate --model smollm2-135m \\
        --prompt "When Mary and John went to the store, John gave a drink to" --mode kl --out kl.json
    python -m headvis_core ablate --model smollm2-135m \\
        --prompt "When Mary and John went to the store, John gave a drink to" --mode targeted --target " John" \\
        --out flip.json
    python -m headvis_core ablate --preset ioi --n-prompts 16 --kind resample --metric logit_diff --out ioi.json

The result file is an ablation experiment the Ablation page can reopen.
"""

import argparse
import json
from pathlib import Path

from headvis_core.errors import CorruptFileError, InputError


def read_prompt_file(path: str) -> tuple[list[str], list, list]:
    """Prompts from a prompt-set JSON (``prompts/`` format) or a text file with one prompt per line."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"No prompts file at {path}.")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() == ".json":
        try:
            prompts = json.loads(text)["prompts"]
            return ([p["text"] for p in prompts], [p.get("answer") for p in prompts],
                    [p.get("alternative") for p in prompts])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CorruptFileError(f"{file.name} is not a prompt set ({{\"prompts\": [{{\"text\": ...}}]}}): "
                                   f"{err}") from err
    lines = [line for line in text.splitlines() if line.strip()]
    return lines, [None] * len(lines), [None] * len(lines)


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


def _run(args: argparse.Namespace) -> int:
    from headvis_core.ablation.experiments import AblationExperiment, save_experiment
    from headvis_core.ablation.ranking import check_metric, rank_heads
    from headvis_core.ablation.targeted import targeted_search
    from headvis_core.ablation.values import make_ablation
    from headvis_core.cli.main import load_model_from_args
    from headvis_core.progress import tqdm_progress
    from headvis_core.tokens import single_token_id

    if args.mode == "targeted" and args.budget < 1:
        raise InputError("--budget must be at least 1 head.")
    loaded = load_model_from_args(args)
    model = loaded.model
    prompts = build_prompts(model, args)
    metric = args.metric or ("loss" if args.preset == "induction" else "kl")
    if args.mode == "kl":
        check_metric(metric, prompts)
    elif args.target:
        single_token_id(model, args.target)  # fail before any progress bar is drawn
    if prompts.skipped_names:
        print(f"IOI: skipped {len(prompts.skipped_names)} names that are not one token for this model: "
              f"{', '.join(prompts.skipped_names)}")
    ablation = make_ablation(model, args.kind, prompts)
    if args.mode == "kl":
        result = rank_heads(model, prompts, ablation, metric=metric, top_n=args.top, engine=args.engine,
                            progress=tqdm_progress("ablating heads"))
        print(f"{len(result.table)} heads ranked by {metric} ({args.kind} ablation, {len(prompts)} prompt(s)) "
              f"in {result.seconds:.1f} s")
        print(result.table.head(args.top).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    else:
        result = targeted_search(model, prompts, args.target or None, ablation, budget=args.budget,
                                 prune=not args.no_prune, engine=args.engine, progress=tqdm_progress("searching"))
        print(result.summary)
        print(result.trajectory.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    experiment = AblationExperiment(
        model=loaded.info.name, mode=args.mode, kind=args.kind, metric=metric if args.mode == "kl" else "margin",
        prompts=prompts.texts, result=result,
        settings={"preset": args.preset, "target": args.target, "budget": args.budget,
                  "n_prompts": len(prompts), "seed": args.seed})
    path = save_experiment(experiment, args.out)
    print(f"saved {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from headvis_core.ablation.runner import ENGINES
    from headvis_core.ablation.values import ABLATION_KINDS
    from headvis_core.cli.main import add_model_arguments

    parser = subparsers.add_parser(
        "ablate", help="ablate heads: KL ranking of all heads, or the heads that make a token the top prediction",
        description="Zero, mean or resample ablation of attention heads at hook_z.")
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="one prompt, scored at its last token")
    source.add_argument("--prompts", metavar="FILE", help="prompt-set JSON (prompts/ format) or one prompt per line")
    source.add_argument("--preset", choices=["ioi", "induction"], help="generated IOI or repeated-token prompts")
    parser.add_argument("--mode", choices=["kl", "targeted"], default="kl")
    parser.add_argument("--target", metavar="TOKEN", help="targeted mode: the token to make the top prediction "
                        "(one token, with its leading space: ' John')")
    parser.add_argument("--kind", choices=ABLATION_KINDS, default="zero")
    parser.add_argument("--metric", choices=["kl", "logit_diff", "loss"],
                        help="kl mode: what ranks the heads (default kl; loss for the induction preset)")
    parser.add_argument("--answer", metavar="TOKEN", help="target token of the logit difference")
    parser.add_argument("--alternative", metavar="TOKEN", help="alternative token of the logit difference")
    parser.add_argument("--corrupted", metavar="TEXT", help="corrupted prompt for resample ablation (same length)")
    parser.add_argument("--corrupted-prompts", metavar="FILE", help="corrupted prompts, one per prompt")
    parser.add_argument("--budget", type=int, default=10, help="targeted mode: most heads to ablate (default 10)")
    parser.add_argument("--no-prune", action="store_true", help="targeted mode: keep every head the search added")
    parser.add_argument("--n-prompts", type=int, default=8, help="presets: how many prompts (default 8)")
    parser.add_argument("--template", help="IOI preset: use only this template (needed for resample/mean ablation)")
    parser.add_argument("--half-len", type=int, default=20, help="induction preset: length of each copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=10, help="kl mode: heads to print (and prediction shifts kept)")
    parser.add_argument("--engine", choices=ENGINES, default="replay", help=argparse.SUPPRESS)
    parser.add_argument("--out", required=True, metavar="result.json", help="where to write the experiment JSON")
    parser.set_defaults(func=_run)
