"""A contract validator for HeadVis ``data/`` trees, written from the frontend's reads (see :mod:`.contract`).

:func:`validate_tree` lists every problem as ``file: field: what is wrong``,
each an ``error`` (the frontend breaks, shows nothing, or shows something
wrong) or a ``warning`` (it works but logs a failed fetch, or loses a view:
a file it requests is missing, a scatter column is ``null`` in the first
row). :func:`check_tree` raises :class:`CorruptFileError` with the first few:
on errors only, or on warnings too with ``strict`` (what this project's own
export must pass). Trees from other producers, such as Neuronpedia's
``compute-head-metrics.py`` (no ``custom_sequences/``, no ``scatter`` axes,
``null`` metrics), are read when they have no errors.

Every file is parsed as the browser would (no NaN or Infinity) and an object
may not repeat a key.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from headvis_core.errors import CorruptFileError
from headvis_core.headvis_format import contract

MAX_SHOWN = 5
ERROR = "error"
WARNING = "warning"
MANIFEST_KEY = re.compile(r"^L\d+H\d+S.+$")
MAX_SCORE_BINS = 1 << 20  # the import builds an array of this many window-score bins
# config.workbench's whole numbers, each with its least value (the import turns them into scan parameters)
WORKBENCH_NUMBERS = {"n_windows": 0, "window_len": 1, "top_k_keys": 1, "keys_per_query": 1,
                     "examples_per_decile": 1, "top_examples": 1}


@dataclass(frozen=True)
class Problem:
    file: str
    field: str
    message: str
    severity: str = ERROR

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_strict(path: Path) -> Any:
    """Parse ``path`` as the browser would (no NaN/Infinity) and refuse repeated keys in an object."""
    text = path.read_bytes().decode("utf-8")
    return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates)


def _shown(value: Any) -> str:
    """A value from a tree in a message, cut short (a tree may hold anything)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_numbers(values: Any) -> bool:
    """A list of JSON numbers (no booleans), all finite; checked in C for lists of millions."""
    if not isinstance(values, list):
        return False
    if not set(map(type, values)) <= {int, float}:
        return False
    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all()) if values else True


def _whole_numbers(values: Any) -> bool:
    return isinstance(values, list) and set(map(type, values)) <= {int}


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)


def _histogram_shape(plot: Any) -> bool:
    """``{bin_edges, bin_values}`` of finite numbers with one edge more than values (as the Metrics tab pairs them)."""
    return (isinstance(plot, dict) and _finite_numbers(plot.get("bin_edges"))
            and _finite_numbers(plot.get("bin_values")) and len(plot["bin_edges"]) == len(plot["bin_values"]) + 1)


def _indexes(valid_index: Any, seq_idx: Any) -> bool:
    """Whether ``seq_idx`` finds a token list (a string ``seq_idx`` is shown as "no token data", which is allowed)."""
    if isinstance(seq_idx, str):
        return True
    if not _is_int(seq_idx):
        return False
    return str(seq_idx) in valid_index if isinstance(valid_index, set) else seq_idx in valid_index


