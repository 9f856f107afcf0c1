"""``atlas --model NAME --out metrics.csv [--report report.html]``: every head's metrics and behaviour.

The result goes into the result store: the same atlas asked for again (same
model weights, probe and sizes) is read back at once; ``--no-cache`` recomputes.
``--ray auto|ADDRESS --workers N`` runs the real text's shards on Ray workers
(:mod:`headvis_core.atlas.distributed`; no more workers than shards, nor than the
cluster holds); the table is the one-process atlas's, so both share one stored
result (the batch size and ``--shard-seqs`` are in its key: they fix the shards).
"""

import argparse

from headvis_core.cli.main import (
    add_cache_argument,
    add_model_arguments,
    check_output_file,
    check_ray_arguments,
    corpus_read_errors,
    int_at_least,
    load_model_from_args,
    non_negative_int,
    positive_int,
    report_stored,
)


def _atlas(args: argparse.Namespace) -> int:
    from headvis_core.atlas.metrics import DEFAULT_SHARD_SEQUENCES
    from headvis_core.atlas.run import MIN_SEQ_LEN, compute_atlas, corpus_files, top_heads
    from headvis_core.errors import InputError
    from headvis_core.limits import check_atlas_memory
    from headvis_core.progress import tqdm_progress
    from headvis_core.storage import atomic_write_text
    from headvis_core.store.kinds import ATLAS, ATLAS_BATCH_SIZE, atlas_inputs, atlas_link
    from headvis_core.store.results import cached

    if args.seq_len < MIN_SEQ_LEN:
        raise InputError(f"--seq-len {args.seq_len} is too short: use at least {MIN_SEQ_LEN} tokens.")
    out = check_output_file(args.out, "--out")
    report_path = check_output_file(args.report, "--report")
    retrieval_prompts = None
    if args.retrieval_prompts is not None:  # a bad prompt file fails before the model loads
        from headvis_core.atlas.retrieval import load_retrieval_prompts

        retrieval_prompts = load_retrieval_prompts(args.retrieval_prompts)
    if args.corpus is not None:  # a bad folder fails before the model loads
        with corpus_read_errors(args.corpus):
            corpus_files(args.corpus)
    check_ray_arguments(args)  # so does Ray missing, a bad cluster address or a placement with --ray
    loaded = load_model_from_args(args)
    check_atlas_memory(loaded.model, args.n_seqs, args.seq_len, args.n_induction_seqs, args.batch_size)
    shard_sequences = args.shard_seqs or DEFAULT_SHARD_SEQUENCES
    text_shards = None
    if args.ray is not None:
        from headvis_core.atlas.distributed import RayTextShards
        from headvis_core.ray_jobs import STALL_SECONDS

        text_shards = RayTextShards(loaded, workers=args.workers, address=args.ray,
                                    stall_seconds=args.stall_seconds or STALL_SECONDS)

    def compute():
        return compute_atlas(loaded.model, folder=args.corpus, n_seqs=args.n_seqs, seq_len=args.seq_len,
                             n_induction_seqs=args.n_induction_seqs, batch_size=args.batch_size, seed=args.seed,
                             model_name=loaded.info.name, retrieval_prompts=retrieval_prompts,
                             progress=tqdm_progress("head atlas"), shard_sequences=shard_sequences,
                             text_shards=text_shards)

    inputs = atlas_inputs(args.corpus, args.n_seqs, args.seq_len, args.n_induction_seqs, args.seed,
                          batch_size=args.batch_size, shard_sequences=shard_sequences)
    if retrieval_prompts is not None:  # the user's prompts and spans are part of what the atlas was computed on
        inputs["retrieval_prompts"] = [[p.text, p.span] for p in retrieval_prompts]
    # the page computes with the default induction set and seed: only then does its URL reopen this atlas
    page_settings = (args.n_induction_seqs is None and args.seed == 0 and retrieval_prompts is None
                     and shard_sequences == DEFAULT_SHARD_SEQUENCES and args.batch_size == ATLAS_BATCH_SIZE)
    link = atlas_link(args.corpus, args.n_seqs, args.seq_len) if page_settings else None
    stored = cached(ATLAS, loaded, inputs, compute, refresh=args.no_cache, link=link)
    report_stored(stored, "atlas")
    if text_shards is not None and text_shards.stats:
        stats = text_shards.stats
        for note in text_shards.notes:
            print(f"note: {note}")
        retried = f", {stats['shard_runs'] - stats['shards']} shard run(s) repeated" * (
            stats["shard_runs"] > stats["shards"])
        print(f"real text: {stats['shards']} shards on {stats['workers']} Ray workers in {stats['text_seconds']:.1f} "
              f"s (workers started in {stats['worker_start_seconds']:.1f} s{retried})")
    result = stored.value
    for note in result.notes:
        print(f"note: {note}")
    atomic_write_text(out, result.table.to_csv(index=False))
    print(f"{len(result.table)} heads of {loaded.info.name} -> {args.out} ({result.seconds:.1f} s; probe: "
          f"{result.probe})")
    if report_path:
        from headvis_core.viz.atlas_report import atlas_report_html

        atomic_write_text(report_path, atlas_report_html(result))
        print(f"report -> {args.report}")
    for metric in ("induction", "previous_token", "direct_copying", "retrieval"):
        best = ", ".join(f"{int(r.layer)}.{int(r['head'])} ({r[metric]:.3f})"
                         for _, r in top_heads(result.table, metric).iterrows())
        print(f"top {metric}: {best}")
    counts = result.table.behaviour.value_counts()
    print("behaviours: " + ", ".join(f"{name} {count}" for name, count in counts.items()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("atlas", help="per-head metrics and behaviours of every head (CSV, HTML report)")
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="CSV file to write: one row per head")
    parser.add_argument("--report", help="also write a standalone HTML report here")
    parser.add_argument("--corpus", metavar="FOLDER",
                        help="folder of text files to probe with (default: the built-in prompt sample)")
    parser.add_argument("--n-seqs", type=positive_int, default=64, help="probe sequences of real text (default 64)")
    parser.add_argument("--seq-len", type=positive_int, default=128,
                        help="tokens per probe sequence (default 128)")
    parser.add_argument("--n-induction-seqs", type=positive_int, default=None,
                        help="repeated-random-token sequences for the induction score (default n-seqs / 4)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--retrieval-prompts", metavar="FILE",
                        help="factual prompts with entity spans for the retrieval score: a text file with one prompt "
                             "per line and the span in brackets ('The [Eiffel Tower] is located in the city of'), "
                             "or JSON like prompts/retrieval.json (default: that file)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--ray", metavar="auto|ADDRESS", default=None,
                        help="run the real text's shards on a Ray cluster: 'auto' (a running one, else a local one) "
                             "or its address; the table equals the one-process atlas's (needs pip install ray==2.60.0)")
    parser.add_argument("--workers", type=int_at_least(1, "--workers"), default=2,
                        help="Ray workers with --ray (default 2)")
    parser.add_argument("--shard-seqs", type=int_at_least(1, "--shard-seqs"), default=None,
                        help="real-text sequences per shard, the unit of work on Ray (default 64); the same value "
                             "gives the same table in one process and on Ray")
    parser.add_argument("--stall-seconds", type=int_at_least(1, "--stall-seconds"), default=None,
                        help="with --ray: a worker that reports no progress for this long is replaced and its shards "
                             "run again (default 1800)")
    add_cache_argument(parser)
    parser.set_defaults(func=_atlas)
