"""A contract validator for HeadVis ``data/`` trees, written from the facts in :mod:`.contract`.

:func:`validate_tree` lists every problem as ``file: field: what is wrong``;
:func:`check_tree` raises :class:`CorruptFileError` with the first few. It
checks that every file the frontend requests is there and is valid JSON (no
NaN or Infinity, no repeated key in an object), the config's required keys,
that the scatter's default axes name columns of ``scatter_data.json``, that
``custom_tables``/``custom_plots`` name the head-file keys without repeats,
and, in every head and custom-sequence file, integer intervals in
``1..n_intervals`` (-1 for custom sequences), ``seq_len == len(tokens)`` and
COO indices inside ``[0, seq_len ** 2)`` with finite values in [0, 1].
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from headvis_core.errors import CorruptFileError
from headvis_core.headvis_format import contract

REQUIRED_TABLES = ("top_query_tokens", "top_key_tokens")
REQUIRED_PLOTS = ("qk_distance_histogram",)
PCA_KINDS = ("Q", "K", "O", "V")
MAX_SHOWN = 5


@dataclass(frozen=True)
class Problem:
    file: str
    field: str
    message: str

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


class _Checker:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.problems: list[Problem] = []

    def add(self, file: str, field: str, message: str) -> None:
        self.problems.append(Problem(file, field, message))

    def load(self, relative: str) -> Optional[Any]:
        path = self.root / relative
        if not path.is_file():
            self.add(relative, "(file)", "missing (the frontend requests it)")
            return None
        try:
            return load_strict(path)
        except _DuplicateKey as err:
            self.add(relative, str(err), "key repeated in one object")
        except (ValueError, UnicodeDecodeError) as err:
            self.add(relative, "(file)", f"not valid JSON ({err})")
        return None

    # -- config and scatter -------------------------------------------------------------------

    def config(self) -> Optional[dict[str, Any]]:
        config = self.load(contract.CONFIG)
        if config is None:
            return None
        if not isinstance(config, dict):
            self.add(contract.CONFIG, "(top level)", "must be an object")
            return None
        missing = [k for k in contract.CONFIG_REQUIRED if k not in config]
        for key in missing:
            self.add(contract.CONFIG, key, "missing")
        for key in ("n_layers", "n_heads", "n_intervals"):
            if key in config and not (_is_int(config[key]) and config[key] >= 1):
                self.add(contract.CONFIG, key, f"must be a whole number >= 1, not {config[key]!r}")
        pattern = config.get("head_data_pattern")
        if pattern is not None and ("{layer}" not in str(pattern) or "{head}" not in str(pattern)):
            self.add(contract.CONFIG, "head_data_pattern", f"{pattern!r} must contain {{layer}} and {{head}}")
        if missing or any(p.file == contract.CONFIG for p in self.problems):
            return None
        self._heads_list(config)
        self._tables(config)
        return config

    def _heads_list(self, config: dict[str, Any]) -> None:
        heads = config["heads"]
        if not isinstance(heads, list) or not heads:
            self.add(contract.CONFIG, "heads", "must be a non-empty list of [layer, head]")
            return
        seen = set()
        for i, pair in enumerate(heads):
            if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(v) for v in pair)
                    and 0 <= pair[0] < config["n_layers"] and 0 <= pair[1] < config["n_heads"]):
                self.add(contract.CONFIG, f"heads[{i}]", f"{pair!r} is not a [layer, head] inside the model")
            elif tuple(pair) in seen:
                self.add(contract.CONFIG, f"heads[{i}]", f"{pair!r} is listed twice")
            else:
                seen.add(tuple(pair))

    def _tables(self, config: dict[str, Any]) -> None:
        keys_seen: set[str] = set()
        for field, required in (("custom_tables", REQUIRED_TABLES), ("custom_plots", REQUIRED_PLOTS)):
            entries = config[field]
            if not isinstance(entries, list):
                self.add(contract.CONFIG, field, "must be a list of {key, label}")
                continue
            for i, entry in enumerate(entries):
                if not (isinstance(entry, dict) and isinstance(entry.get("key"), str)
                        and isinstance(entry.get("label"), str)):
                    self.add(contract.CONFIG, f"{field}[{i}]", "must be {\"key\": str, \"label\": str}")
                    continue
                if entry["key"] in keys_seen:
                    self.add(contract.CONFIG, f"{field}[{i}].key", f"{entry['key']!r} is repeated (the frontend "
                             "crashes on duplicate keys)")
                keys_seen.add(entry["key"])
            named = {e.get("key") for e in entries if isinstance(e, dict)}
            for key in required:
                if key not in named:
                    self.add(contract.CONFIG, field, f"does not name {key!r}, so the frontend shows none of them")

    def scatter(self, config: dict[str, Any]) -> None:
        rows = self.load(contract.SCATTER)
        if rows is None:
            return
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            self.add(contract.SCATTER, "(top level)", "must be a non-empty list of objects")
            return
        columns = list(rows[0])
        for axis in ("default_x", "default_y"):
            name = config["scatter"].get(axis) if isinstance(config["scatter"], dict) else None
            if name not in columns:
                self.add(contract.CONFIG, f"scatter.{axis}", f"{name!r} is not a column of {contract.SCATTER} "
                         f"(columns: {', '.join(map(str, columns))}); the plot would be empty")
        heads = {tuple(h) for h in config["heads"]}
        seen = set()
        for i, row in enumerate(rows):
            if not (_is_int(row.get("layer")) and _is_int(row.get("head"))):
                self.add(contract.SCATTER, f"[{i}].layer/head", "must be whole numbers")
                continue
            seen.add((row["layer"], row["head"]))
            for key, value in row.items():
                if key not in ("layer", "head") and value is not None and not _is_number(value):
                    self.add(contract.SCATTER, f"[{i}].{key}", f"{value!r} is not a finite number")
        for layer, head in sorted(heads - seen)[:MAX_SHOWN]:
            self.add(contract.SCATTER, f"L{layer}H{head}", "no row for this head of config.heads")

    # -- head files ----------------------------------------------------------------------------

    def sequence(self, file: str, where: str, seq: Any, n_intervals: int, custom: bool) -> None:
        if not isinstance(seq, dict):
            self.add(file, where, "must be an object")
            return
        for key in contract.SEQUENCE_REQUIRED:
            if key not in seq:
                self.add(file, f"{where}.{key}", "missing")
        if any(key not in seq for key in contract.SEQUENCE_REQUIRED):
            return
        if not _is_int(seq["sequence_id"]):
            self.add(file, f"{where}.sequence_id", f"{seq['sequence_id']!r} is not a whole number")
        interval = seq["interval"]
        if custom:
            ok, allowed = interval == contract.CUSTOM_INTERVAL, f"{contract.CUSTOM_INTERVAL} (custom)"
        else:
            ok, allowed = _is_int(interval) and 1 <= interval <= n_intervals, f"1..{n_intervals}"
        if not (_is_int(interval) and ok):
            self.add(file, f"{where}.interval", f"{interval!r} must be the JSON integer {allowed}")
        tokens, seq_len = seq["tokens"], seq["seq_len"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            self.add(file, f"{where}.tokens", "must be a list of strings")
            return
        if not _is_int(seq_len) or seq_len != len(tokens):
            self.add(file, f"{where}.seq_len", f"{seq_len!r} is not len(tokens) = {len(tokens)}")
            return
        self._coo(file, where, seq, seq_len)
        if not _is_number(seq["max_activation"]):
            self.add(file, f"{where}.max_activation", f"{seq['max_activation']!r} is not a finite number")

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

    def head_file(self, relative: str, n_intervals: int, config: dict[str, Any]) -> None:
        data = self.load(relative)
        if data is None:
            return
        if not isinstance(data, dict) or not isinstance(data.get("sequences"), list):
            self.add(relative, "sequences", "missing or not a list")
            return
        for i, seq in enumerate(data["sequences"]):
            self.sequence(relative, f"sequences[{i}]", seq, n_intervals, custom=False)
        ids = [s.get("sequence_id") for s in data["sequences"] if isinstance(s, dict)]
        if len(set(map(str, ids))) != len(ids):
            self.add(relative, "sequences[].sequence_id", "a sequence_id is repeated")
        for entry in config["custom_tables"]:
            table = data.get(entry["key"])
            if not isinstance(table, list) or not all(isinstance(r, dict) and isinstance(r.get("token"), str)
                                                      and _is_number(r.get("weight")) for r in table):
                self.add(relative, entry["key"], "must be a list of {\"token\": str, \"weight\": number}")
        for entry in config["custom_plots"]:
            plot = data.get(entry["key"])
            if not (isinstance(plot, dict) and isinstance(plot.get("bin_edges"), list)
                    and isinstance(plot.get("bin_values"), list)
                    and len(plot["bin_edges"]) == len(plot["bin_values"]) + 1
                    and _finite_numbers(plot["bin_edges"]) and _finite_numbers(plot["bin_values"])):
                self.add(relative, entry["key"], "must be {bin_edges, bin_values} of finite numbers with one edge "
                         "more than values")

    def custom_file(self, relative: str, n_intervals: int) -> None:
        data = self.load(relative)
        if data is None:
            return
        if not isinstance(data, dict) or not isinstance(data.get("sequences"), list):
            self.add(relative, "sequences", "missing or not a list ({\"sequences\": []} where there are none)")
            return
        for i, seq in enumerate(data["sequences"]):
            self.sequence(relative, f"sequences[{i}]", seq, n_intervals, custom=True)

    # -- the rest ------------------------------------------------------------------------------

    def static_files(self) -> None:
        server = self.load(contract.SERVER_CONFIG)
        if server is not None and not isinstance(server, dict):
            self.add(contract.SERVER_CONFIG, "(top level)", "must be an object ({} for a static tree)")
        manifest = self.load(contract.ATTRIBUTIONS_MANIFEST)
        if manifest is None:
            return
        # an object keyed by head (or a list) of entries, each with both lists
        entries = manifest.values() if isinstance(manifest, dict) else manifest
        if not isinstance(manifest, (dict, list)):
            self.add(contract.ATTRIBUTIONS_MANIFEST, "(top level)", "must be an object or a list")
            return
        for i, entry in enumerate(entries):
            if not (isinstance(entry, dict) and isinstance(entry.get("qk"), list)
                    and isinstance(entry.get("ov"), list)):
                self.add(contract.ATTRIBUTIONS_MANIFEST, f"[{i}]", "each entry needs both 'qk' and 'ov' lists")

    def umap(self, config: dict[str, Any]) -> None:
        if not config.get("has_umap"):
            return
        sequences = self.load(f"{contract.UMAP_DIR}/{contract.UMAP_SEQUENCES}")
        n_sequences = len(sequences) if isinstance(sequences, list) else None
        if sequences is not None and n_sequences is None:
            self.add(f"{contract.UMAP_DIR}/{contract.UMAP_SEQUENCES}", "(top level)", "must be a list")
        for pair in config["umap_heads"]:
            relative = f"{contract.UMAP_DIR}/{contract.head_file_name(pair[0], pair[1])}"
            data = self.load(relative)
            if data is None:
                continue
            lengths = {key: len(data.get(key) or []) for key in ("seq_idx", "top_q", "top_k", "norms")}
            if len(set(lengths.values())) != 1 or any(not isinstance(data.get(k), list) for k in lengths):
                self.add(relative, "seq_idx/top_q/top_k/norms", f"must be lists of one length ({lengths})")
                continue
            n = lengths["seq_idx"]
            idx = data["seq_idx"]
            if n_sequences is not None and not (_whole_numbers(idx) and (not idx or 0 <= min(idx)
                                                                         and max(idx) < n_sequences)):
                self.add(relative, "seq_idx", f"must index {contract.UMAP_SEQUENCES} (0..{n_sequences - 1})")
            pca = data.get("pca")
            for kind in PCA_KINDS:
                coords = pca.get(kind) if isinstance(pca, dict) else None
                if not isinstance(coords, dict) or any(
                        not _finite_numbers(coords.get(d)) or len(coords[d]) != n for d in ("d0", "d1", "d2")):
                    self.add(relative, f"pca.{kind}", f"must hold d0, d1, d2: {n} finite numbers each")
            views = data.get("views")
            if views is not None and not isinstance(views, dict):
                self.add(relative, "views", "must be an object of views (omit it when there is only PCA)")
            for method, view in (views or {}).items() if isinstance(views, dict) else ():
                for kind in PCA_KINDS:
                    coords = view.get(kind) if isinstance(view, dict) else None
                    if not isinstance(coords, dict) or any(
                            not _finite_numbers(coords.get(d)) or len(coords[d]) != n for d in ("d0", "d1", "d2")):
                        self.add(relative, f"views.{method}.{kind}", f"must hold d0, d1, d2: {n} finite numbers each")
            if not isinstance(data.get("clusters"), list):
                self.add(relative, "clusters", "must be a list")


def validate_tree(root: Path) -> list[Problem]:
    """Every way the tree at ``root`` breaks the HeadVis contract (``[]``: none)."""
    checker = _Checker(Path(root))
    config = checker.config()
    checker.static_files()
    if config is None:
        return checker.problems
    checker.scatter(config)
    for layer, head in config["heads"]:
        name = contract.head_file_name(layer, head, config["head_data_pattern"])
        checker.head_file(f"{contract.HEADS_DIR}/{name}", config["n_intervals"], config)
        checker.custom_file(f"{contract.CUSTOM_DIR}/{name}", config["n_intervals"])
    checker.umap(config)
    return checker.problems


def check_tree(root: Path) -> None:
    """Raise :class:`CorruptFileError` naming the file and field of the first problems, if any."""
    problems = validate_tree(root)
    if problems:
        shown = "; ".join(str(p) for p in problems[:MAX_SHOWN])
        more = f" (and {len(problems) - MAX_SHOWN} more)" if len(problems) > MAX_SHOWN else ""
        raise CorruptFileError(f"The HeadVis data in {root} breaks the contract: {shown}{more}.")
