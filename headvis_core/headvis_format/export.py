"""Write a stored scan as the static ``data/`` tree that the HeadVis frontend loads.

Layout (see :mod:`headvis_core.headvis_format.contract` for what the frontend reads of each file)::

    config.json                      model, heads, n_intervals (10: the scan's deciles), metrics, axes, tables
    scatter_data.json                one row per head: layer, head, the scan's per-head statistics (those the
                                     scan has, HeadVis's logit std/margin/z-score, token entropies and q-k
                                     distance among them) and, given an atlas, its metrics
    heads/L{l}H{h}.json              sequences (the head's decile sample and exact top windows), top query and
                                     key tokens, the query-key distance histogram, the histogram of every
                                     window's score (``histogram``) and a few statistics
    umap/L{l}H{h}.json, sequences.json   the stored PCA of the head's Q/K/O/V (only where it was computed);
                                     a UMAP layout, where stored, as the one entry of ``views``
    server_config.json               {} (a static tree)
    attributions/manifest.json       {} (no attributions)
    custom_sequences/L{l}H{h}.json   the head's custom sequences (ids ``c1``, ``c2``...), {"sequences": []}
                                     where it has none

Atlas metrics are matched to heads by (layer, head); a column whose name the scan
already uses gets the prefix ``atlas_``. A value that is NaN (for example
retrieval when no prompt fits the context) is written as ``null``. The frontend
offers as axes only the first row's numeric columns, so the row with the fewest
``null`` values is written first (rows are found by layer and head, not by
position), and a column that is ``null`` for every head is left out.

A sequence's ``interval`` is the window's decile for that head (10 highest); a
top window outside the decile sample gets the decile of its score. Keys that
the frontend ignores carry what a round trip needs (``score``, ``sample``,
``top_rank``, ``token_id``, ``count``, the exact score histogram under
``workbench``): :mod:`headvis_core.headvis_format.importer` reads them back.

The tree is written into a temporary sibling folder, checked with the strict
validator (no errors, no warnings but a metric ``null`` for every head that
could come first) and renamed into place, so a failure leaves
the old folder (or none) and never half a tree.
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
from headvis_core.headvis_format.validate import Problem, check_tree
from headvis_core.progress import ProgressCallback, report
from headvis_core.projections.clusters import read_clusters
from headvis_core.projections.headvis import umap_records
from headvis_core.projections.store import load_projections
from headvis_core.projections.umap_fit import MIN_DIST, N_NEIGHBORS
from headvis_core.scan.params import N_DECILES
from headvis_core.scan.result import SCAN_METRIC_DESCRIPTIONS, ScanExample, ScanResult
from headvis_core.scan.state import bin_deciles, score_bins

TOP_TOKENS = 50
TOP_TOKENS_MIN_COUNT = 5
MAX_HISTOGRAM_BARS = 50

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
STATISTICS_DISPLAY = {
    "n_windows": {"label": "Windows scanned", "format": "integer"},
    "mean_max_activation": {"label": "Mean window score", "format": "default"},
    "top_decile_from": {"label": "Top decile from", "format": "default"},
    "n_sequences": {"label": "Sequences kept", "format": "integer"},
}
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


def activation_histogram(counts: np.ndarray) -> dict[str, list[float]]:
    """Every window's score as ``{bin_edges, bin_values}`` on [0, 1]: the Metrics tab's "Max Activation Distribution".

    The scan's bins are merged into the most bars (at most ``MAX_HISTOGRAM_BARS``) that divide
    them evenly, so that no window is dropped and every bar is as wide.
    """
    bars = max(b for b in range(1, MAX_HISTOGRAM_BARS + 1) if len(counts) % b == 0)
    merged = counts.reshape(bars, -1).sum(1)
    edges = np.linspace(0.0, 1.0, bars + 1)
    return {"bin_edges": [round(float(e), 6) for e in edges], "bin_values": [int(v) for v in merged]}


def head_record(scan: ScanResult, head: HeadRef, options: ExportOptions = ExportOptions(),
                summary: Optional[pd.DataFrame] = None) -> dict[str, Any]:
    """The content of ``heads/L{l}H{h}.json`` for one head (``summary``: ``scan.head_summary()``, if at hand)."""
    summary = scan.head_summary() if summary is None else summary
    rows = summary[(summary["layer"] == head.layer) & (summary["head"] == head.head)]
    if len(rows) != 1:
        raise CorruptFileError(f"The scan's head summary has {len(rows)} rows for head {head}, not one.")
    row = rows.iloc[0]
    shares = scan.distance_histogram(head)
    counts = scan.score_histogram(head)[1]
    nonzero = np.nonzero(counts)[0]
    sequences = _head_sequences(scan, head, options)
    return {
        "sequences": sequences,
        "qk_distance_histogram": {"bin_edges": [float(d) for d in range(len(shares) + 1)],
                                  "bin_values": [_finite(v, f"a distance share of head {head}") for v in shares]},
        "top_query_tokens": _token_table(scan, head, "query", options),
        "top_key_tokens": _token_table(scan, head, "key", options),
        contract.ACTIVATION_HISTOGRAM: activation_histogram(counts),
        "statistics": {"n_windows": int(counts.sum()),
                       "mean_max_activation": _finite(row["mean_max_attention"], f"the mean score of head {head}"),
                       "top_decile_from": _finite(row["top_decile_from"], f"the top decile of head {head}"),
                       "n_sequences": len(sequences)},
        "workbench": {"score_bins": int(len(counts)),
                      "score_counts": [[int(b), int(counts[b])] for b in nonzero],
                      "top_tokens_min_count": options.top_tokens_min_count},
    }


def scan_statistic_descriptions() -> dict[str, str]:
    """The scan's per-head statistics beyond :data:`METRIC_DESCRIPTIONS`: HeadVis's metrics as the scan names them.

    A scan stored before they existed gives NaN for some of them; a column NaN for every head is left out.
    """
    return dict(SCAN_METRIC_DESCRIPTIONS)


def atlas_column_names() -> dict[str, str]:
    """Atlas metric column -> its column in ``scatter_data.json`` (prefixed where the scan uses the name)."""
    taken = set(METRIC_DESCRIPTIONS) | set(scan_statistic_descriptions())
    return {c: ATLAS_PREFIX + c if c in taken else c for c in METRIC_COLUMNS}


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


def scatter_table(scan: ScanResult, atlas: Optional[pd.DataFrame] = None,
                  summary: Optional[pd.DataFrame] = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``(rows of scatter_data.json, {column: description})``; ``atlas`` is :func:`atlas_table`'s output.

    The scan's own summary columns must be finite (else the scan is damaged); its HeadVis statistics and
    the atlas metrics may be NaN, written as ``null``. A column ``null`` for every head is left out, and
    the row with the fewest ``null`` values comes first (the frontend's axes are its numeric columns).
    """
    summary = scan.head_summary() if summary is None else summary
    names = atlas_column_names()
    statistics = {k: v for k, v in scan_statistic_descriptions().items() if k in summary.columns}
    rows = []
    for _, row in summary.iterrows():
        entry = {"layer": int(row["layer"]), "head": int(row["head"])}
        for metric in METRIC_DESCRIPTIONS:
            entry[metric] = _finite(row[metric], f"{metric} of head {row['name']}")
        for metric in statistics:
            entry[metric] = _or_null(row[metric])
        if atlas is not None:
            values = atlas.loc[(entry["layer"], entry["head"])]
            for column in METRIC_COLUMNS:
                entry[names[column]] = _or_null(values[column])
        rows.append(entry)
    descriptions = {**METRIC_DESCRIPTIONS, **statistics, **(atlas_descriptions() if atlas is not None else {})}
    empty = [c for c in descriptions if all(r[c] is None for r in rows)]
    for row in rows:
        for column in empty:
            del row[column]
    fewest_nulls = min(range(len(rows)), key=lambda i: sum(v is None for v in rows[i].values()))
    rows.insert(0, rows.pop(fewest_nulls))
    return rows, {c: d for c, d in descriptions.items() if c not in empty}


