"""The persistent result store: every computed result on disk, keyed by model and inputs.

Built on ``diskcache`` (a SQLite index plus one file per large value): it
gives atomic, concurrent-safe reads and writes from several processes (the
app and the CLI at once) and measures the store's volume. Its own culling
removes ten entries at a time (for a store of a few large results, all of
them), so this module evicts itself, one least-recently-used result at a
time until the store is under its cap, from the last-used times it keeps in
its index. On top of diskcache it adds what a result store for analyses needs:

* a key made of the result's kind, the model's fingerprint (config, tokenizer
  and a hash of every weight: :mod:`headvis_core.store.fingerprint`) and a
  digest of the inputs, so a model whose weights changed never finds the old
  results;
* an integrity check: each value is stored as a header (its key, kind, inputs
  and when it was computed) plus the pickled result, with a BLAKE2b digest
  of both. A value whose digest, key or pickle does not check out is deleted
  and recomputed, with a note saying so; it is never returned;
* a small index of the stored entries (kind, model, inputs, time, size) so
  that listing them reads no result.

Values are pickled: the store lives in the user's own cache folder and is
written only by this code, as the project's scan files are.

Where the store cannot be opened or written (a read-only or full disk, a
damaged database), :func:`cached` still computes and returns the result,
with a note; it never fails because of the store.
"""

import hashlib
import json
import os
import pickle
import shutil
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, Optional, TypeVar

import diskcache

from headvis_core import __version__
from headvis_core.paths import cache_root
from headvis_core.store.fingerprint import ModelFingerprint, describe_inputs, inputs_digest, model_fingerprint

T = TypeVar("T")

FORMAT_VERSION = 1  # bump to orphan every stored value after a change of the format or of what a kind computes
MAGIC = b"HVSTORE1"
DIGEST_BYTES = 32
DEFAULT_SIZE_GB = 2.0
STORE_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)


def store_dir() -> Path:
    """``$HEADVIS_STORE_DIR`` if set, else ``results/store`` under the cache root."""
    if os.environ.get("HEADVIS_STORE_DIR"):
        return Path(os.environ["HEADVIS_STORE_DIR"]).expanduser()
    return cache_root() / "results" / "store"


def default_size_limit() -> int:
    """``$HEADVIS_STORE_SIZE_GB`` (default 2) in bytes."""
    try:
        gigabytes = float(os.environ.get("HEADVIS_STORE_SIZE_GB", DEFAULT_SIZE_GB))
    except ValueError:
        gigabytes = DEFAULT_SIZE_GB
    if not gigabytes > 0:  # also refuses nan
        gigabytes = DEFAULT_SIZE_GB
    return int(gigabytes * 2**30)


@dataclass(frozen=True)
class StoredEntry:
    """One stored result, as listed (no value read)."""

    key: str
    kind: str
    model: str  # the model's name when it was computed
    fingerprint: str
    inputs: dict[str, Any]  # abbreviated, for people
    computed_at: float  # unix time
    compute_seconds: float
    size_bytes: int
    link: Optional[dict[str, Any]] = None  # {"page": "pages/1_Head_atlas.py", "query": {...}} that reopens it

    @property
    def computed_at_text(self) -> str:
        return format_time(self.computed_at)


@dataclass
class Stored(Generic[T]):
    """A result with where it came from: ``from_store`` and when it was computed."""

    value: T
    key: str
    kind: str
    computed_at: float
    compute_seconds: float
    from_store: bool
    notes: list[str] = field(default_factory=list)

    @property
    def computed_at_text(self) -> str:
        return format_time(self.computed_at)

    def describe(self) -> str:
        """``"computed at 2026-11-30 13:40 UTC (stored; took 20.1 s)"``, for a caption."""
        where = "from the store" if self.from_store else "just now"
        return f"computed at {self.computed_at_text} ({where}; took {self.compute_seconds:.1f} s)"


