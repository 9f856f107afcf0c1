"""``atlas --model NAME --out metrics.csv [--report report.html]``: every head's metrics and behaviour."""

import argparse
from pathlib import Path


def _atlas(args: argparse.Namespace) -> int:
    from headvis_core.atlas.run import compute_atlas, corpus_files, top_heads
    from headvis_core.cli.main import load_model_from_args
    from headvis_core.progress import tqdm_progress
    from headvis_core.storage import atomic_write_text

    if args.corpus is not None:
        corpus_files(args.corpus)  # a bad folder fails before the model loads
    loaded = load_model_from_args(args)
    result = compute_atlas(loaded.model, folder=args.corpus, n_seqs=args.n_seqs, seq_len=args.seq_len,
                           n_induction_seqs=args.n_induction_seqs, batch_size=args.batch_size, seed=args.seed,
                           model_name=loaded.info.name, progress=tqdm_progress("head atlas"))
    for note in result.notes:
        print(f"note: {note}")
    atomic_write_text(Path(args.out), result.table.to_csv(index=False))
    print(f"{len(result.table)} heads of {loaded.info.name} -> {args.out} ({result.seconds:.1f} s; probe: "
          f"{result.probe})")
    if args.report:
        from headvis_core.viz.atlas_report import atlas_report_html

        atomic_write_text(Path(args.report), atlas_report_html(result))
        print(f"report -> {args.report}")
    for metric in ("induction", "previous_token"):
        best = ", ".join(f"{int(r.layer)}.{int(r['head'])} ({r[metric]:.3f})"
                         for _, r in top_heads(result.table, metric).iterrows())
        print(f"top {metric}: {best}")
    counts = result.table.behaviour.value_counts()
    print("behaviours: " + ", ".join(f"{name} {count}" for name, count in counts.items()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from headvis_core.cli.main import add_model_arguments

    parser = subparsers.add_parser("atlas", help="per-head metrics and behaviours of every head (CSV, HTML report)")
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="CSV file to write: one row per head")
    parser.add_argument("--report", help="also write a standalone HTML report here")
    parser.add_argument("--corpus", metavar="FOLDER",
                        help="folder of text files to probe with (default: the built-in prompt sample)")
    parser.add_argument("--n-seqs", type=int, default=64, help="probe sequences of real text (default 64)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per probe sequence (default 128)")
    parser.add_argument("--n-induction-seqs", type=int, default=None,
                        help="repeated-random-token sequences for the induction score (default n-seqs / 4)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_atlas)
