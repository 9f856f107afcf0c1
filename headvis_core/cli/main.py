"""``python -m headvis_core``: one subcommand per capability.

Each module in :mod:`headvis_core.cli.commands` defines ``register(subparsers)``,
which adds its subcommand and sets ``func`` (called with the parsed
arguments, returning an exit status). A :class:`HeadVisError` is printed as
``error: ...`` with exit status 2, never as a traceback; so is an argument
argparse refuses.

Inputs are checked at the boundary, so the core functions can trust them:
the argument types below refuse zero or negative counts, NaN and infinite
numbers, and text that is not text; :func:`check_output_file` and
:func:`check_output_dir` check (and create the folders of) an output path
before any work is done, so a result is never computed only to be lost.
"""

import argparse
import contextlib
import importlib
import math
import os
import pkgutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional, Sequence

from headvis_core.cli import commands
from headvis_core.data.corpus import SYSTEM_FOLDERS, open_corpus
from headvis_core.errors import HeadVisError, InputError
from headvis_core.models.registry import DEFAULT_MODEL

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors read ``error: ...`` like every other user error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


# ---------------------------------------------------------------------------------------------
# Argument types: each refuses what the core function must never see


def int_at_least(minimum: int, what: str = "") -> Callable[[str], int]:
    """An argparse type for whole numbers ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            needed = "a positive whole number" if minimum == 1 else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{value} is too small: {what or 'it'} must be {needed}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def finite_float(text: str) -> float:
    """An argparse type for a real number (refuses nan and inf)."""
    try:
        value = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


finite_float.__name__ = "number"


def text_argument(text: str) -> str:
    """An argparse type for text: bytes that are not UTF-8 are decoded like a file (:mod:`headvis_core.data.text`)."""
    from headvis_core.data.text import argument_text

    try:
        return argument_text(text, "the text")
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


text_argument.__name__ = "text"


# ---------------------------------------------------------------------------------------------
# Output paths, checked before any work


def _refuse_system_path(path: Path, raw: str, option: str) -> None:
    resolved = path.resolve()
    if any(resolved == Path(folder) or resolved.is_relative_to(folder) for folder in SYSTEM_FOLDERS):
        raise InputError(f"{option} {raw!r} is in a system folder ({resolved.parts[1]}); write the result "
                         "somewhere in your own folders.")


def _probe_writable(folder: Path, raw: str, option: str) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".headvis-write-check-"):
            pass
    except OSError as err:
        raise InputError(f"{option} {raw!r}: cannot write into the folder {str(folder)!r} "
                         f"({err.strerror or err}).") from None


def _make_folder(folder: Path, raw: str, option: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{option} {raw!r}: {str(folder)!r} is a file, so no folder can be made there.") from None
    except OSError as err:
        raise InputError(f"{option} {raw!r}: cannot make the folder {str(folder)!r} "
                         f"({err.strerror or err}).") from None


def check_output_file(raw: Optional[str], option: str = "--out",
                      suffixes: Optional[Sequence[str]] = None) -> Optional[Path]:
    """The path to write a result file to, checked and its folder made before any work (None stays None).

    Refuses an empty name, an existing folder, a system folder (``/proc``, ``/sys``,
    ``/dev``), a name without one of ``suffixes``, and a folder that cannot be written.
    """
    if raw is None:
        return None
    text = raw.strip()
    if not text:
        raise InputError(f"{option} is empty: give a file name.")
    path = Path(text).expanduser()
    _refuse_system_path(path, raw, option)
    if path.is_dir():
        raise InputError(f"{option} {raw!r} is a folder: give a file name, for example "
                         f"{str(path / ('result' + (suffixes[0] if suffixes else '')))!r}.")
    if suffixes and path.suffix.lower() not in suffixes:
        raise InputError(f"{option} {raw!r}: give a file ending in {', '.join(suffixes)}.")
    folder = path.resolve().parent
    _make_folder(folder, raw, option)
    _probe_writable(folder, raw, option)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{option} {raw!r} exists and cannot be overwritten.")
    return path


def check_output_dir(raw: Optional[str], option: str = "--out") -> Optional[Path]:
    """A folder to write results into, made (with its parents) and checked before any work."""
    if raw is None:
        return None
    text = raw.strip()
    if not text:
        raise InputError(f"{option} is empty: give a folder.")
    path = Path(text).expanduser()
    _refuse_system_path(path, raw, option)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {raw!r} is a file: give a folder for the results.")
    _make_folder(path, raw, option)
    _probe_writable(path, raw, option)
    return path


@contextlib.contextmanager
def corpus_read_errors(spec: str) -> Iterator[None]:
    """A corpus folder that cannot be read (permissions, a vanished file) is an error message."""
    try:
        yield
    except OSError as err:
        raise InputError(f"Cannot read the corpus {spec!r}: {err.strerror or err}"
                         + (f" ({err.filename})" if err.filename else "") + ".") from None


def open_corpus_arg(spec: str, text_field: str = "text"):
    """``open_corpus`` for a corpus the user named (it refuses ``/`` and the system folders itself)."""
    with corpus_read_errors(spec):
        return open_corpus(spec, text_field=text_field)


# ---------------------------------------------------------------------------------------------
# Shared options


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--model/--device/--dtype`` options every model-using subcommand shares."""
    parser.add_argument("--model", default=DEFAULT_MODEL, type=text_argument,
                        help=f"short name, HF id or local directory (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    placement = parser.add_argument_group("splitting a model across devices (instead of --device)")
    placement.add_argument("--device-map", default=None, type=text_argument,
                           help="auto, balanced, balanced_low_0, sequential, or a JSON object of module -> device "
                                "such as '{\"model.embed_tokens\": 0, \"model.layers\": 1, \"model.norm\": 1, "
                                "\"lm_head\": 0}'")
    placement.add_argument("--n-devices", default=None, type=int_at_least(1, "--n-devices"),
                           help="split the model evenly over this many CUDA GPUs")
    placement.add_argument("--max-memory", default=None, type=text_argument,
                           help='per-device budgets for a strategy or --n-devices, as JSON: \'{"0": "20GiB", '
                                '"1": "20GiB"}\'')


def add_cache_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-cache``: recompute even where the result store holds the result."""
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute even if the result store holds this result (and store the new one)")


def load_model_from_args(args: argparse.Namespace):
    from headvis_core.models.loader import load_model
    from headvis_core.progress import tqdm_progress

    placement = placement_from_args(args)  # refused here, before the progress bar starts
    try:
        return load_model(args.model, device=None if placement["device_map"] else args.device, dtype=args.dtype,
                          progress=tqdm_progress("loading model"), **placement)
    except HeadVisError:
        print(file=sys.stderr)  # end the progress bar's line, so the message starts its own
        raise


def placement_from_args(args: argparse.Namespace) -> dict:
    """``device_map``/``n_devices``/``max_memory`` for ``load_model`` from the shared model options, checked.

    ``--device`` keeps its default (auto) beside ``--device-map``; only a device the user typed conflicts.
    """
    from headvis_core.models.devices import parse_device_map, parse_max_memory, resolve_placement

    if getattr(args, "device_map", None) and args.device not in (None, "", "auto"):
        raise InputError(f"Give --device or --device-map, not both: --device {args.device} puts the whole model on "
                         "one device, --device-map splits it.")
    placement = {"device_map": parse_device_map(getattr(args, "device_map", None), "--device-map"),
                 "n_devices": getattr(args, "n_devices", None),
                 "max_memory": parse_max_memory(getattr(args, "max_memory", None), "--max-memory")}
    resolve_placement(None if placement["device_map"] else args.device, **placement)
    return placement


def check_ray_arguments(args: argparse.Namespace) -> None:
    """``--ray``: Ray installed, a well-formed address, and no placement option (each worker loads its own copy
    on one device, so a ``--device-map``/``--n-devices``/``--max-memory`` split would be silently ignored)."""
    if args.ray is None:
        return
    from headvis_core.ray_jobs import INSTALL_HINT, check_address, ray_available

    if not ray_available():
        raise InputError(f"--ray needs Ray: {INSTALL_HINT}")
    check_address(args.ray)
    split = [option for option, name in (("--device-map", "device_map"), ("--n-devices", "n_devices"),
                                         ("--max-memory", "max_memory")) if getattr(args, name, None)]
    if split:
        raise InputError(f"{', '.join(split)} cannot be used with --ray: each Ray worker loads the whole model on "
                         "one device (one GPU per worker when the cluster has GPUs).")


def report_stored(stored, what: str) -> None:
    """Say where a result came from (the store, or computed now) and print the store's notes."""
    for note in stored.notes:
        print(f"note: {note}")
    if stored.from_store:
        print(f"{what}: from the result store, computed at {stored.computed_at_text} "
              f"(took {stored.compute_seconds:.1f} s then; --no-cache recomputes)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m headvis_core",
                    description="HeadVis Workbench: what attention heads do, from the command line.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exited:  # --help (0) or an argument refused (2): a status, also for in-process callers
        return int(exited.code or 0) if not isinstance(exited.code, str) else EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except HeadVisError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        print("error: ran out of memory. Use fewer or shorter sequences, a smaller batch, or lower "
              "HEADVIS_MEMORY_CAP_GB so that such requests are refused before they start.", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (| head): quiet, as the docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def entry_point() -> None:
    """The ``headvis`` console script: the same as ``python -m headvis_core``."""
    sys.exit(main())
