"""``store list|clear``: what the result store holds (atlases, graphs, rankings, sweeps...), and emptying it.

    python -m headvis_core store list
    python -m headvis_core store list --model smollm2-135m --kind atlas
    python -m headvis_core store clear --kind sweep
"""

import argparse

from headvis_core.cli.main import text_argument


def _filters(args: argparse.Namespace) -> dict:
    return {"model": args.model, "kind": args.kind}


def _list(args: argparse.Namespace) -> int:
    from headvis_core.limits import gib
    from headvis_core.store.results import default_store

    store = default_store()
    entries = store.entries(**_filters(args))
    if store.open_note:
        print(f"note: {store.take_open_note()}")
    print(f"result store {store.directory}: {gib(store.volume())} of {gib(store.size_limit)} "
          "(least recently used results are evicted past the cap; HEADVIS_STORE_SIZE_GB sets it)")
    if not entries:
        print("no stored results" + (" match" if args.model or args.kind else ""))
        return 0
    for entry in entries:
        inputs = ", ".join(f"{k}={v}" for k, v in entry.inputs.items())
        print(f"{entry.computed_at_text}  {entry.kind:<16} {entry.model:<20} {gib(entry.size_bytes):>9}  "
              f"weights {entry.fingerprint[:12]}  took {entry.compute_seconds:.1f} s")
        print(f"    {inputs[:200]}")
    print(f"{len(entries)} result(s)")
    return 0


def _clear(args: argparse.Namespace) -> int:
    from headvis_core.store.results import default_store

    removed = default_store().clear(**_filters(args))
    print(f"removed {removed} stored result(s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from headvis_core.store.kinds import KINDS

    parser = subparsers.add_parser("store", help="list or clear the stored results (atlases, graphs, rankings...)",
                                   description="The result store keeps every computed atlas, composition graph, "
                                               "ablation ranking and sweep, keyed by the model's weights and the "
                                               "inputs, so the same request is answered at once the next time.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, func, help_text in (("list", _list, "list the stored results, newest first"),
                                  ("clear", _clear, "delete stored results (all of them, or those matching)")):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--model", type=text_argument, help="only results of this model name")
        action.add_argument("--kind", type=text_argument,
                            help=f"only results of this kind ({', '.join(KINDS)})")
        action.set_defaults(func=func)
