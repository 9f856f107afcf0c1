"""``models list`` and ``models fetch NAME [--accept-gemma-terms]``."""

import argparse

from headvis_core.errors import InputError


def _list(args: argparse.Namespace) -> int:
    from headvis_core.models.loader import available_offline
    from headvis_core.models.registry import DEFAULT_MODEL, KNOWN_MODELS

    print(f"{'name':<20} {'kind':<8} {'offline':<8} description")
    for name, known in KNOWN_MODELS.items():
        ready = "yes" if available_offline(name) else ("fetch" if known.kind == "offline" else "no")
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:<20} {known.kind:<8} {ready:<8} {known.description}{default}")
    print("\nAny Hugging Face id (needs the network) or local HF-format directory also works.")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    import time

    from headvis_core.models.offline import OFFLINE_SPECS, fetch_offline_model, is_fetched, terms_notice
    from headvis_core.progress import tqdm_progress

    spec = OFFLINE_SPECS.get(args.name)
    if spec is None:
        raise InputError(f"{args.name!r} is not an offline model; fetchable: {', '.join(sorted(OFFLINE_SPECS))}.")
    needs_fetch = args.force or not is_fetched(args.name)
    if spec.needs_acceptance and needs_fetch:
        print(terms_notice(args.name))
        if not args.accept_gemma_terms:
            raise InputError(f"{spec.title} is fetched only once its terms are accepted: run "
                             f"`python -m headvis_core models fetch {args.name} --accept-gemma-terms`.")
        print(f"You accepted the {spec.licence} (--accept-gemma-terms).")
    started = time.time()
    path = fetch_offline_model(args.name, progress=tqdm_progress(f"fetching {args.name}"), force=args.force,
                               accept_terms=args.accept_gemma_terms)
    print(f"{args.name} is ready in {path} ({time.time() - started:.1f} s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list known models, fetch the offline models")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="known models and which work offline").set_defaults(func=_list)
    fetch = actions.add_parser("fetch", help="download and convert an offline model (smollm2-135m, gemma-3-270m)")
    fetch.add_argument("name")
    fetch.add_argument("--force", action="store_true", help="convert again even if present")
    fetch.add_argument("--accept-gemma-terms", action="store_true",
                       help="you have read and accept the Gemma Terms of Use (needed for gemma-3-270m)")
    fetch.set_defaults(func=_fetch)
