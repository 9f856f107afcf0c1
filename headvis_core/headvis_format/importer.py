"""Read a HeadVis ``data/`` tree (ours, or one from Neuronpedia's pipeline) into what the Dataset examples page shows.

:class:`ImportedScan` answers the same lookups as
:class:`headvis_core.scan.result.ScanResult` (deciles, top examples, top
tokens, distance and score histograms, head summary) from the tree alone, with
no model. The tree is checked against the contract when opened
(:func:`headvis_core.headvis_format.validate.check_tree`): one the frontend
could not show is refused naming the file and field; warnings (a missing
``custom_sequences/`` file, no scatter axes, ``null`` metrics, as Neuronpedia's
``compute-head-metrics.py`` writes) are kept in :attr:`ImportedScan.warnings`.

What a tree carries decides what comes back: from a tree this project wrote,
the ``workbench`` keys give back the exact deciles (window counts and score
ranges), window scores, top-window ranks and the token counts. From any other
tree the deciles are its intervals (``n_intervals`` of them, Neuronpedia's 5 by
default) and a window's score is its ``max_activation``; the score histogram is
the tree's ``histogram`` (every window, where the producer wrote it) or else
that of the listed sequences; token counts are unknown and a token's weight is
the producer's (Neuronpedia: attention mass summed over its sequences); the
distance histogram's bins, where wider than one position (Neuronpedia's are
0, 1, 2, 4, 8, ...), are spread evenly over the distances they hold.
``n_layers``/``n_heads`` come from the config or, where it has none, from its
``heads``; the older head-file format (a bare list of sequences) is read too.
"""

from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from headvis_core.errors import CorruptFileError, InputError
from headvis_core.heads import HeadRef
from headvis_core.headvis_format import contract
from headvis_core.headvis_format.sequences import sparse_from_record
from headvis_core.headvis_format.validate import Problem, check_tree, load_strict
from headvis_core.scan.params import ScanParams
from headvis_core.scan.result import DecileBucket, ScanExample, load_scan
from headvis_core.scan.state import bin_deciles

DEFAULT_SCORE_BINS = 4096


def _window_id(sequence_id: Any) -> int | str:
    """A sequence's id as the page names it: a whole number where it is one, else the producer's string as it is
    (a custom sequence in a HeadVis tree is ``"c1"``, ``"c2"``...; other producers may use any string)."""
    if isinstance(sequence_id, int) and not isinstance(sequence_id, bool):
        return sequence_id
    text = str(sequence_id)
    return int(text) if text.isdigit() else text


def example_from_record(record: dict[str, Any], decile: int) -> ScanExample:
    """A stored HeadVis sequence as the page's :class:`ScanExample` (token ids are not in the format: -1).

    Its ``window_index`` is the sequence's id: a whole number, or a string such as a custom sequence's ``"c1"``.
    """
    attention = sparse_from_record(record)
    values = attention.values.copy()
    values[0] = 0.0
    q, j = np.unravel_index(int(np.argmax(values)), values.shape)
    score = float(record.get("score", record["max_activation"]))
    return ScanExample(window_index=_window_id(record["sequence_id"]), score=score, decile=decile,
                       token_ids=np.full(int(record["seq_len"]), -1, np.int64), str_tokens=list(record["tokens"]),
                       attention=attention, max_query=int(q), max_key=int(attention.keys[q, j]))