def _or_null(value: Any) -> Optional[float]:
    number = float(value)
    return number if np.isfinite(number) else None


def config_record(scan: ScanResult, umap_heads: list[list[int]], options: ExportOptions,
                  descriptions: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """``config.json``; ``descriptions``: the scatter's columns (:func:`scatter_table`), the scan's own by default."""
    meta = scan.meta
    p = scan.params
    descriptions = dict(METRIC_DESCRIPTIONS) if descriptions is None else descriptions
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
        "custom_plots": [{"key": contract.DISTANCE_PLOT, "label": "Attention by query-key distance"}],
        "statistics_display": STATISTICS_DISPLAY,
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


def frontend_umap_record(record: dict[str, Any], n_pairs: int) -> dict[str, Any]:
    """A head's ``umap/`` record as the frontend reads it, from :func:`umap_records`'s.

    ``views`` becomes a list of ``{embeddings, n_neighbors, min_dist}`` (the UMAP layout; PCA stays under
    ``pca``), and each cluster names its pairs by ``[seq_idx, top_q, top_k]`` (``points``), the frontend's
    identity of a point, instead of by position.
    """
    out = {key: value for key, value in record.items() if key not in ("views", "clusters")}
    if "views" in record:
        out["views"] = [{"embeddings": record["views"]["umap"], "n_neighbors": min(N_NEIGHBORS, n_pairs - 1),
                         "min_dist": MIN_DIST}]
    out["clusters"] = [{"name": str(c["name"]),
                        "points": [[record["seq_idx"][i], record["top_q"][i], record["top_k"][i]]
                                   for i in c.get("indices", [])]} for c in record.get("clusters", [])]
    return out


def _write_umap(tmp: Path, scan: ScanResult) -> list[list[int]]:
    """``umap/`` from the projections stored with the scan; the heads written."""
    projections = load_projections(scan.path) if scan.path is not None else None
    if projections is None:
        return []
    sequences, per_head = umap_records(projections, scan, lambda head: read_clusters(scan.path, head))
    _write(tmp / contract.UMAP_DIR / contract.UMAP_SEQUENCES, sequences)
    for head, record in per_head.items():
        _write(tmp / contract.UMAP_DIR / contract.head_file_name(head.layer, head.head),
               frontend_umap_record(record, len(record["seq_idx"])))
    return [[h.layer, h.head] for h in per_head]


def exported_custom_sequence(sequence: dict[str, Any]) -> dict[str, Any]:
    """A stored custom sequence as the frontend expects it: its id a string starting with ``c``."""
    return {**sequence, "sequence_id": contract.custom_sequence_id(sequence["sequence_id"])}


def _write_tree(tmp: Path, scan: ScanResult, options: ExportOptions, progress: Optional[ProgressCallback],
                atlas: Optional[pd.DataFrame] = None) -> None:
    heads = all_heads(scan.n_layers, scan.n_heads)
    summary = scan.head_summary()
    rows, descriptions = scatter_table(scan, atlas, summary)  # a damaged scan is refused before the head files
    for i, head in enumerate(heads):
        name = contract.head_file_name(head.layer, head.head)
        _write(tmp / contract.HEADS_DIR / name, head_record(scan, head, options, summary))
        custom = read_custom_sequences(scan.path, head) if scan.path is not None else []
        _write(tmp / contract.CUSTOM_DIR / name, {"sequences": [exported_custom_sequence(s) for s in custom]})
        report(progress, 0.9 * (i + 1) / len(heads), f"head {head} ({i + 1}/{len(heads)})")
    umap_heads = _write_umap(tmp, scan)
    _write(tmp / contract.SCATTER, rows)
    _write(tmp / contract.SERVER_CONFIG, {})
    _write(tmp / contract.ATTRIBUTIONS_MANIFEST, {})  # no attributions: no entries
    _write(tmp / contract.CONFIG, config_record(scan, umap_heads, options, descriptions))


def _null_in_first_row(problem: Problem) -> bool:
    """The one warning the data can force: no head has every metric defined, so the first row lacks one."""
    return problem.file == contract.SCATTER and problem.field.startswith("[0].")


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
        check_tree(tmp, strict=True, tolerated=_null_in_first_row)
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
