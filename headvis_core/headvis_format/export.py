"""Write a stored scan as the static ``data/`` tree that the HeadVis frontend loads.

Layout (see :mod:`headvis_core.headvis_format.contract` for the facts behind it)::

    config.json                      model, heads, n_intervals (10: the scan's deciles), metrics, axes, tables
    scatter_data.json                one row per head: layer, head, the scan's per-head summary metrics and,
                                     given an atlas, its metrics (HeadVis's logit std/margin/z-score, token
                                     entropies, q-k distance, copying, retrieval, the classic ones)
    heads/L{l}H{h}.json              sequences (the head's decile sample and exact top windows), top query and
                                     key tokens, the query-key distance histogram, the window-score histogram
    umap/L{l}H{h}.json, sequences.json   the stored PCA of the head's Q/K/O/V (only where it was computed)
    server_config.json               {} (a static tree)
    attributions/manifest.json       {} (no attributions)
    custom_sequences/L{l}H{h}.json   the head's custom sequences, {"sequences": []} where it has none

Atlas metrics are matched to heads by (layer, head); a column whose name the scan
already uses gets the prefix ``atlas_``. A head whose atlas value is NaN (for
example retrieval when no prompt fits the context) gets ``null`` there, which
the validator accepts, so that the frontend's axes (the first row's keys) keep
the column.

A sequence's ``interval`` is the window's decile for that head (10 highest); a
top window outside the decile sample gets the decile of its score. Keys that
the frontend ignores carry what a round trip needs (``score``, ``sample``,
``top_rank``, ``token_id``, ``count``, the exact score histogram under
``workbench``): :mod:`headvis_core.headvis_format.importer` reads them back.

The tree is written into a temporary sibling folder and renamed into place,
so a failure leaves the old folder (or none) and never half a tree.
"""

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from headvis_core.atlas.run import METRIC_COLUMNS, METRICS, AtlasResult
from headvis_core.errors import CorruptFileError, InputError
from headvis_core.heads import HeadRef, all_heads
from headvis_core.headvis_format import contract
from headvis_core.headvis_format.custom import read_custom_sequences
from headvis_core.headvis_format.sequences import DEFAULT_KEYS_PER_QUERY, DEFAULT_THRESHOLD, sequence_record
from headvis_core.headvis_format.validate import check_tree
from headvis_core.progress import ProgressCallback, report
from headvis_core.projections.clusters import read_clusters
from headvis_core.projections.headvis import umap_records
from headvis_core.projections.store import load_projections
from headvis_core.scan.params import N_DECILES
from headvis_core.scan.result import ScanExample, ScanResult
from headvis_core.scan.state import bin_deciles, score_bins

TOP_TOKENS = 50
TOP_TOKENS_MIN_COUNT = 5
SCORE_PLOT_BARS = 50

METRIC_DESCRIPTIONS = {
    "mean_max_attention": "mean over windows of the window score (largest attention weight outside row and "
                          "column 0)",
    "top_decile_from": "lowest window score in the head's top decile",
    "top_score": "highest window score in the corpus",
    "mode_distance": "query-key distance receiving the largest share of attention (positions after 0)",
    "share_at_mode": "share of attention at that distance",
    "mean_distance": "attention-weighted mean query-key distance (positions after 0)",
}
DEFAULT_X, DEFAULT_Y = "mean_distance", "top_decile_from"
ATLAS_PREFIX = "atlas_"  # for an atlas column whose name the scan's own metrics already use


@dataclass(frozen=True)
class ExportOptions:
    keys_per_query: int = DEFAULT_KEYS_PER_QUERY  # keys kept per query of a sequence
    threshold: float = DEFAULT_THRESHOLD  # smallest kept attention weight
    top_tokens: int = TOP_TOKENS
    top_tokens_min_count: int = TOP_TOKENS_MIN_COUNT

    def check(self) -> None:
        if self.keys_per_query < 1:
            raise InputError("The keys kept per query must be at least 1.")
        if not 0.0 <= self.threshold < 1.0:
            raise InputError(f"The attention threshold must be in [0, 1); got {self.threshold}.")
        if self.top_tokens < 1 or self.top_tokens_min_count < 1:
            raise InputError("The number of top tokens and their least count must be at least 1.")


@dataclass(frozen=True)
class ExportSummary:
    folder: Path
    n_heads: int
    n_files: int
    n_bytes: int
    seconds: float