class _Checker:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.problems: list[Problem] = []

    def add(self, file: str, field: str, message: str, severity: str = ERROR) -> None:
        self.problems.append(Problem(file, field, message, severity))

    def errors_in(self, file: str) -> bool:
        return any(p.file == file and p.severity == ERROR for p in self.problems)

    def load(self, relative: str, missing: str = ERROR, why: str = "the frontend requests it") -> Optional[Any]:
        path = self.root / relative
        try:
            if not path.is_file():
                self.add(relative, "(file)", f"missing ({why})", missing)
                return None
            if not path.resolve().is_relative_to(self.root.resolve()):  # a link to a file elsewhere
                self.add(relative, "(file)", "leads outside the tree (a link): it is not read")
                return None
            return load_strict(path)
        except _DuplicateKey as err:
            self.add(relative, str(err), "key repeated in one object")
        except (ValueError, UnicodeDecodeError) as err:
            self.add(relative, "(file)", f"not valid JSON ({err}); JSON.parse refuses the whole file")
        except OSError as err:
            self.add(relative, "(file)", f"cannot be read ({err.strerror or err})")
        return None

    # -- config.json ----------------------------------------------------------------------------

    def config(self) -> Optional[dict[str, Any]]:
        file = contract.CONFIG
        config = self.load(file, why="without it the page shows only an error")
        if config is None:
            return None
        if not isinstance(config, dict):
            self.add(file, "(top level)", "must be an object")
            return None
        for key in contract.CONFIG_REQUIRED:
            if key not in config:
                self.add(file, key, "missing")
        n_intervals = config.get("n_intervals")
        if "n_intervals" in config and not (_is_int(n_intervals) and 1 <= n_intervals <= contract.MAX_INTERVALS):
            self.add(file, "n_intervals", f"must be a whole number from 1 to {contract.MAX_INTERVALS}, not "
                     f"{_shown(n_intervals)} (the first interval shown is n_intervals, and sequences are matched "
                     "to it exactly)")
        for key in ("n_layers", "n_heads"):
            if key in config and not (_is_int(config[key]) and config[key] >= 1):
                self.add(file, key, f"must be a whole number >= 1, not {config[key]!r}")
        problem = contract.head_pattern_problem(config.get("head_data_pattern", contract.HEAD_DATA_PATTERN))
        if problem is not None:
            self.add(file, "head_data_pattern", problem)
        if not isinstance(config.get("model_name", ""), str):
            self.add(file, "model_name", "must be a string (the sidebar shows it)")
        elif "model_name" not in config:
            self.add(file, "model_name", "missing (the sidebar shows 'Loading...' in its place)", WARNING)
        descriptions = config.get("metric_descriptions", {})
        if not isinstance(descriptions, dict):
            self.add(file, "metric_descriptions", "must be an object {metric: description} (the Help tab lists it)")
        if "heads" in config:
            self._heads_list(config)
        self._umap_flags(config)
        self._tables(config)
        if not isinstance(config.get("statistics_display", {}), dict):
            self.add(file, "statistics_display", "must be an object {statistic: {label, format}}")
        dimensions = config.get("dimensions", {})
        if not isinstance(dimensions, dict):
            self.add(file, "dimensions", "must be an object {primary, secondary} of column names")
        else:
            for key in ("primary", "secondary"):
                if key in dimensions and not isinstance(dimensions[key], str):
                    self.add(file, f"dimensions.{key}", f"must be a column name, not {_shown(dimensions[key])}")
        self._workbench(config)
        return None if self.errors_in(file) else config

    def _workbench(self, config: dict[str, Any]) -> None:
        """This project's own ``workbench`` keys (the frontend ignores them; the import reads them)."""
        extra = config.get("workbench", {})
        if not isinstance(extra, dict):
            self.add(contract.CONFIG, "workbench", "must be an object")
            return
        for key, low in WORKBENCH_NUMBERS.items():
            if key in extra and not (_is_int(extra[key]) and extra[key] >= low):
                self.add(contract.CONFIG, f"workbench.{key}", f"must be a whole number >= {low}, not "
                         f"{_shown(extra[key])}")
        for key in ("scan_key", "corpus", "created"):
            if extra.get(key) is not None and not isinstance(extra[key], str):
                self.add(contract.CONFIG, f"workbench.{key}", f"must be a string, not {_shown(extra[key])}")

    def _heads_list(self, config: dict[str, Any]) -> None:
        heads = config["heads"]
        if not isinstance(heads, list) or not heads:
            self.add(contract.CONFIG, "heads", "must be a non-empty list of [layer, head]")
            return
        n_layers, n_heads = config.get("n_layers"), config.get("n_heads")
        seen = set()
        for i, pair in enumerate(heads):
            inside = _is_pair(pair) and min(pair) >= 0 and (not _is_int(n_layers) or pair[0] < n_layers) and (
                not _is_int(n_heads) or pair[1] < n_heads)
            if not inside:
                self.add(contract.CONFIG, f"heads[{i}]", f"{pair!r} is not a [layer, head] inside the model")
            elif tuple(pair) in seen:
                self.add(contract.CONFIG, f"heads[{i}]", f"{pair!r} is listed twice")
            else:
                seen.add(tuple(pair))

    def _umap_flags(self, config: dict[str, Any]) -> None:
        if not isinstance(config.get("has_umap", False), bool):
            self.add(contract.CONFIG, "has_umap", "must be true or false")
        umap_heads = config.get("umap_heads", [])
        if not isinstance(umap_heads, list) or not all(_is_pair(p) for p in umap_heads):
            self.add(contract.CONFIG, "umap_heads", "must be a list of [layer, head]")
        elif isinstance(config.get("heads"), list):
            listed = {tuple(p) for p in config["heads"] if _is_pair(p)}
            for i, pair in enumerate(umap_heads):
                if tuple(pair) not in listed:
                    self.add(contract.CONFIG, f"umap_heads[{i}]", f"{pair!r} is not one of config.heads")

    def _tables(self, config: dict[str, Any]) -> None:
        for field in ("custom_tables", "custom_plots"):
            entries = config.get(field, [])
            if not isinstance(entries, list):
                self.add(contract.CONFIG, field, "must be a list of {key, label}")
                continue
            keys_seen: set[str] = set()
            for i, entry in enumerate(entries):
                if not (isinstance(entry, dict) and isinstance(entry.get("key"), str)
                        and isinstance(entry.get("label"), str)):
                    self.add(contract.CONFIG, f"{field}[{i}]", "must be {\"key\": str, \"label\": str}")
                    continue
                if entry["key"] in keys_seen:
                    self.add(contract.CONFIG, f"{field}[{i}].key", f"{entry['key']!r} is repeated (the Metrics tab "
                             "lists them keyed: a repeated key crashes it)")
                keys_seen.add(entry["key"])
                if "max_rows" in entry and not (_is_int(entry["max_rows"]) and entry["max_rows"] >= 1):
                    self.add(contract.CONFIG, f"{field}[{i}].max_rows", "must be a whole number >= 1")
        named = self.named_keys(config)
        for key in (*contract.TOKEN_TABLES, contract.DISTANCE_PLOT):
            if key not in named:
                field = "custom_plots" if key == contract.DISTANCE_PLOT else "custom_tables"
                self.add(contract.CONFIG, field, f"does not name {key!r}, so the Metrics tab shows none of it",
                         WARNING)

    @staticmethod
    def named_keys(config: dict[str, Any]) -> dict[str, str]:
        """Head-file key -> ``"table"`` or ``"plot"`` for every well-formed entry of the config's lists."""
        named = {}
        for field, kind in (("custom_tables", "table"), ("custom_plots", "plot")):
            entries = config.get(field, [])
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                    named[entry["key"]] = kind
        return named

    # -- scatter_data.json ---------------------------------------------------------------------

    def scatter(self, config: dict[str, Any]) -> None:
        file = contract.SCATTER
        rows = self.load(file, why="without it the page shows only an error")
        if rows is None:
            return
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            self.add(file, "(top level)", "must be a non-empty list of objects, one per head")
            return
        dimensions = config.get("dimensions", {})  # config() has checked that its names are strings
        dims = {dimensions.get("primary", "layer"), dimensions.get("secondary", "head"), "layer", "head"}
        plotted = {name for row in rows for name, value in row.items() if _is_number(value)}
        for name, value in rows[0].items():
            if value is None and name not in dims:
                self.add(file, f"[0].{name}", "is null in the first row, so the scatter's menus do not offer it "
                         "(they list the first row's numeric columns)", WARNING)
        scatter = config.get("scatter")
        if scatter is None:
            self.add(contract.CONFIG, "scatter", "missing: the scatter starts as layer against head, with no "
                     "colour", WARNING)
        elif not isinstance(scatter, dict):
            self.add(contract.CONFIG, "scatter", "must be an object {default_x, default_y, default_color}")
        else:
            for axis in ("default_x", "default_y", "default_color"):
                name = scatter.get(axis)
                if name is not None and not isinstance(name, str):  # a list or an object is no column name
                    self.add(contract.CONFIG, f"scatter.{axis}", f"must be a column name, not {_shown(name)}")
            for axis in ("default_x", "default_y"):
                name = scatter.get(axis)
                if isinstance(name, str) and name not in plotted:
                    self.add(contract.CONFIG, f"scatter.{axis}", f"{name!r} is not a numeric column of {file} "
                             f"(columns: {', '.join(sorted(plotted))}); the plot would be empty")
            color = scatter.get("default_color")
            if isinstance(color, str) and color not in plotted:
                self.add(contract.CONFIG, "scatter.default_color", f"{color!r} is not a numeric column of {file}; "
                         "every point gets one colour", WARNING)
            if not isinstance(scatter.get("discrete_axes", []), list):
                self.add(contract.CONFIG, "scatter.discrete_axes", "must be a list of column names")
        seen = set()
        for i, row in enumerate(rows):
            # a clicked point selects (row.layer, row.head) and a head's metrics are found by them, whatever
            # config.dimensions names for the labels
            if not (_is_int(row.get("layer")) and _is_int(row.get("head"))):
                self.add(file, f"[{i}].layer/head", "must be whole numbers (the head's row is found by them)")
                continue
            if (row["layer"], row["head"]) in seen:
                self.add(file, f"[{i}]", f"a second row for head {row['layer']}.{row['head']}")
            seen.add((row["layer"], row["head"]))
            for key, value in row.items():
                if key not in dims and value is not None and not _is_number(value):
                    self.add(file, f"[{i}].{key}", f"{value!r} is not a finite number or null")
        heads = {tuple(h) for h in config.get("heads", []) if _is_pair(h)}
        for layer, head in sorted(heads - seen)[:MAX_SHOWN]:
            self.add(file, f"L{layer}H{head}", "no row for this head of config.heads (its Metrics tab has no head "
                     "metrics)", WARNING)

    # -- sequences -----------------------------------------------------------------------------

    def sequence(self, file: str, where: str, seq: Any, n_intervals: int, custom: bool) -> None:
        if not isinstance(seq, dict):
            self.add(file, where, "must be an object")
            return
        required = contract.CUSTOM_SEQUENCE_REQUIRED if custom else contract.SEQUENCE_REQUIRED
        missing = [key for key in required if key not in seq]
        for key in missing:
            self.add(file, f"{where}.{key}", "missing")
        if missing:
            return
        sequence_id = seq["sequence_id"]
        if not (_is_int(sequence_id) or isinstance(sequence_id, str)):
            self.add(file, f"{where}.sequence_id", f"{sequence_id!r} is not a whole number or a string")
        elif custom and not str(sequence_id).startswith(contract.CUSTOM_ID_PREFIX):
            self.add(file, f"{where}.sequence_id", f"{sequence_id!r} does not start with "
                     f"{contract.CUSTOM_ID_PREFIX!r}: a deep link to it finds a dataset sequence first", WARNING)
        if custom:
            interval = seq.get("interval", contract.CUSTOM_INTERVAL)
            if interval != contract.CUSTOM_INTERVAL or not _is_int(interval):
                self.add(file, f"{where}.interval", f"{interval!r}: a custom sequence's interval is "
                         f"{contract.CUSTOM_INTERVAL} or absent", WARNING)
        else:
            interval = seq["interval"]
            if not (_is_int(interval) and 1 <= interval <= n_intervals):
                self.add(file, f"{where}.interval", f"{interval!r} must be the JSON integer 1..{n_intervals} (the "
                         "frontend shows a sequence only when its interval equals the chosen one)")
        for key, check, what in (("score", _is_number, "a finite number"), ("top_rank", _is_int, "a whole number"),
                                 ("sample", lambda v: isinstance(v, bool), "true or false")):
            if key in seq and not check(seq[key]):  # this project's own keys, read by the import
                self.add(file, f"{where}.{key}", f"must be {what}, not {_shown(seq[key])}")
        tokens, seq_len = seq["tokens"], seq["seq_len"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            self.add(file, f"{where}.tokens", "must be a list of strings")
            return
        if not _is_int(seq_len) or seq_len != len(tokens):
            self.add(file, f"{where}.seq_len", f"{seq_len!r} is not len(tokens) = {len(tokens)}")
            return
        self._coo(file, where, seq, seq_len)
        if not _is_number(seq["max_activation"]):
            self.add(file, f"{where}.max_activation", f"{seq['max_activation']!r} is not a finite number (the "
                     "frontend prints it with toFixed and scales every sequence's colours by the largest)")

    def _coo(self, file: str, where: str, seq: dict[str, Any], seq_len: int) -> None:
        indices, values = seq["attention_indices"], seq["attention_values"]
        if not isinstance(indices, list) or not isinstance(values, list) or len(indices) != len(values):
            self.add(file, f"{where}.attention_indices", "must be a list as long as attention_values")
            return
        if not _whole_numbers(indices):
            self.add(file, f"{where}.attention_indices", "must hold whole numbers (q * seq_len + k)")
            return
        if not _finite_numbers(values):
            self.add(file, f"{where}.attention_values", "must hold finite numbers")
            return
        flat = np.asarray(indices, dtype=np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() >= seq_len * seq_len):
            self.add(file, f"{where}.attention_indices", f"outside [0, seq_len ** 2 = {seq_len * seq_len})")
        if len(np.unique(flat)) != len(flat):
            self.add(file, f"{where}.attention_indices", "an entry is listed twice")
        vals = np.asarray(values, dtype=np.float64)
        if len(vals) and (vals.min() < 0 or vals.max() > 1 + 1e-6):
            self.add(file, f"{where}.attention_values", "attention weights must be in [0, 1]")

    # -- head files ----------------------------------------------------------------------------

    def head_file(self, relative: str, n_intervals: int, config: dict[str, Any]) -> None:
        data = self.load(relative, why="the head shows no sequences and the console an error")
        if data is None:
            return
        if isinstance(data, list):  # the frontend's older format: the sequences alone
            data = {"sequences": data}
        if not isinstance(data, dict) or not isinstance(data.get("sequences"), list):
            self.add(relative, "sequences", "missing or not a list")
            return
        for i, seq in enumerate(data["sequences"]):
            self.sequence(relative, f"sequences[{i}]", seq, n_intervals, custom=False)
        ids = [s.get("sequence_id") for s in data["sequences"] if isinstance(s, dict)]
        if len(set(map(str, ids))) != len(ids):
            self.add(relative, "sequences[].sequence_id", "a sequence_id is repeated (attributions and deep links "
                     "name a sequence by it)", WARNING)
        for key, kind in self.named_keys(config).items():
            if key not in data:
                self.add(relative, key, f"missing: the Metrics tab shows no {key}", WARNING)
            elif kind == "table" and not (isinstance(data[key], list) and all(
                    isinstance(r, dict) and isinstance(r.get("token"), str) and _is_number(r.get("weight"))
                    for r in data[key])):
                self.add(relative, key, "must be a list of {\"token\": str, \"weight\": number} (the table prints "
                         "the weight with toFixed)")
            elif kind == "plot" and not _histogram_shape(data[key]):
                self.add(relative, key, "must be {bin_edges, bin_values} of finite numbers with one edge more "
                         "than values")
        if contract.ACTIVATION_HISTOGRAM in data and not _histogram_shape(data[contract.ACTIVATION_HISTOGRAM]):
            self.add(relative, contract.ACTIVATION_HISTOGRAM, "must be {bin_edges, bin_values} of finite numbers "
                     "with one edge more than values")
        if "statistics" in data and not isinstance(data["statistics"], dict):
            self.add(relative, "statistics", "must be an object {statistic: number}")
        self._head_workbench(relative, data.get("workbench", {}))

    def _head_workbench(self, relative: str, extra: Any) -> None:
        """A head file's ``workbench`` keys: the exact window-score histogram the import reads back."""
        if not isinstance(extra, dict):
            self.add(relative, "workbench", "must be an object")
            return
        if "score_counts" not in extra:
            return
        bins, counts = extra.get("score_bins"), extra["score_counts"]
        if not (_is_int(bins) and 1 <= bins <= MAX_SCORE_BINS):
            self.add(relative, "workbench.score_bins", f"must be a whole number from 1 to {MAX_SCORE_BINS}, not "
                     f"{_shown(bins)}")
        elif not (isinstance(counts, list) and all(_is_pair(p) and 0 <= p[0] < bins and p[1] >= 0 for p in counts)):
            self.add(relative, "workbench.score_counts", f"must be a list of [bin, count] with 0 <= bin < {bins}")

    def custom_file(self, relative: str, n_intervals: int) -> None:
        data = self.load(relative, WARNING, "the frontend requests it for every head it opens; without it the "
                         "console logs a failed fetch")
        if data is None:
            return
        if not isinstance(data, dict) or not isinstance(data.get("sequences"), list):
            self.add(relative, "sequences", "missing or not a list ({\"sequences\": []} where there are none)")
            return
        for i, seq in enumerate(data["sequences"]):
            self.sequence(relative, f"sequences[{i}]", seq, n_intervals, custom=True)

    # -- server config and attributions ---------------------------------------------------------

    def static_files(self) -> None:
        server = self.load(contract.SERVER_CONFIG, WARNING, "the frontend requests it; without it the console "
                           "logs a failed fetch")
        if server is not None and not isinstance(server, dict):
            self.add(contract.SERVER_CONFIG, "(top level)", "must be an object ({} for a static tree)")
        elif server and "server_url" in server and not isinstance(server["server_url"], str):
            self.add(contract.SERVER_CONFIG, "server_url", "must be a string (the frontend posts to it)")
        file = contract.ATTRIBUTIONS_MANIFEST
        manifest = self.load(file, WARNING, "the frontend requests it; without it the console logs a failed fetch")
        if manifest is None:
            return
        if not isinstance(manifest, dict):
            self.add(file, "(top level)", "must be an object {\"L{l}H{h}S{sequence_id}\": {qk, ov}}")
            return
        for key, entry in manifest.items():
            if not MANIFEST_KEY.match(key):
                self.add(file, key, "is not of the form L{layer}H{head}S{sequence_id}; no sequence finds it",
                         WARNING)
            if not (isinstance(entry, dict) and all(isinstance(entry.get(t), list) and all(
                    _is_pair(p) for p in entry[t]) for t in ("qk", "ov"))):
                self.add(file, key, "needs both 'qk' and 'ov' lists of [query, key] (the frontend reads "
                         "entry.qk.length and entry.ov.length)")

    # -- umap/ -----------------------------------------------------------------------------------

    def umap(self, config: dict[str, Any]) -> None:
        if not config.get("has_umap"):
            return
        name = f"{contract.UMAP_DIR}/{contract.UMAP_SEQUENCES}"
        sequences = self.load(name, why="the UMAP tab shows an error without it")
        valid_index: Any = None
        if isinstance(sequences, list):
            valid_index = range(len(sequences))
            bad = [i for i, s in enumerate(sequences) if not (isinstance(s, list) and all(isinstance(t, str)
                                                                                            for t in s))]
        elif isinstance(sequences, dict):
            valid_index = set(sequences)
            bad = [k for k, s in sequences.items() if not (isinstance(s, list) and all(isinstance(t, str)
                                                                                         for t in s))]
        else:
            bad = []
            if sequences is not None:
                self.add(name, "(top level)", "must be a list of token lists, indexed by seq_idx")
        if bad:
            self.add(name, f"[{bad[0]}]", "must be a list of token strings")
        for pair in config.get("umap_heads", []):
            self.umap_head(f"{contract.UMAP_DIR}/{contract.head_file_name(pair[0], pair[1])}", valid_index)

    def umap_head(self, relative: str, valid_index: Any) -> None:
        data = self.load(relative, why="the UMAP tab shows an error without it")
        if data is None:
            return
        if not isinstance(data, dict):
            self.add(relative, "(top level)", "must be an object")
            return
        lists = {key: data.get(key) for key in ("seq_idx", "top_q", "top_k", "norms")}
        if any(not isinstance(v, list) for v in lists.values()) or len({len(v) for v in lists.values()}) != 1:
            lengths = {k: len(v) if isinstance(v, list) else None for k, v in lists.items()}
            self.add(relative, "seq_idx/top_q/top_k/norms", f"must be lists of one length ({lengths})")
            return
        n = len(lists["seq_idx"])
        for key in ("top_q", "top_k"):
            if not _whole_numbers(lists[key]):
                self.add(relative, key, "must hold whole numbers (token positions)")
        if not _finite_numbers(lists["norms"]):
            self.add(relative, "norms", "must hold finite numbers (the points are coloured by their rank)")
        idx = lists["seq_idx"]
        if valid_index is not None and not all(_indexes(valid_index, i) for i in idx):
            self.add(relative, "seq_idx", f"must index {contract.UMAP_SEQUENCES}")
        views = data.get("views")
        if "pca" not in data and "embeddings" not in data and not views:
            self.add(relative, "pca", "no pca, views or embeddings: the UMAP tab has nothing to draw")
        for key in ("pca", "embeddings"):
            if key in data:
                self._embeddings(relative, key, data[key], n)
        if views is not None:
            if not isinstance(views, list):
                self.add(relative, "views", "must be a list of {embeddings, n_neighbors, min_dist} (the frontend "
                         "iterates it; omit it when there is only PCA)")
            else:
                for i, view in enumerate(views):
                    if not isinstance(view, dict) or "embeddings" not in view:
                        self.add(relative, f"views[{i}]", "must be {embeddings, n_neighbors, min_dist}")
                        continue
                    self._embeddings(relative, f"views[{i}].embeddings", view["embeddings"], n)
                    for label in ("n_neighbors", "min_dist"):
                        if not _is_number(view.get(label)):
                            self.add(relative, f"views[{i}].{label}", "missing (the view chooser prints it)",
                                     WARNING)
        self._clusters(relative, data.get("clusters", []))

    def _embeddings(self, relative: str, field: str, embeddings: Any, n: int) -> None:
        if not isinstance(embeddings, dict) or not embeddings:
            self.add(relative, field, "must be an object {Q, K, O, V: {d0, d1, d2}}")
            return
        for kind, coords in embeddings.items():
            if kind not in contract.PROJECTION_KINDS:
                self.add(relative, f"{field}.{kind}", f"is not one of {', '.join(contract.PROJECTION_KINDS)}; the "
                         "UMAP tab ignores it", WARNING)
                continue
            axes = ("d0", "d1", "d2") if isinstance(coords, dict) and "d2" in coords else (
                ("d0", "d1") if isinstance(coords, dict) and "d0" in coords else ("x", "y"))
            if not isinstance(coords, dict) or any(
                    not _finite_numbers(coords.get(d)) or len(coords[d]) != n for d in axes):
                self.add(relative, f"{field}.{kind}", f"must hold {', '.join(axes)}: {n} finite numbers each")

    def _clusters(self, relative: str, clusters: Any) -> None:
        if not isinstance(clusters, list):
            self.add(relative, "clusters", "must be a list of {name, points: [[seq_idx, top_q, top_k]]}")
            return
        for i, cluster in enumerate(clusters):
            if not (isinstance(cluster, dict) and isinstance(cluster.get("name"), str)):
                self.add(relative, f"clusters[{i}]", "must be {name, points: [[seq_idx, top_q, top_k]]}")
            elif not (isinstance(cluster.get("points"), list) and all(
                    isinstance(p, list) and len(p) == 3 for p in cluster["points"])):
                self.add(relative, f"clusters[{i}].points", "must be a list of [seq_idx, top_q, top_k] (the "
                         "frontend finds a cluster's points by them)")


def sequence_problems(file: str, sequences: list[Any], custom: bool,
                      n_intervals: int = contract.MAX_INTERVALS) -> list[Problem]:
    """The errors of a list of sequences read on their own (a custom sequences file read again after opening)."""
    checker = _Checker(Path("."))
    for i, seq in enumerate(sequences):
        checker.sequence(file, f"sequences[{i}]", seq, n_intervals, custom)
    return [p for p in checker.problems if p.severity == ERROR]


def validate_tree(root: Path) -> list[Problem]:
    """Every way the tree at ``root`` breaks the HeadVis contract, errors and warnings (``[]``: none)."""
    checker = _Checker(Path(root))
    config = checker.config()
    checker.static_files()
    if config is None:
        return checker.problems
    checker.scatter(config)
    pattern = config.get("head_data_pattern", contract.HEAD_DATA_PATTERN)
    for layer, head in config["heads"]:
        checker.head_file(f"{contract.HEADS_DIR}/{contract.head_file_name(layer, head, pattern)}",
                          config["n_intervals"], config)
        checker.custom_file(f"{contract.CUSTOM_DIR}/{contract.head_file_name(layer, head)}", config["n_intervals"])
    checker.umap(config)
    return checker.problems


def check_tree(root: Path, strict: bool = True,
               tolerated: Optional[Callable[[Problem], bool]] = None) -> list[Problem]:
    """Raise :class:`CorruptFileError` naming the file and field of the first problems, if any.

    ``strict`` refuses warnings too (this project's export must have none but those ``tolerated``
    says it cannot avoid); otherwise only errors are refused. Returns the problems not refused.
    """
    problems = validate_tree(root)
    refused = [p for p in problems if (strict or p.severity == ERROR)
               and not (p.severity == WARNING and tolerated is not None and tolerated(p))]
    if refused:
        shown = "; ".join(str(p) for p in refused[:MAX_SHOWN])
        more = f" (and {len(refused) - MAX_SHOWN} more)" if len(refused) > MAX_SHOWN else ""
        raise CorruptFileError(f"The HeadVis data in {root} breaks the contract: {shown}{more}.")
    return [p for p in problems if p not in refused]
