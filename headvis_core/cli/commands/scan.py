"""``scan --model NAME --corpus PATH --out DIR``: a dataset scan of every head (see :mod:`headvis_core.scan.run`)."""

import argparse
import time

from headvis_core.cli.main import (
    add_model_arguments,
    check_output_dir,
    check_ray_arguments,
    int_at_least,
    load_model_from_args,
    non_negative_int,
    open_corpus_arg,
    positive_int,
)


def _show_head(result, spec: str, n_examples: int) -> None:
    from headvis_core.heads import parse_head
    from headvis_core.tokens import visible

    head = parse_head(spec, result.n_layers, result.n_heads)
    print(f"\nhead {head}: decile examples (score = max attention outside position 0; [query <- key])")
    for bucket in result.deciles(head):
        print(f"  decile {bucket.decile:>2}: {bucket.n_windows} windows, scores {bucket.low:.3f}-{bucket.high:.3f}")
        for ex in bucket.examples[:n_examples]:
            query, key = visible(ex.str_tokens[ex.max_query]), visible(ex.str_tokens[ex.max_key])
            print(f"      {ex.score:.3f} [{ex.max_query}:{query!r} <- {ex.max_key}:{key!r}] {visible(ex.text)[:110]}")
    distances = result.distance_histogram(head)
    top = distances.argsort()[::-1][:5]
    print("  attention by distance: " + ", ".join(f"{d}: {distances[d]:.2f}" for d in top))
    for role in ("query", "key"):
        table = result.top_tokens(head, role, n=8)
        print(f"  top {role} tokens: " + ", ".join(f"{visible(t)!r} {m:.2f}" for t, m in
                                                  zip(table["token"], table["mean_attention"])))


def _run(args: argparse.Namespace) -> int:
    from headvis_core.limits import check_scan_memory
    from headvis_core.progress import tqdm_progress
    from headvis_core.scan import ScanParams, run_scan

    check_ray_arguments(args)  # before anything is written or loaded
    out_dir = check_output_dir(args.out, "--out")
    corpus = open_corpus_arg(args.corpus, text_field=args.text_field)  # before loading the model: fail fast
    for skipped in corpus.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}")
    params = ScanParams(window_len=args.window, max_windows=args.max_windows or None,
                        examples_per_decile=args.examples, top_examples=args.top_examples,
                        top_k_keys=args.top_k, seed=args.seed, shard_windows=args.shard_windows,
                        token_capacity=args.token_capacity)
    loaded = load_model_from_args(args)
    params.check(loaded.info.n_ctx)
    check_scan_memory(loaded.model, params.window_len, args.batch_size, args.max_windows)
    started = time.time()
    if args.ray is not None:
        from headvis_core.ray_jobs import STALL_SECONDS
        from headvis_core.scan.distributed import run_sharded_scan

        result = run_sharded_scan(loaded, corpus, params, workers=args.workers, address=args.ray, out_dir=out_dir,
                                  batch_size=args.batch_size, progress=tqdm_progress("scanning"), force=args.force,
                                  stall_seconds=args.stall_seconds or STALL_SECONDS)
    else:
        result = run_scan(loaded, corpus, params, out_dir=out_dir,
                          batch_size=args.batch_size, progress=tqdm_progress("scanning"), force=args.force)
    seconds = time.time() - started
    n_tokens = result.n_windows * params.window_len
    print(f"{result.n_windows} windows ({n_tokens} tokens) of {corpus.description}")
    resumed = result.meta.get("resumed_from", 0)
    print(f"stored in {result.path}" + (f" (resumed after {resumed} windows)" if resumed else "")
          + f"; {seconds:.1f} s this run")
    summary = result.head_summary().sort_values("top_decile_from", ascending=False)
    print("heads with the sharpest top decile: " + ", ".join(
        f"{n} ({v:.2f}, distance {d})" for n, v, d in zip(summary["name"][:8], summary["top_decile_from"][:8],
                                                          summary["mode_distance"][:8])))
    for spec in args.show or []:
        _show_head(result, spec, args.show_examples)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("scan",
                                   help="scan a corpus: each head's top windows by decile, top tokens, distances")
    add_model_arguments(parser)
    parser.add_argument("--corpus", required=True,
                        help="a folder of .txt files, a .txt or .jsonl file (field 'text'), or a HF dataset name")
    parser.add_argument("--out", default=None, help="folder for results (default: the per-user scans folder)")
    parser.add_argument("--window", type=int_at_least(2, "--window"), default=64,
                        help="tokens per window (default 64)")
    parser.add_argument("--max-windows", type=non_negative_int, default=1000,
                        help="stop after this many windows; 0 = all")
    parser.add_argument("--examples", type=positive_int, default=4,
                        help="example windows kept per decile (default 4)")
    parser.add_argument("--top-examples", type=positive_int, default=8,
                        help="exact top windows kept per head (default 8)")
    parser.add_argument("--top-k", type=positive_int, default=4, help="keys kept per query of an example (default 4)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the example sample")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")
    parser.add_argument("--force", action="store_true", help="recompute even if a result is stored")
    parser.add_argument("--ray", metavar="auto|ADDRESS", default=None,
                        help="scan the shards on a Ray cluster: 'auto' (a running one, else a local one) or its "
                             "address; the result equals the one-process scan's (needs pip install ray==2.60.0)")
    parser.add_argument("--workers", type=positive_int, default=2, help="Ray workers with --ray (default 2)")
    parser.add_argument("--stall-seconds", type=int_at_least(1, "--stall-seconds"), default=None,
                        help="with --ray: a worker that reports no progress for this long is replaced and its shards "
                             "run again (default 1800)")
    parser.add_argument("--token-capacity", type=positive_int, default=1024,
                        help="tokens counted exactly per head for the top query/key tokens; beyond it the "
                             "averages carry an error bound (default 1024)")
    parser.add_argument("--shard-windows", type=positive_int, default=256,
                        help="windows per shard, the unit of work and of resuming (default 256)")
    parser.add_argument("--show", action="append", metavar="LAYER.HEAD",
                        help="print this head's deciles (repeatable)")
    parser.add_argument("--show-examples", type=non_negative_int, default=2,
                        help="examples printed per decile with --show")
    parser.set_defaults(func=_run)
