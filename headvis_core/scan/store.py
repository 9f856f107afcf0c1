"""Where scans live on disk: keys, manifests and checked, atomically written data files.

A scan's folder holds ``manifest.json`` and one ``<stage>-<hash>.npz`` data
file (stage ``partial`` for a checkpoint, ``complete`` for a result). The
data file is written first, named by its SHA-256, then the manifest that
names it, so a crash leaves either the old or the new complete pair; a
corrupt or partial file is detected by its checksum, never shown.

The stage is also written inside the checksummed data (``meta["stage"]``), so
the manifest's ``status`` is tied to the content: a manifest edited to say
``complete`` over a checkpoint is refused as corrupt, never opened as a result.
"""

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from headvis_core.data.corpus import Corpus
from headvis_core.errors import CorruptFileError
from headvis_core.models.loader import LoadedModel
from headvis_core.paths import results_dir
from headvis_core.scan.params import ScanParams
from headvis_core.storage import atomic_write_bytes, atomic_write_json, read_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def model_identity(loaded: LoadedModel) -> dict[str, str]:
    info = loaded.info
    return {"name": info.name, "source": info.source, "dtype": info.dtype}


def scan_key(loaded: LoadedModel, corpus: Corpus, params: ScanParams) -> str:
    """Folder name of a scan: readable prefix plus a hash of model + corpus + parameters."""
    payload = json.dumps({"format": FORMAT_VERSION, "model": model_identity(loaded), "corpus": corpus.fingerprint,
                          "params": asdict(params)}, sort_keys=True)
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
    label = Path(corpus.spec.rstrip("/")).name or corpus.spec
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in f"{loaded.info.name}-{label}")[:60]
    return f"{safe}-{digest}"


def scans_root() -> Path:
    """Where scans are stored by default (the pages and the CLI without ``--out``)."""
    return results_dir("scans")


def pack_arrays(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """One ``.npz`` holding ``arrays`` and ``meta`` (as JSON bytes under ``__meta__``; no pickles)."""
    buffer = io.BytesIO()
    meta_bytes = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    np.savez(buffer, __meta__=meta_bytes, **arrays)
    return buffer.getvalue()


def unpack_arrays(data: bytes, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The inverse of :func:`pack_arrays`; :class:`CorruptFileError` if ``data`` cannot be read."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
    except Exception as err:  # a damaged zip can fail in many ways
        raise CorruptFileError(f"The stored scan file {name} cannot be read ({err}).") from err
    return arrays, meta


def write_stage(folder: Path, stage: str, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                manifest_extra: dict[str, Any]) -> None:
    """Write a data file named by its hash, then the manifest pointing to it, then drop older files."""
    data = pack_arrays(arrays, {**meta, "stage": stage})
    digest = hashlib.sha256(data).hexdigest()
    name = f"{stage}-{digest[:16]}.npz"
    atomic_write_bytes(folder / name, data)
    manifest = {"format": FORMAT_VERSION, "status": stage, "file": name, "sha256": digest, "bytes": len(data),
                "updated": time.time(), **manifest_extra}
    atomic_write_json(folder / MANIFEST, manifest)
    for old in folder.glob("*.npz"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_stage(folder: Path) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
    """``(status, arrays, meta)`` of a stored scan, checking the manifest's checksum.

    Raises :class:`CorruptFileError` for a corrupt or partial file and
    ``FileNotFoundError`` when nothing is stored.
    """
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "file" not in manifest:
        raise CorruptFileError(f"The scan manifest in {folder.name} is not one this version can read.")
    path = folder / manifest["file"]
    if not path.is_file():
        raise CorruptFileError(f"The scan data file {manifest['file']} named by the manifest is missing.")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise CorruptFileError(f"The scan data file {path.name} is corrupt or incomplete (checksum mismatch).")
    arrays, meta = unpack_arrays(data, path.name)
    status = manifest.get("status")
    stored_stage = meta.pop("stage", status)  # files written before the stage was stored: the manifest's
    if status != stored_stage:
        raise CorruptFileError(f"The scan manifest in {folder.name} says {status!r} but its checksummed data "
                               f"is a {stored_stage!r} stage; the manifest was edited or damaged.")
    return status, arrays, meta


def clear_stage(folder: Path) -> None:
    """Delete the stored data files and manifest of a scan folder."""
    for path in list(folder.glob("*.npz")) + [folder / MANIFEST]:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class StoredScan:
    folder: Path
    status: str  # "complete", "partial" or "unreadable"
    model: str
    corpus: str
    windows: int
    updated: float

    @property
    def label(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.updated)) if self.updated else "?"
        return f"{self.model} on {self.corpus}: {self.windows} windows, {self.status} ({when})"


def _stored_scan(manifest_path: Path) -> StoredScan:
    """What a manifest says about its scan, or an ``unreadable`` entry."""
    folder = manifest_path.parent
    try:
        manifest = read_json(manifest_path)
        key = manifest.get("key", folder.name)
        return StoredScan(folder, status=manifest.get("status", "?"), model=str(manifest.get("model", "?")),
                          corpus=str(manifest.get("corpus", key)), windows=int(manifest.get("windows_done", 0)),
                          updated=float(manifest.get("updated", 0) or 0))
    except (CorruptFileError, OSError, AttributeError, ValueError, TypeError):
        return StoredScan(folder, "unreadable", "?", folder.name, 0, 0.0)


def list_scans(root: Optional[Path] = None, model_name: Optional[str] = None) -> list[StoredScan]:
    """Stored scans under ``root`` (newest first), optionally only those of ``model_name``.

    Reads manifests only; the data is checked when a scan is opened.
    """
    root = Path(root) if root is not None else scans_root()
    manifests = sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else []
    found = [_stored_scan(path) for path in manifests]
    if model_name is not None:
        found = [s for s in found if s.model == model_name]
    return sorted(found, key=lambda s: -s.updated)