def _finite(value: Any, where: str) -> float:
    number = float(value)
    if not np.isfinite(number):
        raise CorruptFileError(f"{where} is {number}, which JSON cannot hold; the scan looks damaged.")
    return number


def check_destination(out: Path, force: bool) -> None:
    """Refuse a folder that holds anything, unless ``force`` and it is a HeadVis tree (never an arbitrary folder)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file: give a folder for the HeadVis data.")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise InputError(f"{out} exists and is not empty; choose an empty folder, or use --force to replace "
                             "the HeadVis data in it.")
        if not contract.is_tree(out):
            raise InputError(f"{out} is not empty and holds no HeadVis data (no config.json and heads/): it is not "
                             "replaced even with --force.")


def _head_sequences(scan: ScanResult, head: HeadRef, options: ExportOptions) -> list[dict[str, Any]]:
    """The decile sample (decile 10 first) and the exact top windows, one sequence per window."""
    slot = head.layer * scan.n_heads + head.head
    of_bin = bin_deciles(scan.arrays["hist"][slot])
    bins = scan.params.histogram_bins
    chosen: dict[int, tuple[int, ScanExample]] = {}
    flags: dict[int, dict[str, Any]] = {}
    for bucket in scan.deciles(head):
        for ex in bucket.examples:
            chosen.setdefault(ex.window_index, (bucket.decile, ex))
            flags.setdefault(ex.window_index, {})["sample"] = True
    for rank, ex in enumerate(scan.top_examples(head)):
        decile = int(of_bin[score_bins(np.array([ex.score]), bins)[0]])
        chosen.setdefault(ex.window_index, (decile, ex))
        flags.setdefault(ex.window_index, {})["top_rank"] = rank
    records = []
    for window, (decile, ex) in chosen.items():
        extra = {"score": _finite(ex.score, f"the score of window {window} of head {head}"),
                 "sample": bool(flags[window].get("sample", False))}
        if "top_rank" in flags[window]:
            extra["top_rank"] = int(flags[window]["top_rank"])
        records.append(sequence_record(window, decile, ex.str_tokens, ex.attention, options.keys_per_query,
                                       options.threshold, extra))
    return records


def _token_table(scan: ScanResult, head: HeadRef, role: str, options: ExportOptions) -> list[dict[str, Any]]:
    table = scan.top_tokens(head, role, n=options.top_tokens, min_count=options.top_tokens_min_count)
    return [{"token": str(token), "weight": _finite(mean, f"a top {role} token weight of head {head}"),
             "token_id": int(token_id), "count": int(count),
             "total": _finite(total, f"a top {role} token total of head {head}")}
            for token, token_id, count, mean, total in zip(table["token"], table["token_id"], table["count"],
                                                           table["mean_attention"], table["total_attention"])]


def _score_plot(counts: np.ndarray) -> dict[str, list[float]]:
    """The window-score histogram in ``SCORE_PLOT_BARS`` bars (a custom plot of the frontend)."""
    group = max(1, len(counts) // SCORE_PLOT_BARS)
    n = len(counts) // group * group
    merged = counts[:n].reshape(-1, group).sum(1)
    edges = np.linspace(0.0, n / len(counts), len(merged) + 1)
    return {"bin_edges": [round(float(e), 6) for e in edges], "bin_values": [float(v) for v in merged]}


def head_record(scan: ScanResult, head: HeadRef, options: ExportOptions = ExportOptions()) -> dict[str, Any]:
    """The content of ``heads/L{l}H{h}.json`` for one head."""
    shares = scan.distance_histogram(head)
    counts = scan.score_histogram(head)[1]
    nonzero = np.nonzero(counts)[0]
    return {
        "sequences": _head_sequences(scan, head, options),
        "qk_distance_histogram": {"bin_edges": [float(d) for d in range(len(shares) + 1)],
                                  "bin_values": [_finite(v, f"a distance share of head {head}") for v in shares]},
        "top_query_tokens": _token_table(scan, head, "query", options),
        "top_key_tokens": _token_table(scan, head, "key", options),
        "window_score_histogram": _score_plot(counts),
        "workbench": {"score_bins": int(len(counts)),
                      "score_counts": [[int(b), int(counts[b])] for b in nonzero],
                      "top_tokens_min_count": options.top_tokens_min_count},
    }


def atlas_column_names() -> dict[str, str]:
    """Atlas metric column -> its column in ``scatter_data.json`` (prefixed where the scan uses the name)."""
    return {c: ATLAS_PREFIX + c if c in METRIC_DESCRIPTIONS else c for c in METRIC_COLUMNS}


def atlas_descriptions() -> dict[str, str]:
    """The scatter columns of the atlas metrics and their definitions (from the atlas's metric table)."""
    names = atlas_column_names()
    return {names[m.column]: f"atlas: {m.definition}" for m in METRICS}


def atlas_table(scan: ScanResult, atlas: "pd.DataFrame | AtlasResult") -> pd.DataFrame:
    """The atlas's metric columns indexed by (layer, head), checked to cover exactly the scan's heads.

    ``atlas`` is an :class:`AtlasResult` (its model must be the scan's) or its table, e.g. the CSV that
    ``headvis_core atlas --out`` writes read back with pandas (a CSV names no model: only its shape is checked).
    """
    scan_model = str(scan.meta["model"]["name"])
    if isinstance(atlas, AtlasResult):
        if atlas.model_name != scan_model:
            raise InputError(f"The atlas is of {atlas.model_name}, the scan of {scan_model}: compute the atlas "
                             "of the scan's model.")
        atlas = atlas.table
    missing = [c for c in ("layer", "head", *METRIC_COLUMNS) if c not in atlas.columns]
    if missing:
        raise InputError(f"The atlas table lacks the columns {', '.join(missing)}; give the CSV that "
                         "`headvis_core atlas --out` writes.")
    try:
        layers = atlas["layer"].astype(float)
        heads = atlas["head"].astype(float)
        values = atlas[list(METRIC_COLUMNS)].astype(float)
    except (TypeError, ValueError) as err:
        raise InputError(f"The atlas table holds a value that is not a number ({err}).") from None
    if not (np.isfinite(layers).all() and np.isfinite(heads).all() and (layers % 1 == 0).all()
            and (heads % 1 == 0).all()):
        raise InputError("The atlas's layer and head columns must hold whole numbers.")
    if np.isinf(values.to_numpy()).any():
        raise InputError("The atlas holds an infinite metric value, which JSON cannot hold.")
    pairs = list(zip(layers.astype(int), heads.astype(int)))
    expected = [(h.layer, h.head) for h in all_heads(scan.n_layers, scan.n_heads)]
    if len(set(pairs)) != len(pairs) or set(pairs) != set(expected):
        atlas_layers = max(p[0] for p in pairs) + 1 if pairs else 0
        atlas_heads = max(p[1] for p in pairs) + 1 if pairs else 0
        raise InputError(f"The atlas has {len(pairs)} rows ({atlas_layers} layers x {atlas_heads} heads"
                         f"{', some repeated' if len(set(pairs)) != len(pairs) else ''}); the scan of "
                         f"{scan_model} has {scan.n_layers} x {scan.n_heads} heads: it is not this model's atlas.")
    values.index = pd.MultiIndex.from_tuples(pairs, names=["layer", "head"])
    return values


def scatter_rows(scan: ScanResult, atlas: Optional[pd.DataFrame] = None) -> list[dict[str, Any]]:
    """Rows of ``scatter_data.json``; ``atlas`` is :func:`atlas_table`'s output (NaN -> ``null``)."""
    summary = scan.head_summary()
    names = atlas_column_names()
    rows = []
    for _, row in summary.iterrows():
        entry = {"layer": int(row["layer"]), "head": int(row["head"])}
        for metric in METRIC_DESCRIPTIONS:
            entry[metric] = _finite(row[metric], f"{metric} of head {row['name']}")
        if atlas is not None:
            values = atlas.loc[(entry["layer"], entry["head"])]
            for column in METRIC_COLUMNS:
                value = float(values[column])
                entry[names[column]] = value if np.isfinite(value) else None
        rows.append(entry)
    return rows


def config_record(scan: ScanResult, umap_heads: list[list[int]], options: ExportOptions,
                  with_atlas: bool = False) -> dict[str, Any]:
    meta = scan.meta
    p = scan.params
    descriptions = {**METRIC_DESCRIPTIONS, **(atlas_descriptions() if with_atlas else {})}
    return {
        "model_name": meta["model"]["name"],
        "heads": [[h.layer, h.head] for h in all_heads(scan.n_layers, scan.n_heads)],
        "n_layers": scan.n_layers,
        "n_heads": scan.n_heads,
        "n_intervals": N_DECILES,
        "metrics": list(descriptions),
        "metric_descriptions": descriptions,
        "head_data_pattern": contract.HEAD_DATA_PATTERN,
        "has_umap": bool(umap_heads),
        "umap_heads": umap_heads,
        "scatter": {"default_x": DEFAULT_X, "default_y": DEFAULT_Y},
        "custom_tables": [{"key": "top_query_tokens", "label": "Top query tokens (mean attention paid)"},
                          {"key": "top_key_tokens", "label": "Top key tokens (mean attention received)"}],
        "custom_plots": [{"key": "qk_distance_histogram", "label": "Attention by query-key distance"},
                         {"key": "window_score_histogram", "label": "Window scores"}],
        "workbench": {"scan_key": meta.get("key"), "corpus": meta["corpus"]["description"],
                      "created": meta.get("created"), "n_windows": scan.n_windows, "window_len": p.window_len,
                      "top_k_keys": p.top_k_keys, "examples_per_decile": p.examples_per_decile,
                      "top_examples": p.top_examples, "keys_per_query": options.keys_per_query,
                      "threshold": options.threshold},
    }


def _write(path: Path, obj: Any) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = contract.dumps(obj).encode("utf-8")
    path.write_bytes(data)
    return len(data)


def _write_umap(tmp: Path, scan: ScanResult) -> list[list[int]]:
    """``umap/`` from the projections stored with the scan; the heads written."""
    projections = load_projections(scan.path) if scan.path is not None else None
    if projections is None:
        return []
    sequences, per_head = umap_records(projections, scan, lambda head: read_clusters(scan.path, head))
    _write(tmp / contract.UMAP_DIR / contract.UMAP_SEQUENCES, sequences)
    for head, record in per_head.items():
        _write(tmp / contract.UMAP_DIR / contract.head_file_name(head.layer, head.head), record)
    return [[h.layer, h.head] for h in per_head]


def _write_tree(tmp: Path, scan: ScanResult, options: ExportOptions, progress: Optional[ProgressCallback],
                atlas: Optional[pd.DataFrame] = None) -> None:
    heads = all_heads(scan.n_layers, scan.n_heads)
    for i, head in enumerate(heads):
        name = contract.head_file_name(head.layer, head.head)
        _write(tmp / contract.HEADS_DIR / name, head_record(scan, head, options))
        custom = read_custom_sequences(scan.path, head) if scan.path is not None else []
        _write(tmp / contract.CUSTOM_DIR / name, {"sequences": custom})
        report(progress, 0.9 * (i + 1) / len(heads), f"head {head} ({i + 1}/{len(heads)})")
    umap_heads = _write_umap(tmp, scan)
    _write(tmp / contract.SCATTER, scatter_rows(scan, atlas))
    _write(tmp / contract.SERVER_CONFIG, {})
    _write(tmp / contract.ATTRIBUTIONS_MANIFEST, {})  # no attributions: no entries
    _write(tmp / contract.CONFIG, config_record(scan, umap_heads, options, with_atlas=atlas is not None))


def export_headvis(scan: ScanResult, out: Path, force: bool = False, options: ExportOptions = ExportOptions(),
                   progress: Optional[ProgressCallback] = None,
                   atlas: "pd.DataFrame | AtlasResult | None" = None) -> ExportSummary:
    """Write ``scan`` as a HeadVis ``data/`` tree at ``out``, validated, atomically (see the module docstring).

    ``atlas`` (an :class:`AtlasResult` or its table / CSV) adds the atlas metrics to ``scatter_data.json``.
    """
    options.check()
    atlas_values = atlas_table(scan, atlas) if atlas is not None else None
    out = Path(out).expanduser()
    check_destination(out, force)
    started = time.time()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    except OSError as err:
        raise InputError(f"Cannot write the HeadVis data next to {out} ({err.strerror or err}).") from None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the tree is meant to be served
        _write_tree(tmp, scan, options, progress, atlas_values)
        report(progress, 0.95, "checking the tree against the HeadVis contract")
        check_tree(tmp)
        files = [p for p in tmp.rglob("*") if p.is_file()]
        n_bytes = sum(p.stat().st_size for p in files)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(progress, 1.0, f"{len(files)} files, {n_bytes / 1e6:.1f} MB")
    return ExportSummary(out, scan.n_layers * scan.n_heads, len(files), n_bytes, time.time() - started)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished tree to ``out``; an old tree is moved aside first and deleted only afterwards."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "tree")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "tree", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