def format_time(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def make_key(kind: str, fingerprint: ModelFingerprint, inputs: Mapping[str, Any]) -> str:
    return f"{kind}:{fingerprint.digest}:{inputs_digest(inputs)}:v{FORMAT_VERSION}-{__version__}"


class CorruptEntry(Exception):
    """A stored value that does not check out (never shown to the user as is: it is recomputed)."""


def encode_value(header: dict[str, Any], value: Any) -> bytes:
    """``MAGIC | len(header) | header JSON | BLAKE2b(header JSON + pickle) | pickle``."""
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    digest = hashlib.blake2b(header_bytes + body, digest_size=DIGEST_BYTES).digest()
    return MAGIC + struct.pack(">I", len(header_bytes)) + header_bytes + digest + body


def decode_value(blob: Any, key: str) -> tuple[dict[str, Any], Any]:
    """The header and value of a stored blob; :class:`CorruptEntry` if anything does not check out."""
    if not isinstance(blob, (bytes, bytearray)) or not blob.startswith(MAGIC):
        raise CorruptEntry("it does not start like a stored result")
    start = len(MAGIC) + 4
    (length,) = struct.unpack(">I", blob[len(MAGIC):start])
    header_bytes = blob[start:start + length]
    digest = blob[start + length:start + length + DIGEST_BYTES]
    body = blob[start + length + DIGEST_BYTES:]
    if hashlib.blake2b(header_bytes + body, digest_size=DIGEST_BYTES).digest() != digest:
        raise CorruptEntry("its checksum does not match its content")
    try:
        header = json.loads(header_bytes)
    except ValueError as err:
        raise CorruptEntry(f"its header is unreadable ({err})") from err
    if header.get("key") != key:
        raise CorruptEntry("it belongs to another result")
    try:
        value = pickle.loads(body)
    except Exception as err:  # a class renamed since it was stored, and the like: recompute
        raise CorruptEntry(f"it cannot be read back ({type(err).__name__}: {err})") from err
    return header, value


class ResultStore:
    """Results on disk under ``directory``, at most ``size_limit`` bytes (LRU eviction)."""

    def __init__(self, directory: Optional[str | os.PathLike] = None, size_limit: Optional[int] = None):
        self.directory = Path(directory) if directory is not None else store_dir()
        self.size_limit = int(size_limit) if size_limit is not None else default_size_limit()
        self._lock = threading.Lock()
        self._results: Optional[diskcache.Cache] = None
        self._index: Optional[diskcache.Cache] = None
        self.open_note: Optional[str] = None  # why the store is not usable, or what was repaired

    # -- opening ---------------------------------------------------------------------------------

    def _open(self) -> tuple[diskcache.Cache, diskcache.Cache]:
        with self._lock:
            if self._results is None:
                try:
                    self._results, self._index = self._open_caches()
                except sqlite3.DatabaseError as err:
                    if isinstance(err, sqlite3.OperationalError):  # locked, read-only, missing folder
                        raise
                    # a damaged database ("file is not a database"): set it aside and start afresh
                    aside = self.directory.with_name(f"{self.directory.name}.damaged-{int(time.time())}")
                    shutil.move(str(self.directory), aside)
                    self.open_note = (f"The result store's database was damaged ({err}); it was moved to "
                                      f"{aside} and a new, empty store was started.")
                    self._results, self._index = self._open_caches()
            return self._results, self._index

    def _open_caches(self) -> tuple[diskcache.Cache, diskcache.Cache]:
        results = diskcache.Cache(str(self.directory / "results"), eviction_policy="none", cull_limit=0)
        index = diskcache.Cache(str(self.directory / "index"), eviction_policy="none", size_limit=2**40)
        return results, index

    def take_open_note(self) -> Optional[str]:
        """What opening the store repaired, once (then None)."""
        note, self.open_note = self.open_note, None
        return note

    def close(self) -> None:
        with self._lock:
            for cache in (self._results, self._index):
                if cache is not None:
                    cache.close()
            self._results = self._index = None

    # -- reading and writing ---------------------------------------------------------------------

    def load(self, key: str) -> tuple[dict[str, Any], Any]:
        """The header and value stored under ``key``; ``KeyError`` if none, :class:`CorruptEntry` if damaged."""
        results, _ = self._open()
        blob = results.get(key, default=None, retry=True)
        if blob is None:
            raise KeyError(key)
        try:
            header, value = decode_value(blob, key)
        except CorruptEntry:
            self.delete(key)
            raise
        self._touch(key, header)
        return header, value

    def _touch(self, key: str, header: dict[str, Any]) -> None:
        _, index = self._open()
        entry = index.get(key, default=None, retry=True)
        index.set(key, dict(entry if isinstance(entry, dict) else header, last_used=time.time()), retry=True)

    def save(self, key: str, header: dict[str, Any], value: Any) -> int:
        """Store ``value``; returns its size in bytes (0 where it is larger than the whole store)."""
        blob = encode_value(header, value)
        if len(blob) > self.size_limit:
            return 0
        results, index = self._open()
        results.set(key, blob, retry=True)
        index.set(key, dict(header, size_bytes=len(blob), last_used=time.time()), retry=True)
        self._evict(keep=key)
        return len(blob)

    def set_link(self, key: str, link: dict[str, Any]) -> None:
        """Record where the result under ``key`` is shown (listing only; the stored value is unchanged)."""
        _, index = self._open()
        entry = index.get(key, default=None, retry=True)
        if isinstance(entry, dict):
            index.set(key, dict(entry, link=link), retry=True)

    def _evict(self, keep: str) -> None:
        """Delete least-recently-used results (never ``keep``) until the store is under its cap."""
        results, index = self._open()
        if results.volume() <= self.size_limit:
            return
        by_use = sorted((e for e in self._headers() if e[0] != keep), key=lambda e: e[1].get("last_used", 0.0))
        for key, _ in by_use:
            self.delete(key)
            if results.volume() <= self.size_limit:
                return

    def _headers(self) -> list[tuple[str, dict[str, Any]]]:
        _, index = self._open()
        found = []
        for key in list(index.iterkeys()):
            header = index.get(key, retry=True)
            if isinstance(header, dict):
                found.append((key, header))
        return found

    def delete(self, key: str) -> None:
        results, index = self._open()
        results.delete(key, retry=True)
        index.delete(key, retry=True)

    def entries(self, fingerprint: Optional[str] = None, kind: Optional[str] = None,
                model: Optional[str] = None) -> list[StoredEntry]:
        """The stored results (newest first), optionally of one model fingerprint, kind or model name."""
        results, index = self._open()
        found = []
        for key, header in self._headers():
            if key not in results:  # evicted since: the index entry is stale
                index.delete(key, retry=True)
                continue
            entry = StoredEntry(key=key, kind=header["kind"], model=header["model"],
                                fingerprint=header["fingerprint"], inputs=header["inputs"],
                                computed_at=header["computed_at"], compute_seconds=header["compute_seconds"],
                                size_bytes=header.get("size_bytes", 0), link=header.get("link"))
            if ((fingerprint is None or entry.fingerprint == fingerprint) and (kind is None or entry.kind == kind)
                    and (model is None or entry.model == model)):
                found.append(entry)
        return sorted(found, key=lambda e: e.computed_at, reverse=True)

    def clear(self, fingerprint: Optional[str] = None, kind: Optional[str] = None,
              model: Optional[str] = None) -> int:
        """Delete the matching results (all with no filter); returns how many."""
        if fingerprint is None and kind is None and model is None:
            results, index = self._open()
            count = len(index)
            results.clear(retry=True)
            index.clear(retry=True)
            return count
        matching = self.entries(fingerprint=fingerprint, kind=kind, model=model)
        for entry in matching:
            self.delete(entry.key)
        return len(matching)

    def volume(self) -> int:
        """Bytes the stored results take on disk."""
        results, _ = self._open()
        return int(results.volume())


_default_store: Optional[ResultStore] = None
_default_lock = threading.Lock()


def default_store() -> ResultStore:
    """The process's store at :func:`store_dir` (reopened if ``$HEADVIS_STORE_DIR`` changed)."""
    global _default_store
    with _default_lock:
        if _default_store is None or _default_store.directory != store_dir():
            _default_store = ResultStore()
        return _default_store


def cached(kind: str, model: Any, inputs: Mapping[str, Any], compute: Callable[[], T], *,
           refresh: bool = False, store: Optional[ResultStore] = None,
           link: Optional[Mapping[str, Any]] = None) -> Stored[T]:
    """``compute()``'s result for ``kind`` on ``model`` with ``inputs``, from the store where it is there.

    Args:
        kind: what the result is (``"atlas"``, ``"kl_ranking"``, ...); one kind, one type of value.
        model: a ``LoadedModel`` or a ``TransformerBridge``; its fingerprint is part of the key.
        inputs: everything that defines the result (plain values, tensors, tables, dataclasses).
        compute: makes the result where it is not stored (or ``refresh`` is set).
        refresh: recompute and replace the stored result ("Recompute", ``--no-cache``).
        link: where the result is shown, ``{"page": "pages/1_Head_atlas.py", "query": {"n": 64}}``
            (JSON-able); kept with the entry so that a listing can link to it. A hit keeps the stored
            link unless a new one is given.

    A damaged stored value is deleted and recomputed, with a note in ``notes``;
    an unusable store is worked around, with a note. Errors of ``compute``
    itself propagate unchanged.
    """
    store = store or default_store()
    fingerprint = model_fingerprint(model)
    key = make_key(kind, fingerprint, inputs)
    notes: list[str] = []
    if not refresh:
        try:
            header, value = store.load(key)
            if link is not None and header.get("link") != dict(link):
                try:
                    store.set_link(key, dict(link))
                except STORE_ERRORS:
                    pass  # the link only helps listings
            notes.extend(filter(None, [store.take_open_note()]))
            return Stored(value=value, key=key, kind=kind, computed_at=header["computed_at"],
                          compute_seconds=header["compute_seconds"], from_store=True, notes=notes)
        except KeyError:
            pass
        except CorruptEntry as err:
            notes.append(f"The stored {kind} result was damaged ({err}); it was deleted and computed again.")
        except STORE_ERRORS as err:
            notes.append(f"The result store could not be read ({err}); the result was computed afresh.")
    started = time.time()
    value = compute()
    finished = time.time()
    header = {"key": key, "kind": kind, "model": fingerprint.label, "fingerprint": fingerprint.digest,
              "inputs": describe_inputs(inputs), "computed_at": finished, "compute_seconds": finished - started,
              "link": dict(link) if link is not None else None}
    try:
        if store.save(key, header, value) == 0:
            notes.append(f"This {kind} result is larger than the whole result store "
                         f"({store.size_limit / 2**30:.1f} GiB), so it was not stored.")
    except STORE_ERRORS as err:
        notes.append(f"The result could not be stored ({err}); it will be computed again next time.")
    except (pickle.PicklingError, TypeError, AttributeError) as err:
        notes.append(f"This {kind} result cannot be stored ({err}).")
    notes.extend(filter(None, [store.take_open_note()]))
    return Stored(value=value, key=key, kind=kind, computed_at=finished, compute_seconds=finished - started,
                  from_store=False, notes=notes)


def peek(kind: str, model: Any, inputs: Mapping[str, Any], store: Optional[ResultStore] = None
         ) -> Optional[Stored[Any]]:
    """The stored result for ``kind``/``model``/``inputs`` without computing anything, or None.

    For pages whose work runs on a button: a reopened URL shows the stored result at once, and the
    button calls :func:`cached` (``refresh=True`` for "Recompute"). A damaged value is deleted and
    None returned (the next computation stores a good one).
    """
    store = store or default_store()
    key = make_key(kind, model_fingerprint(model), inputs)
    return load_entry(key, store)


def load_entry(key: str, store: Optional[ResultStore] = None) -> Optional[Stored[Any]]:
    """The stored result under ``key`` (a link from the Home page), or None where it is gone or damaged."""
    store = store or default_store()
    try:
        header, value = store.load(key)
    except (KeyError, CorruptEntry, *STORE_ERRORS):
        return None
    return Stored(value=value, key=key, kind=header["kind"], computed_at=header["computed_at"],
                  compute_seconds=header["compute_seconds"], from_store=True)
