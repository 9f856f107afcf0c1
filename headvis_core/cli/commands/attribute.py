"""``attribute``: QK and OV attribution of one attention edge (head, query position, key position).

Example (an induction edge of SmolLM2's head 18.6)::

    python -m headvis_core attribute --model smollm2-135m \\
        --prompt "Mr and Mrs Dursley of number four, Privet Drive. Mr and Mrs Dursley" \\
        --head 18.6 --query 14 --key 3 --out edge.json

Positions index the model's tokens, BOS included where the model prepends one (the command prints
them). ``--sae DIR`` names a SAELens-format dictionary on the stream entering the head's layer;
its features then replace the model's components on ``--sae-side``.
"""

import argparse

from headvis_core.cli.main import (
    add_cache_argument,
    add_model_arguments,
    check_output_file,
    load_model_from_args,
    non_negative_int,
    positive_int,
    report_stored,
    text_argument,
)


def _table(frame, n: int) -> str:
    return frame.head(n).to_string(index=False, float_format=lambda x: f"{x:+.4f}")


def _run(args: argparse.Namespace) -> int:
    from headvis_core.attribution.edge import (
        EdgeSpec,
        attribute_edges,
        attribution_inputs,
        attribution_link,
        parse_sae_side,
        save_json,
    )
    from headvis_core.attribution.sae import load_sae
    from headvis_core.heads import parse_head
    from headvis_core.progress import tqdm_progress
    from headvis_core.store import cached
    from headvis_core.store.kinds import ATTRIBUTION
    from headvis_core.tokens import token_labels, tokenize_prompt

    out = check_output_file(args.out, suffixes=[".json"])
    sae_side = parse_sae_side(args.sae_side)
    sae = load_sae(args.sae) if args.sae else None
    loaded = load_model_from_args(args)
    model = loaded.model
    head = parse_head(args.head, loaded.info.n_layers, loaded.info.n_heads)
    prompt = tokenize_prompt(model, args.prompt)
    edge = EdgeSpec(head, args.query, args.key)

    def compute():
        return attribute_edges(model, prompt.tokens, [edge], sae=sae, sae_side=sae_side,
                               progress=tqdm_progress("attributing"))[0]

    stored = cached(ATTRIBUTION, loaded, attribution_inputs(prompt.tokens, [edge], sae, sae_side), compute,
                    refresh=args.no_cache, link=attribution_link(args.prompt, edge, args.sae or "", sae_side))
    report_stored(stored, "edge attribution")
    result = stored.value
    print("tokens: " + " ".join(token_labels(prompt.str_tokens)))
    print(result.summary())
    print(f"sum of the {result.qk.terms.numel()} QK terms: {result.qk.reconstructed:.6f} (model: {result.score:.6f})")
    print("\nquery side (component . k):\n" + _table(result.query_side(), args.top))
    print("\nkey side (q . component):\n" + _table(result.key_side(), args.top))
    print("\ntop pairs:\n" + _table(result.top_pairs(args.top)[["query_component", "key_component", "value"]],
                                     args.top))
    print("\nOV value side (projection on the edge's write):\n" + _table(result.value_side(), args.top))
    print("\ntokens the edge says (direct logit effect):\n" + _table(result.top_tokens, args.top))
    for note in result.notes:
        print(f"note: {note}")
    print(f"saved {save_json(result, out)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attribute", help="explain one attention edge: QK terms of its score and OV terms of what it moves",
        description="QK and OV attribution of the edge (head, query position, key position) on one prompt.")
    add_model_arguments(parser)
    add_cache_argument(parser)
    parser.add_argument("--prompt", required=True, type=text_argument, help="the prompt")
    parser.add_argument("--head", required=True, help="the head as layer.head, e.g. 18.6")
    parser.add_argument("--query", required=True, type=non_negative_int,
                        help="query position (a token index, BOS included)")
    parser.add_argument("--key", required=True, type=non_negative_int,
                        help="key position (<= the query position)")
    parser.add_argument("--sae", metavar="DIR", help="a SAELens-format dictionary (cfg.json, sae_weights.safetensors) "
                        "on blocks.L.hook_resid_pre of the head's layer")
    parser.add_argument("--sae-side", default="both", choices=["query", "key", "both"],
                        help="where the dictionary's features replace the model's components (default both)")
    parser.add_argument("--top", type=positive_int, default=10, help="rows of each table to print (default 10)")
    parser.add_argument("--out", required=True, metavar="FILE.json", help="where to write the attribution JSON")
    parser.set_defaults(func=_run)
