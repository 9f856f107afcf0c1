"""Named clusters of a head's projected pairs (a lasso or box selection), kept with the scan's projections.

``<scan folder>/projections/clusters.json`` maps ``"L{l}H{h}"`` to a list of
``{"name", "indices"}`` (indices into the head's stored pairs); written
atomically under a lock. A cluster names pairs of one stored projection, so
clusters are dropped when the projections are recomputed.
"""

import threading
from pathlib import Path
from typing import Any

from headvis_core.errors import CorruptFileError, InputError
from headvis_core.heads import HeadRef
from headvis_core.projections.store import FILE, FOLDER
from headvis_core.storage import atomic_write_json, read_json

CLUSTERS = "clusters.json"
_lock = threading.Lock()


def _path(scan_folder: Path) -> Path:
    return Path(scan_folder) / FOLDER / CLUSTERS


def _key(head: HeadRef) -> str:
    return f"L{head.layer}H{head.head}"


def _read_all(scan_folder: Path) -> dict[str, Any]:
    path = _path(scan_folder)
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict) or data.get("projections_sha") != _projection_stamp(scan_folder):
        return {}  # made for projections that were recomputed since
    return data


def _projection_stamp(scan_folder: Path) -> str:
    path = Path(scan_folder) / FOLDER / FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        return ""
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def read_clusters(scan_folder: Path, head: HeadRef) -> list[dict[str, Any]]:
    """The named clusters of ``head`` (``[]`` where there are none)."""
    clusters = _read_all(scan_folder).get("heads", {}).get(_key(head), [])
    if not isinstance(clusters, list):
        raise CorruptFileError(f"{FOLDER}/{CLUSTERS} holds no list for head {head}.")
    return clusters


def save_cluster(scan_folder: Path, head: HeadRef, name: str, indices: list[int], n_pairs: int) -> dict[str, Any]:
    """Keep the pairs ``indices`` (of ``n_pairs`` stored) of ``head`` as the cluster ``name``.

    A cluster of the same name is replaced.
    """
    name = (name or "").strip()
    if not name:
        raise InputError("Give the cluster a name.")
    chosen = sorted({int(i) for i in indices})
    if not chosen:
        raise InputError("Select some points first (box or lasso on the projection).")
    if chosen[0] < 0 or chosen[-1] >= n_pairs:
        raise InputError(f"A selected pair is outside the head's {n_pairs} stored pairs.")
    if not (Path(scan_folder) / FOLDER / FILE).is_file():
        raise InputError("Compute the projections of this scan first.")
    with _lock:
        data = _read_all(scan_folder)
        heads = data.setdefault("heads", {})
        kept = [c for c in heads.get(_key(head), []) if c.get("name") != name]
        cluster = {"name": name, "indices": chosen}
        heads[_key(head)] = kept + [cluster]
        data["projections_sha"] = _projection_stamp(scan_folder)
        atomic_write_json(_path(scan_folder), data)
    return cluster


def delete_cluster(scan_folder: Path, head: HeadRef, name: str) -> bool:
    with _lock:
        data = _read_all(scan_folder)
        clusters = data.get("heads", {}).get(_key(head), [])
        kept = [c for c in clusters if c.get("name") != name]
        if len(kept) == len(clusters):
            return False
        data["heads"][_key(head)] = kept
        atomic_write_json(_path(scan_folder), data)
    return True
