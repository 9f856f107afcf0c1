"""``compare --model A --model B --out DIR``: two models' heads side by side, matched and compared.

Each model's head atlas is measured on the same probe text (the built-in
prompts, or ``--corpus FOLDER``) and kept in the result store, so comparing
again (or after ``atlas``) reads it back. The models are loaded one after the
other: only one is in memory at a time. Writes into DIR: ``report.html``
(standalone), ``heads.csv`` (both atlases), ``pairs.csv`` (matched heads),
``unmatched.csv``, ``depth.csv`` and, for two models of the same shape,
``deltas.csv``.
"""

import argparse

from headvis_core.cli.main import (
    add_cache_argument,
    check_output_dir,
    non_negative_int,
    positive_int,
    report_stored,
    text_argument,
)
from headvis_core.errors import InputError

OUTPUT_FILES = ("report.html", "heads.csv", "pairs.csv", "unmatched.csv", "depth.csv", "deltas.csv")


def _atlas_of(name: str, args: argparse.Namespace):
    """Load ``name`` and read or compute its atlas; the model goes when this returns."""
    from headvis_core.atlas.run import compute_atlas
    from headvis_core.limits import check_atlas_memory
    from headvis_core.models.loader import load_model
    from headvis_core.progress import tqdm_progress
    from headvis_core.store.kinds import ATLAS, atlas_inputs
    from headvis_core.store.results import cached

    loaded = load_model(name, device=args.device, dtype=args.dtype, progress=tqdm_progress(f"loading {name}"))
    check_atlas_memory(loaded.model, args.n_seqs, args.seq_len, None, 16)

    def compute():
        return compute_atlas(loaded.model, folder=args.corpus, n_seqs=args.n_seqs, seq_len=args.seq_len,
                             seed=args.seed, model_name=loaded.info.name, progress=tqdm_progress(f"atlas of {name}"))

    inputs = atlas_inputs(args.corpus, args.n_seqs, args.seq_len, None, args.seed)
    stored = cached(ATLAS, loaded, inputs, compute, refresh=args.no_cache)
    report_stored(stored, f"atlas of {name}")
    return stored.value


def _compare(args: argparse.Namespace) -> int:
    import gc

    from headvis_core.atlas.run import MIN_SEQ_LEN, corpus_files
    from headvis_core.compare.run import compare_atlases
    from headvis_core.storage import atomic_write_text
    from headvis_core.viz.compare import comparison_report_html

    models = args.model or []
    if len(models) != 2:
        raise InputError(f"compare needs exactly two models (--model A --model B); got {len(models)}.")
    if args.seq_len < MIN_SEQ_LEN:
        raise InputError(f"--seq-len {args.seq_len} is too short: use at least {MIN_SEQ_LEN} tokens.")
    out = check_output_dir(args.out, "--out")
    if args.corpus is not None:
        corpus_files(args.corpus)  # a bad folder fails before any model loads
    atlas_a = _atlas_of(models[0], args)
    gc.collect()  # model A is freed before model B loads
    atlas_b = _atlas_of(models[1], args)
    comparison = compare_atlases(atlas_a, atlas_b, models[0], models[1])
    matching = comparison.matching
    atomic_write_text(out / "heads.csv", comparison.heads_table().to_csv(index=False))
    atomic_write_text(out / "pairs.csv", matching.pairs.to_csv(index=False))
    atomic_write_text(out / "unmatched.csv", matching.unmatched.to_csv(index=False))
    atomic_write_text(out / "depth.csv", comparison.depth.to_csv(index=False))
    if comparison.deltas is not None:
        atomic_write_text(out / "deltas.csv", comparison.deltas.to_csv(index=False))
    elif (out / "deltas.csv").exists():
        (out / "deltas.csv").unlink()  # from an earlier same-shape comparison: it would not belong to this one
    atomic_write_text(out / "report.html", comparison_report_html(comparison))
    for line in comparison.summary():
        print(line)
    best = matching.pairs.head(5)
    print("closest pairs: " + ", ".join(f"A {int(r.layer_a)}.{int(r.head_a)} ~ B {int(r.layer_b)}.{int(r.head_b)} "
                                        f"({r.behaviour_a}/{r.behaviour_b}, {r.distance:.3f})"
                                        for r in best.itertuples()))
    written = [name for name in OUTPUT_FILES if (out / name).exists()]
    print(f"-> {out}: {', '.join(written)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help="compare two models head by head (atlases, matching, deltas)")
    parser.add_argument("--model", action="append", type=text_argument, metavar="NAME",
                        help="a model (short name, HF id or local directory); give it twice: --model A --model B")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", required=True, help="folder to write the report and the CSV files into")
    parser.add_argument("--corpus", metavar="FOLDER",
                        help="folder of text files to probe both models with (default: the built-in prompts)")
    parser.add_argument("--n-seqs", type=positive_int, default=64, help="probe sequences of real text (default 64)")
    parser.add_argument("--seq-len", type=positive_int, default=128, help="tokens per probe sequence (default 128)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    add_cache_argument(parser)
    parser.set_defaults(func=_compare)