class ImportedScan:
    """A HeadVis tree read as a scan result (see the module docstring); head files are read on first use."""

    def __init__(self, root: Path, config: dict[str, Any], scatter: list[dict[str, Any]],
                 warnings: tuple[Problem, ...] = ()):
        self.path = Path(root)
        self.config = config
        self.scatter = scatter
        self.warnings = warnings
        self._heads: dict[HeadRef, dict[str, Any]] = {}
        extra = config.get("workbench") or {}
        self.meta = {"model": {"name": str(config.get("model_name") or "unnamed model")},
                     "n_layers": self.n_layers, "n_heads": self.n_heads,
                     "key": extra.get("scan_key") or self.path.name,
                     "corpus": {"description": str(extra.get("corpus") or f"HeadVis data in {self.path.name}")},
                     "created": str(extra.get("created") or "?"), "imported": True}

    has_model_data = False  # no token ids, no corpus windows: features that rerun windows need a real scan

    @property
    def n_layers(self) -> int:
        return int(self.config.get("n_layers") or 1 + max(layer for layer, _ in self.config["heads"]))

    @property
    def n_heads(self) -> int:
        return int(self.config.get("n_heads") or 1 + max(head for _, head in self.config["heads"]))

    @property
    def n_intervals(self) -> int:
        n_intervals = self.config["n_intervals"]
        if not (isinstance(n_intervals, int) and 1 <= n_intervals <= contract.MAX_INTERVALS):  # opened unchecked
            raise CorruptFileError(f"{contract.CONFIG}: n_intervals must be 1 to {contract.MAX_INTERVALS}.")
        return n_intervals

    @cached_property
    def n_windows(self) -> int:
        extra = self.config.get("workbench") or {}
        if "n_windows" in extra:
            return int(extra["n_windows"])
        first = self.head_data(HeadRef(*self.config["heads"][0]))
        if contract.ACTIVATION_HISTOGRAM in first:  # every window's score, where the producer wrote it
            return int(sum(first[contract.ACTIVATION_HISTOGRAM]["bin_values"]))
        return len(first["sequences"])

    @property
    def params(self) -> ScanParams:
        extra = self.config.get("workbench") or {}
        first = self.head_data(HeadRef(*self.config["heads"][0]))["sequences"]
        longest = max((int(s["seq_len"]) for s in first), default=2)
        return ScanParams(window_len=int(extra.get("window_len", max(longest - 1, 2))), max_windows=None,
                          top_k_keys=int(extra.get("top_k_keys", extra.get("keys_per_query", 4))),
                          examples_per_decile=int(extra.get("examples_per_decile", 4)),
                          top_examples=int(extra.get("top_examples", 8)))

    def _check(self, head: HeadRef) -> HeadRef:
        head.check(self.n_layers, self.n_heads)
        if [head.layer, head.head] not in self.config["heads"]:
            raise InputError(f"Head {head} is not in this HeadVis data (it lists {len(self.config['heads'])} heads).")
        return head

    def head_data(self, head: HeadRef) -> dict[str, Any]:
        """The parsed ``heads/L{l}H{h}.json`` of ``head``."""
        self._check(head)
        if head not in self._heads:
            name = self._head_file(head)
            try:
                data = load_strict(self.path / contract.HEADS_DIR / name)
            except (OSError, ValueError) as err:
                raise CorruptFileError(f"{contract.HEADS_DIR}/{name} cannot be read ({err}).") from err
            self._heads[head] = {"sequences": data} if isinstance(data, list) else data
        return self._heads[head]

    def _head_file(self, head: HeadRef) -> str:
        """The name of ``head``'s file in ``heads/``; refused where the pattern or a link leads out of the tree."""
        pattern = self.config.get("head_data_pattern", contract.HEAD_DATA_PATTERN)
        problem = contract.head_pattern_problem(pattern)
        if problem is not None:
            raise CorruptFileError(f"{contract.CONFIG}: head_data_pattern {problem}.")
        name = contract.head_file_name(head.layer, head.head, pattern)
        try:
            inside = (self.path / contract.HEADS_DIR / name).resolve().is_relative_to(self.path.resolve())
        except OSError as err:
            raise CorruptFileError(f"{contract.HEADS_DIR}/{name} cannot be read ({err.strerror or err}).") from err
        if not inside:
            raise CorruptFileError(f"{contract.HEADS_DIR}/{name} leads outside the HeadVis data (a link); it is "
                                   "not read.")
        return name

    # -- the lookups of ScanResult ------------------------------------------------------------

    def _score_counts(self, head: HeadRef) -> np.ndarray:
        data = self.head_data(head)
        extra = data.get("workbench") or {}
        if "score_counts" in extra:
            counts = np.zeros(int(extra["score_bins"]), np.int64)
            for bin_index, count in extra["score_counts"]:
                counts[int(bin_index)] = int(count)
            return counts
        histogram = data.get(contract.ACTIVATION_HISTOGRAM)
        if histogram is not None and np.allclose(histogram["bin_edges"],
                                                 np.linspace(0.0, 1.0, len(histogram["bin_edges"]))):
            return np.asarray(histogram["bin_values"], dtype=np.float64).round().astype(np.int64)
        scores = np.array([float(s["max_activation"]) for s in data["sequences"]])
        return np.histogram(np.clip(scores, 0, 1), bins=DEFAULT_SCORE_BINS, range=(0.0, 1.0))[0]

    def score_histogram(self, head: HeadRef) -> tuple[np.ndarray, np.ndarray]:
        counts = self._score_counts(head)
        return np.linspace(0.0, 1.0, len(counts) + 1), counts

    def deciles(self, head: HeadRef) -> list[DecileBucket]:
        """The head's intervals, highest first, with the sampled sequences of each (best score first)."""
        data = self.head_data(head)
        sampled = [s for s in data["sequences"] if s.get("sample", True)]
        counts = self._score_counts(head)
        exact = "score_counts" in (data.get("workbench") or {})
        of_bin = bin_deciles(counts)
        edges = np.linspace(0.0, 1.0, len(counts) + 1)
        buckets = []
        for interval in range(self.n_intervals, 0, -1):
            mine = [s for s in sampled if int(s["interval"]) == interval]
            examples = [example_from_record(s, interval) for s in mine]
            examples.sort(key=lambda ex: -ex.score)  # stable: file order among equal scores
            if exact and self.n_intervals == 10:
                in_bucket = np.nonzero((of_bin == interval) & (counts > 0))[0]
                n_windows = int(counts[in_bucket].sum())
                low = float(edges[in_bucket[0]]) if len(in_bucket) else float("nan")
                high = float(edges[in_bucket[-1] + 1]) if len(in_bucket) else float("nan")
            else:
                scores = [ex.score for ex in examples]
                n_windows = len(examples)
                low, high = (min(scores), max(scores)) if scores else (float("nan"), float("nan"))
            buckets.append(DecileBucket(interval, n_windows, low, high, examples))
        return buckets

    def top_examples(self, head: HeadRef) -> list[ScanExample]:
        """Sequences marked as top windows (by rank), or the highest-scoring listed ones where none are marked."""
        data = self.head_data(head)
        ranked = [s for s in data["sequences"] if "top_rank" in s]
        if ranked:
            ranked.sort(key=lambda s: int(s["top_rank"]))
        else:
            ranked = sorted(data["sequences"], key=lambda s: -float(s["max_activation"]))[:self.params.top_examples]
        return [example_from_record(s, int(s["interval"])) for s in ranked]

    def top_tokens(self, head: HeadRef, role: str = "query", n: int = 20, min_count: int = 5) -> pd.DataFrame:
        """The tree's top query or key tokens; rows below ``min_count`` are dropped where counts are known."""
        if role not in ("query", "key"):
            raise ValueError("role must be 'query' or 'key'")
        rows = self.head_data(head).get("top_query_tokens" if role == "query" else "top_key_tokens") or []
        table = pd.DataFrame({
            "token": [str(r["token"]) for r in rows],
            "token_id": [int(r.get("token_id", -1)) for r in rows],
            "count": [r.get("count", np.nan) for r in rows],
            "mean_attention": [float(r["weight"]) for r in rows],
            "total_attention": [r.get("total", np.nan) for r in rows],
        })
        known = table["count"].notna()
        if known.all() and (table["count"] >= min_count).any():
            table = table[table["count"] >= min_count]
        return table.head(n).reset_index(drop=True)

    def distance_histogram(self, head: HeadRef) -> np.ndarray:
        """Share of attention at each distance 0, 1, ...; a bin wider than one distance is spread evenly over it."""
        plot = self.head_data(head).get(contract.DISTANCE_PLOT)
        if plot is None:
            return np.zeros(1)
        values = np.asarray(plot["bin_values"], dtype=np.float64)
        edges = np.asarray(plot["bin_edges"], dtype=np.float64)
        widths = np.maximum(np.ceil(edges[1:]) - np.ceil(edges[:-1]), 1).astype(np.int64)
        shares = np.repeat(values / widths, widths)
        return shares / max(shares.sum(), 1e-12)

    def head_summary(self) -> pd.DataFrame:
        """One row per head from ``scatter_data.json`` (its metric columns, whatever they are; ``null`` -> NaN)."""
        table = pd.DataFrame(self.scatter).sort_values(["layer", "head"], kind="stable").reset_index(drop=True)
        for column in table.columns.drop(["layer", "head"]):
            table[column] = pd.to_numeric(table[column], errors="coerce")
        table.insert(2, "name", [f"{layer}.{head}" for layer, head in zip(table["layer"], table["head"])])
        return table

    def examples_table(self, head: HeadRef) -> pd.DataFrame:
        def row(kind: str, decile: int | str, ex: ScanExample) -> dict[str, Any]:
            return {"set": kind, "decile": decile, "window": ex.window_index, "score": ex.score,
                    "query": f"{ex.max_query}:{ex.str_tokens[ex.max_query]}",
                    "key": f"{ex.max_key}:{ex.str_tokens[ex.max_key]}", "text": "".join(ex.str_tokens[1:])}

        rows = [row("top", "", ex) for ex in self.top_examples(head)]
        rows += [row("decile", b.decile, ex) for b in self.deciles(head) for ex in b.examples]
        return pd.DataFrame(rows)


def import_headvis(root: Path, check: bool = True) -> ImportedScan:
    """Open the HeadVis tree at ``root``; with ``check`` the whole tree is validated first."""
    root = Path(root).expanduser()
    if not contract.is_tree(root):
        raise InputError(f"{root} is not HeadVis data: it needs config.json and a heads/ folder.")
    warnings = tuple(check_tree(root, strict=False)) if check else ()
    config = load_strict(root / contract.CONFIG)
    scatter = load_strict(root / contract.SCATTER)
    return ImportedScan(root, config, scatter, warnings)


def open_any_scan(path: Path) -> Any:
    """A stored scan folder (``ScanResult``) or a HeadVis ``data/`` tree (``ImportedScan``), whichever ``path`` is."""
    path = Path(path).expanduser()
    if contract.is_tree(path):
        return import_headvis(path)
    return load_scan(path)


def is_imported(result: Any) -> Optional[bool]:
    return isinstance(result, ImportedScan)
