"""``tour``: run a circuit tour on a model and export it as a Jupyter notebook or a standalone HTML page.

    python -m headvis_core tour --model smollm2-135m --tour induction --out induction.html
    python -m headvis_core tour --model smollm2-135m --tour ioi --out ioi.ipynb

The HTML page runs every step (each through the result store: a second run is
instant, ``--no-cache`` recomputes) and holds the figures; the notebook holds
one code cell per step calling headvis_core, to be run and changed in Jupyter
(with ``--run`` the steps are also computed now and their sentences printed).
"""

import argparse

from headvis_core.cli.main import (
    add_cache_argument,
    add_model_arguments,
    check_output_file,
    load_model_from_args,
)

EXPORT_SUFFIXES = (".ipynb", ".html")


def _run(args: argparse.Namespace) -> int:
    from headvis_core.progress import tqdm_progress
    from headvis_core.tours.base import run_tour
    from headvis_core.tours.catalog import get_tour
    from headvis_core.tours.export import write_export

    tour = get_tour(args.tour)
    out = check_output_file(args.out, "--out", suffixes=EXPORT_SUFFIXES)
    loaded = load_model_from_args(args)
    name = loaded.info.name
    results = []
    if out.suffix.lower() == ".html" or args.run:
        results = run_tour(loaded.model, tour, model_name=name, refresh=args.no_cache, loaded=loaded,
                           progress=tqdm_progress(f"{tour.title} tour"))
        for number, (step, result) in enumerate(zip(tour.steps, results), start=1):
            where = "stored" if result.from_store else f"{result.seconds:.1f} s"
            mark = "" if result.convincing else "  [nothing convincing]"
            print(f"{number}. {step.title} ({where}){mark}\n   {result.sentence}")
            for note in result.notes:
                print(f"   note: {note}")
    path = write_export(out, tour, name, results)
    print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from headvis_core.tours.catalog import TOURS

    parser = subparsers.add_parser(
        "tour", help="run a circuit tour (induction, IOI, greater-than) and export it (notebook or HTML)",
        description="A teaching tour of a classic circuit, found live on the model: each step's computation, "
                    "figure and a sentence written from its result.")
    add_model_arguments(parser)
    parser.add_argument("--tour", required=True, choices=list(TOURS), help="which tour")
    parser.add_argument("--out", required=True, help="output file: .ipynb (a notebook) or .html (a page)")
    parser.add_argument("--run", action="store_true", help="with .ipynb: also run the steps now and print them")
    add_cache_argument(parser)
    parser.set_defaults(func=_run)
