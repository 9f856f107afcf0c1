"""Benchmark: HeadVis export of a SmolLM2 scan (all 270 heads): time, size, and the COO encoding against a loop.

Scans ``--windows`` windows of ``../shared/corpus/gutenberg`` (or opens ``--scan DIR``),
optionally computes the Q/K/V/O projections (``--pca``), then exports the tree
and validates it, printing the export's time and size (files, total, largest
head file). In the same run, the sequence encoding (``coo_entries``, vectorised
per example) is timed against a per-query Python loop on the same examples, and
the two must give the same entries. With ``--describe L.H`` it prints that
head's PCA: explained variance per kind and where pairs of each query-key
distance and each frequent key token sit on the first two components.

    PYTHONPATH=. .venv/bin/python bench/export_headvis.py [--windows 64] [--pca] [--describe 3.0]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP


ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "gutenberg"


def loop_entries(attention, keys_per_query, threshold):
    """The naive way: one query at a time in Python."""
    n = attention.keys.shape[0]
    kept = {}
    for q in range(n):
        candidates = [(round(float(attention.first[q]), 4), 0)]
        for key, value in zip(attention.keys[q], attention.values[q]):
            if value > 0 and 1 <= key <= q:
                candidates.append((round(float(value), 4), int(key)))
        candidates.sort(key=lambda c: (-c[0], c[1]))
        for value, key in candidates[:keys_per_query]:
            if value >= threshold and value > 0:
                kept[q * n + key] = value
    return sorted(kept), [kept[i] for i in sorted(kept)]


def compare_encoding(scan) -> None:
    from headvis_core.heads import all_heads
    from headvis_core.headvis_format.sequences import coo_entries

    examples = [ex for head in all_heads(scan.n_layers, scan.n_heads)[:60] for ex in scan.top_examples(head)]
    started = time.perf_counter()
    fast = [coo_entries(ex.attention, 5, 0.01) for ex in examples]
    fast_s = time.perf_counter() - started
    started = time.perf_counter()
    slow = [loop_entries(ex.attention, 5, 0.01) for ex in examples]
    slow_s = time.perf_counter() - started
    assert [list(f[0]) for f in fast] == [s[0] for s in slow] and [f[1] for f in fast] == [s[1] for s in slow]
    print(f"COO encoding of {len(examples)} examples: {fast_s * 1e3:.0f} ms vectorised, {slow_s * 1e3:.0f} ms "
          f"per-query loop: {slow_s / fast_s:.1f}x (same entries)")


def deciles_key(result, head):
    return [(b.decile, b.n_windows, [(e.window_index, e.score) for e in b.examples]) for b in result.deciles(head)]


def describe(scan, spec: str) -> None:
    from headvis_core.heads import HeadRef
    from headvis_core.projections.prompt import stored_pairs_table
    from headvis_core.projections.store import load_projections

    projections = load_projections(scan.path)
    head = HeadRef.from_label(spec)
    p = projections.head(head)
    table = stored_pairs_table(p, projections.arrays["window_tokens"], scan.token_strings)
    print(f"\nhead {head}: {len(table)} pairs; distance share: "
          + ", ".join(f"{d}: {s:.2f}" for d, s in table["distance"].clip(upper=6).value_counts(normalize=True)
                      .sort_index().items()) + " (6 = 6 or more)")
    for kind in ("Q", "K", "V", "O"):
        print(f"  {kind}: explained {', '.join(f'{e:.0%}' for e in p.fits[kind].explained)}")
        by_distance = table.groupby(table["distance"].clip(upper=6))[[f"{kind}0", f"{kind}1"]].agg(["mean", "std"])
        for distance, row in by_distance.iterrows():
            print(f"     distance {distance}: PC1 {row[(f'{kind}0', 'mean')]:+.2f} ± {row[(f'{kind}0', 'std')]:.2f}, "
                  f"PC2 {row[(f'{kind}1', 'mean')]:+.2f} ± {row[(f'{kind}1', 'std')]:.2f}")
        top_keys = table["key_token"].value_counts().index[:4]
        for token in top_keys:
            part = table[table["key_token"] == token]
            print(f"     key {token!r} ({len(part)}): PC1 {part[f'{kind}0'].mean():+.2f}, "
                  f"PC2 {part[f'{kind}1'].mean():+.2f}")


def main() -> None:
    from headvis_core.data.corpus import open_corpus
    from headvis_core.heads import all_heads
    from headvis_core.headvis_format.export import export_headvis
    from headvis_core.headvis_format.importer import import_headvis
    from headvis_core.headvis_format.validate import validate_tree
    from headvis_core.models.loader import load_model
    from headvis_core.projections.run import ProjectionParams, project_scan
    from headvis_core.scan import ScanParams, load_scan, run_scan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--window-len", type=int, default=64)
    parser.add_argument("--scan", default=None, help="a stored scan folder instead of scanning")
    parser.add_argument("--pca", action="store_true", help="compute the projections first (umap/)")
    parser.add_argument("--pca-pairs", type=int, default=1000)
    parser.add_argument("--describe", default=None, help="print this head's PCA (needs --pca)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    loaded = None
    if args.scan:
        scan = load_scan(Path(args.scan))
    else:
        loaded = load_model("smollm2-135m", device="cpu")
        started = time.time()
        scan = run_scan(loaded, open_corpus(str(CORPUS)), ScanParams(window_len=args.window_len,
                                                                     max_windows=args.windows),
                        out_dir=work / "scans", batch_size=8)
        print(f"scan: {scan.n_windows} windows of {args.window_len} tokens in {time.time() - started:.1f} s")
    if args.pca:
        loaded = loaded or load_model(scan.meta["model"]["name"], device="cpu")
        started = time.time()
        projections = project_scan(loaded, scan, ProjectionParams(max_pairs=args.pca_pairs,
                                                                  max_windows=args.windows))
        print(f"projections: {len(projections.heads)} heads, {len(projections.arrays['window_ids'])} windows "
              f"rerun, {args.pca_pairs} pairs each, in {time.time() - started:.1f} s")
    summary = export_headvis(scan, work / "data")
    head_files = sorted((work / "data" / "heads").iterdir(), key=lambda p: p.stat().st_size)
    print(f"export: {summary.n_heads} heads, {summary.n_files} files, {summary.n_bytes / 1e6:.2f} MB in "
          f"{summary.seconds:.1f} s (validation included); head files {head_files[0].stat().st_size / 1e3:.0f}-"
          f"{head_files[-1].stat().st_size / 1e3:.0f} kB")
    started = time.time()
    problems = validate_tree(work / "data")
    print(f"validate: {len(problems)} problems in {time.time() - started:.1f} s")
    started = time.time()
    imported = import_headvis(work / "data")
    same = all(deciles_key(scan, head) == deciles_key(imported, head)
               for head in all_heads(scan.n_layers, scan.n_heads))
    print(f"import and round trip of every head's deciles: {'same' if same else 'DIFFERENT'} "
          f"({time.time() - started:.1f} s)")
    compare_encoding(scan)
    if args.describe:
        describe(scan, args.describe)
    print(f"(files under {work})")


if __name__ == "__main__":
    main()
