"""``export-headvis --scan DIR --out DATA_DIR``: a stored scan as the HeadVis frontend's static ``data/`` tree.

``--pca`` first computes the Q/K/V/O projections of every head (needs the
scan's model) and stores them with the scan, so the tree gets ``umap/``.
``--atlas FILE.csv`` (the CSV that ``headvis_core atlas --out`` writes for the
scan's model) adds the atlas metrics to ``scatter_data.json``. ``--umap`` adds
a UMAP view per kind next to the PCA (needs umap-learn; implies ``--pca``).
``--check DATA_DIR`` validates an existing tree (ours or Neuronpedia's) against
the contract, prints what the Dataset examples page would read from it and
lists the warnings (what the frontend would log or leave out); a tree with
errors is refused.
"""

import argparse
from pathlib import Path

from headvis_core.cli.main import check_output_dir, finite_float, positive_int, text_argument
from headvis_core.errors import CorruptFileError, InputError

MAX_WARNINGS = 10


def _check(raw: str) -> int:
    from headvis_core.headvis_format.importer import import_headvis

    tree = import_headvis(Path(raw))
    n_sequences = sum(len(tree.head_data(_head(pair))["sequences"]) for pair in tree.config["heads"])
    print(f"{raw}: valid HeadVis data for {tree.meta['model']['name']}: {len(tree.config['heads'])} heads, "
          f"{tree.n_intervals} intervals, {n_sequences} sequences, umap: {bool(tree.config.get('has_umap'))}")
    for warning in tree.warnings[:MAX_WARNINGS]:
        print(f"warning: {warning}")
    if len(tree.warnings) > MAX_WARNINGS:
        print(f"... and {len(tree.warnings) - MAX_WARNINGS} more warnings")
    return 0


def _head(pair):
    from headvis_core.heads import HeadRef

    return HeadRef(int(pair[0]), int(pair[1]))


def _read_atlas(raw: str):
    """The atlas CSV as a table (a read or parse failure is the user's input error, checked before any work)."""
    import pandas as pd

    path = Path(raw).expanduser()
    if not path.is_file():
        raise InputError(f"--atlas {raw!r} is not a file; give the CSV that `headvis_core atlas --out` writes.")
    try:
        return pd.read_csv(path, encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"--atlas {raw!r} cannot be read as a CSV table ({err}).") from None


def _project(args: argparse.Namespace, scan) -> None:
    from headvis_core.models.loader import load_model
    from headvis_core.progress import tqdm_progress
    from headvis_core.projections.run import ProjectionParams, project_scan

    params = ProjectionParams(max_pairs=args.pca_pairs, max_windows=args.pca_windows, umap=args.umap,
                              seed=args.seed)
    params.check()
    name = args.model or scan.meta["model"]["name"]
    loaded = load_model(name, device=args.device, dtype=args.dtype, progress=tqdm_progress("loading model"))
    projections = project_scan(loaded, scan, params, progress=tqdm_progress("projections"))
    for head, reason in projections.skipped.items():
        print(f"head {head}: no projection ({reason})")


def _run(args: argparse.Namespace) -> int:
    from headvis_core.headvis_format import contract
    from headvis_core.headvis_format.export import ExportOptions, atlas_table, check_destination, export_headvis
    from headvis_core.progress import tqdm_progress
    from headvis_core.scan import load_scan

    if args.check:
        return _check(args.check)
    if not args.scan or not args.out:
        raise InputError("Give --scan DIR and --out DATA_DIR (or --check DATA_DIR).")
    scan_dir = Path(args.scan).expanduser()
    if contract.is_tree(scan_dir):
        raise InputError(f"{args.scan} is already HeadVis data; --check validates it.")
    if not scan_dir.is_dir():
        raise InputError(f"--scan {args.scan!r} is not a folder holding a stored scan.")
    options = ExportOptions(keys_per_query=args.keys_per_query, threshold=args.threshold)
    options.check()
    out = Path(args.out).expanduser()
    check_destination(out, args.force)  # before any work
    atlas = _read_atlas(args.atlas) if args.atlas else None
    if args.umap:
        from headvis_core.projections.umap_fit import require_umap

        require_umap()
    try:
        scan = load_scan(scan_dir)
    except CorruptFileError as err:
        raise InputError(f"--scan {args.scan!r}: {err}") from None
    if scan.stale_note:  # exported without the HeadVis statistics' scatter columns
        print(f"note: {scan.stale_note}")
    if atlas is not None:
        try:
            atlas_table(scan, atlas)  # the atlas must be this model's: refused before any work
        except InputError as err:
            raise InputError(f"--atlas {args.atlas!r}: {err}") from None
    check_output_dir(args.out, "--out")  # not a system folder, and writable (this makes the folder)
    if args.pca or args.umap:
        _project(args, scan)
    summary = export_headvis(scan, out, force=args.force, options=options, progress=tqdm_progress("exporting"),
                             atlas=atlas)
    print(f"wrote {summary.folder}: {summary.n_heads} heads, {summary.n_files} files, "
          f"{summary.n_bytes / 1e6:.2f} MB in {summary.seconds:.1f} s (checked against the HeadVis contract)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export-headvis",
                                   help="write a stored scan as the HeadVis frontend's data/ tree (or --check one)")
    parser.add_argument("--scan", type=text_argument, help="a stored scan folder (from the scan command)")
    parser.add_argument("--out", type=text_argument, help="the data/ folder to write (must be empty, or --force)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing HeadVis data folder (any other non-empty folder is refused)")
    parser.add_argument("--check", type=text_argument, metavar="DATA_DIR",
                        help="only validate an existing HeadVis data/ tree against the contract")
    parser.add_argument("--keys-per-query", type=positive_int, default=5,
                        help="attention entries kept per query of a sequence (default 5)")
    parser.add_argument("--threshold", type=finite_float, default=0.01,
                        help="smallest attention weight kept (default 0.01)")
    parser.add_argument("--pca", action="store_true",
                        help="first compute each head's Q/K/V/O projections (loads the scan's model) for umap/")
    parser.add_argument("--umap", action="store_true",
                        help="also a UMAP view of each kind next to the PCA (umap-learn; implies --pca)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the UMAP layout (default 0)")
    parser.add_argument("--atlas", type=text_argument, metavar="FILE.csv",
                        help="add the metrics of this atlas CSV (headvis_core atlas --out, same model) to the "
                             "scatter")
    parser.add_argument("--pca-pairs", type=positive_int, default=1000, help="top pairs per head (default 1000)")
    parser.add_argument("--pca-windows", type=positive_int, default=128,
                        help="scan windows run again for the projections (default 128)")
    parser.add_argument("--model", type=text_argument, default=None,
                        help="model for --pca (default: the scan's model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (for --pca)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.set_defaults(func=_run)
