"""``python -m headvis_core``: one subcommand per capability.

Each module in :mod:`headvis_core.cli.commands` defines ``register(subparsers)``,
which adds its subcommand and sets ``func`` (called with the parsed
arguments, returning an exit status). A :class:`HeadVisError` is printed as
``error: ...`` with exit status 2, never as a traceback.
"""

import argparse
import importlib
import pkgutil
import sys
from typing import Optional, Sequence

from headvis_core.cli import commands
from headvis_core.errors import HeadVisError
from headvis_core.models.registry import DEFAULT_MODEL


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--model/--device/--dtype`` options every model-using subcommand shares."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"short name, HF id or local directory (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def load_model_from_args(args: argparse.Namespace):
    from headvis_core.models.loader import load_model
    from headvis_core.progress import tqdm_progress

    return load_model(args.model, device=args.device, dtype=args.dtype, progress=tqdm_progress("loading model"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m headvis_core",
                                     description="HeadVis Workbench: what attention heads do, from the command line.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HeadVisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    """The ``headvis`` console script: the same as ``python -m headvis_core``."""
    sys.exit(main())
