"""``graph``: the circuit graph of composition edges, written as GraphML, JSON or HTML.

    python -m headvis_core graph --model smollm2-135m --kinds k --threshold 2.5 --out graph.html

Composition scores, embedding/unembedding scores and path-patching results go
into the result store, so the same graph asked for again is drawn at once
(``--no-cache`` recomputes).
"""

import argparse

from headvis_core.cli.main import (
    add_cache_argument,
    add_model_arguments,
    check_output_file,
    finite_float,
    load_model_from_args,
    non_negative_int,
    positive_int,
    report_stored,
)

GRAPH_SUFFIXES = (".graphml", ".json", ".html")


def _run(args: argparse.Namespace) -> int:
    from headvis_core.circuits.composition import (
        check_composable,
        compute_composition,
        head_weights,
        io_scores,
        parse_kinds,
    )
    from headvis_core.circuits.graph import GraphFilter, all_edges, build_graph, edges_frame
    from headvis_core.circuits.published_roles import published_roles_for
    from headvis_core.heads import parse_heads
    from headvis_core.progress import tqdm_progress
    from headvis_core.store.kinds import (
        COMPOSITION,
        IO_SCORES,
        PATH_PATCHING,
        composition_inputs,
        io_inputs,
        path_patching_inputs,
    )
    from headvis_core.store.results import cached
    from headvis_core.viz.circuit_graph import save_graph

    kinds = parse_kinds(args.kinds)
    out = check_output_file(args.out, "--out", suffixes=GRAPH_SUFFIXES) if args.out else None
    loaded = load_model_from_args(args)
    info = loaded.info
    check_composable(info.n_layers)
    heads = tuple(parse_heads(args.heads, info.n_layers, info.n_heads)) if args.heads else ()
    pairs = None
    if args.patch_ioi:  # before the long part, so that a model IOI cannot use fails at once
        from headvis_core.data.prompt_pairs import ioi_prompts

        pairs = ioi_prompts(loaded.model, args.patch_ioi, seed=0)
    fold_ln = not args.no_fold_ln
    stored = cached(COMPOSITION, loaded, composition_inputs(kinds, fold_ln),
                    lambda: compute_composition(loaded.model, kinds, fold_ln=fold_ln,
                                                progress=tqdm_progress("composition scores")),
                    refresh=args.no_cache)
    report_stored(stored, "composition scores")
    result = stored.value
    io = None
    if args.io:
        stored_io = cached(IO_SCORES, loaded, io_inputs(kinds, fold_ln),
                           lambda: io_scores(loaded.model, head_weights(loaded.model, fold_ln=fold_ln), kinds),
                           refresh=args.no_cache)
        report_stored(stored_io, "embedding and unembedding scores")
        io = stored_io.value
    edge_kinds = kinds + (("out",) if args.io else ())
    flt = GraphFilter(kinds=edge_kinds, measure=args.measure, threshold=args.threshold, top_k=args.top_k or None,
                      heads=heads, max_edges=args.max_edges or None)
    published = published_roles_for(info.name, info.source)
    table = all_edges(result, io)
    graph = build_graph(result, flt, io=io, published=published, model_name=info.name, edges=table)
    patching = None
    if pairs is not None:
        from headvis_core.circuits.candidates import patch_candidates
        from headvis_core.circuits.path_patching import path_patch

        edges = patch_candidates(edges_frame(graph), args.patch_max)
        stored_patching = cached(PATH_PATCHING, loaded, path_patching_inputs(pairs, edges, args.direction),
                                 lambda: path_patch(loaded.model, pairs, edges, direction=args.direction,
                                                    progress=tqdm_progress("path patching")),
                                 refresh=args.no_cache)
        report_stored(stored_patching, "path patching")
        patching = stored_patching.value
        graph = build_graph(result, flt, io=io, published=published, model_name=info.name, edges=table,
                            patching=patching.table)
    print(result.folding_note)
    for kind in kinds:
        base = result.baselines[kind]
        print(f"random baseline {kind.upper()}: mean {base.mean:.4f}, std {base.std:.5f} ({base.n_pairs} random pairs)")
    print(f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges ({args.measure}"
          + (f" >= {args.threshold:g}" if args.threshold is not None else "")
          + (f", top {args.top_k} per node" if args.top_k else "") + ")")
    if patching is not None:
        print(f"path patching ({patching.direction}, {patching.description}): clean logit diff "
              f"{patching.clean_metric:.3f}, corrupted {patching.corrupted_metric:.3f}")
    frame = edges_frame(graph)
    if len(frame):
        columns = [c for c in ["sender", "receiver", "kinds", "score", "ratio", "z", "patch_effect", "patch_normalized"]
                   if c in frame.columns]
        print(frame[columns].head(args.show).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if out:
        path = save_graph(graph, out)
        print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "graph", help="circuit graph of Q/K/V composition edges (GraphML, JSON or HTML)",
        description="Q-, K- and V-composition scores (Elhage et al. 2021) between all heads, against a random "
                    "baseline, filtered into a circuit graph.")
    add_model_arguments(parser)
    parser.add_argument("--kinds", default="q,k,v", help="composition kinds, e.g. q,k,v or k (default: q,k,v)")
    parser.add_argument("--measure", default="ratio", choices=["ratio", "z", "score"],
                        help="what --threshold and --top-k rank by: ratio = times the random baseline (default), "
                             "z = z-score above it, score = raw composition score")
    parser.add_argument("--threshold", type=finite_float, default=None, help="keep edges with measure >= this")
    parser.add_argument("--top-k", type=non_negative_int, default=3,
                        help="keep each node's k strongest in and out edges (0: no limit; default 3)")
    parser.add_argument("--heads", default="", help="only these heads and their neighbours, e.g. 5.1,6.9")
    parser.add_argument("--max-edges", type=non_negative_int, default=200, help="at most this many edges (0: no limit)")
    parser.add_argument("--io", action="store_true", help="add embedding and logits nodes")
    parser.add_argument("--no-fold-ln", action="store_true", help="use the raw weights (do not fold ln1 gains)")
    parser.add_argument("--patch-ioi", type=non_negative_int, default=0, metavar="N",
                        help="check the graph's edges by path patching on N IOI prompts (clean vs ABC)")
    parser.add_argument("--patch-max", type=positive_int, default=40, help="path-patch at most this many edges")
    parser.add_argument("--direction", default="noising", choices=["noising", "denoising"])
    parser.add_argument("--show", type=non_negative_int, default=15, help="print this many edges")
    parser.add_argument("--out", default="", help="write graph.graphml, graph.json or graph.html")
    add_cache_argument(parser)
    parser.set_defaults(func=_run)
