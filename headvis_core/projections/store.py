"""Projections stored with their scan: ``<scan folder>/projections/pca.npz``, written atomically.

The file records the SHA-256 of the scan data it was computed from; after the
scan is recomputed the old projections are reported stale, never shown.
Arrays: the heads, per-head offsets into the pair arrays, each pair's window
row, query, key, norm and attention weight, its coordinates per kind, and per head and kind the
PCA mean, components and explained variance; the windows' token ids; where
UMAP was asked for, its coordinates per kind (``umap_{kind}``).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from headvis_core.errors import CorruptFileError, InputError
from headvis_core.heads import HeadRef
from headvis_core.projections.pairs import KINDS
from headvis_core.projections.pca import PcaFit
from headvis_core.scan.store import MANIFEST, pack_arrays, unpack_arrays
from headvis_core.storage import atomic_write_bytes, read_json

FOLDER = "projections"
FILE = "pca.npz"


@dataclass
class HeadProjection:
    """One head's pairs and their PCA coordinates per kind."""

    head: HeadRef
    windows: np.ndarray  # [pair] corpus window index
    rows: np.ndarray  # [pair] row into ProjectionSet.window_tokens
    queries: np.ndarray
    keys: np.ndarray
    norms: np.ndarray
    coords: dict[str, np.ndarray]  # kind -> [pair, component]
    fits: dict[str, PcaFit]
    umap: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> [pair, component]; {} without UMAP
    weights: Optional[np.ndarray] = None  # [pair] A[q, k]; None in projections stored before it was kept


@dataclass
class ProjectionSet:
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def heads(self) -> list[HeadRef]:
        return [HeadRef(int(layer), int(head)) for layer, head in self.arrays["heads"]]

    @property
    def has_umap(self) -> bool:
        return all(f"umap_{kind}" in self.arrays for kind in KINDS)

    @property
    def skipped(self) -> dict[str, str]:
        """Heads without a projection and why (``"layer.head"`` -> reason)."""
        return dict(self.meta.get("skipped", {}))

    def head(self, head: HeadRef) -> HeadProjection:
        if str(head) in self.skipped:
            raise InputError(f"Head {head} has no projection: {self.skipped[str(head)]}")
        try:
            i = self.heads.index(head)
        except ValueError:
            raise InputError(f"Head {head} has no stored projection; compute the projections of this scan "
                             "for it first.") from None
        a = self.arrays
        start, stop = int(a["offsets"][i]), int(a["offsets"][i + 1])
        rows = a["pair_row"][start:stop]
        fits = {kind: PcaFit(a[f"mean_{kind}"][i], a[f"components_{kind}"][i], a[f"explained_{kind}"][i])
                for kind in KINDS}
        return HeadProjection(head, a["window_ids"][rows], rows, a["pair_query"][start:stop],
                              a["pair_key"][start:stop], a["pair_norm"][start:stop],
                              {kind: a[f"coords_{kind}"][start:stop] for kind in KINDS}, fits,
                              {kind: a[f"umap_{kind}"][start:stop] for kind in KINDS} if self.has_umap else {},
                              a["pair_weight"][start:stop] if "pair_weight" in a else None)


def _scan_digest(scan_folder: Path) -> str:
    try:
        return str(read_json(Path(scan_folder) / MANIFEST).get("sha256", ""))
    except (FileNotFoundError, CorruptFileError, AttributeError):
        return ""


def save_projections(scan_folder: Path, projections: ProjectionSet) -> Path:
    path = Path(scan_folder) / FOLDER / FILE
    meta = {**projections.meta, "scan_sha256": _scan_digest(scan_folder)}
    atomic_write_bytes(path, pack_arrays(projections.arrays, meta))
    projections.meta = meta
    return path


def load_projections(scan_folder: Optional[Path]) -> Optional[ProjectionSet]:
    """The projections stored with the scan in ``scan_folder``; ``None`` where there are none or they are stale."""
    if scan_folder is None:
        return None
    path = Path(scan_folder) / FOLDER / FILE
    if not path.is_file():
        return None
    arrays, meta = unpack_arrays(path.read_bytes(), f"{FOLDER}/{FILE}")
    if meta.get("scan_sha256") != _scan_digest(scan_folder):
        return None  # computed from an earlier version of the scan
    return ProjectionSet(arrays, meta)
