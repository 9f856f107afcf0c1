"""Custom sequences: prompts typed for one head, kept with the scan in HeadVis's ``custom_sequences`` shape.

They live in ``<scan folder>/custom_sequences/L{l}H{h}.json`` as
``{"sequences": [...]}`` (the same place in an imported HeadVis tree), each a
HeadVis sequence with ``interval`` -1 (the frontend's custom tab, ``?interval=-1``)
plus the typed ``text``. Ids count up from 1; in a HeadVis tree (which the
frontend may serve as it is) they are written ``c1``, ``c2``..., the frontend's
mark of a custom sequence, and the export writes a scan's the same way. Every
change rewrites the file atomically under a per-file lock, so two sessions
adding at once both keep their sequence.
"""

import threading
from pathlib import Path
from typing import Any

from headvis_core.errors import CorruptFileError, InputError
from headvis_core.heads import HeadRef
from headvis_core.headvis_format.contract import (
    CUSTOM_DIR,
    CUSTOM_ID_PREFIX,
    CUSTOM_INTERVAL,
    custom_sequence_id,
    dumps,
    head_file_name,
    is_tree,
)
from headvis_core.headvis_format.sequences import DEFAULT_KEYS_PER_QUERY, DEFAULT_THRESHOLD, sequence_record
from headvis_core.headvis_format.validate import sequence_problems
from headvis_core.hooks import capture, pattern_hook
from headvis_core.models.loader import LoadedModel
from headvis_core.sparse_attention import sparse_from_dense
from headvis_core.storage import atomic_write_text, read_json
from headvis_core.tokens import tokenize_prompt

MAX_CUSTOM_TOKENS = 512  # a custom sequence is drawn in full: keep it readable and its file small

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(str(Path(path).resolve()), threading.Lock())


def custom_path(folder: Path, head: HeadRef) -> Path:
    return Path(folder) / CUSTOM_DIR / head_file_name(head.layer, head.head)


def read_custom_sequences(folder: Path, head: HeadRef) -> list[dict[str, Any]]:
    """The custom sequences stored for ``head`` (``[]`` where there are none)."""
    path = custom_path(folder, head)
    try:
        if not path.is_file():
            return []
        if not path.resolve().is_relative_to(Path(folder).resolve()):  # a link out of the scan or tree
            raise CorruptFileError(f"{CUSTOM_DIR}/{path.name} leads outside {Path(folder).name} (a link); it is "
                                   "not read.")
        data = read_json(path)
    except OSError as err:
        raise InputError(f"{CUSTOM_DIR}/{path.name} cannot be read ({err.strerror or err}).") from err
    if not isinstance(data, dict) or not isinstance(data.get("sequences"), list):
        raise CorruptFileError(f"{CUSTOM_DIR}/{path.name} has no 'sequences' list; it cannot be read.")
    problems = sequence_problems(f"{CUSTOM_DIR}/{path.name}", data["sequences"], custom=True)
    if problems:  # the file may have changed since the scan or tree was opened and checked
        raise CorruptFileError(f"{problems[0]}; the custom sequences cannot be shown.")
    return data["sequences"]


def _write(folder: Path, head: HeadRef, sequences: list[dict[str, Any]]) -> None:
    """Replace the head's file at once (a failed write leaves the old one whole); a failure is an InputError."""
    path = custom_path(folder, head)
    try:
        atomic_write_text(path, dumps({"sequences": sequences}))
    except OSError as err:  # a read-only corpus root, a full disk, custom_sequences/ being a file...
        raise InputError(f"The custom sequences cannot be written: cannot write {CUSTOM_DIR}/{path.name} in "
                         f"{folder} ({err.strerror or err}). Nothing was changed.") from err


def custom_record(loaded: LoadedModel, head: HeadRef, text: str, sequence_id: int | str,
                  keys_per_query: int = DEFAULT_KEYS_PER_QUERY,
                  threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Run ``text`` through the model up to ``head``'s layer and keep its attention as a HeadVis sequence."""
    head.check(loaded.info.n_layers, loaded.info.n_heads)
    model = loaded.model
    prompt = tokenize_prompt(model, text, max_tokens=min(MAX_CUSTOM_TOKENS, int(model.cfg.n_ctx)))
    name = pattern_hook(head.layer)
    _, cache = capture(model, prompt.tokens.to(loaded.info.device), [name], stop_at_layer=head.layer + 1)
    attention = sparse_from_dense(cache[name][0, head.head], top_k=keys_per_query)
    return sequence_record(sequence_id, CUSTOM_INTERVAL, prompt.str_tokens, attention, keys_per_query, threshold,
                           {"text": text})


def add_custom_sequence(loaded: LoadedModel, folder: Path, head: HeadRef, text: str,
                        keys_per_query: int = DEFAULT_KEYS_PER_QUERY,
                        threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Add ``text`` to ``head``'s custom sequences in ``folder``; returns the stored sequence."""
    if folder is None or not Path(folder).is_dir():
        raise InputError("Open a scan first: custom sequences are stored with it.")
    with _lock(custom_path(folder, head)):
        existing = read_custom_sequences(folder, head)
        next_id = 1 + max((_number(s.get("sequence_id")) for s in existing), default=0)
        record = custom_record(loaded, head, text, custom_sequence_id(next_id) if is_tree(folder) else next_id,
                               keys_per_query, threshold)
        _write(folder, head, existing + [record])
    return record


def _number(sequence_id: Any) -> int:
    """The count in an id (``7`` or ``"c7"`` -> 7); 0 for an id of another producer."""
    text = str(sequence_id).removeprefix(CUSTOM_ID_PREFIX)
    return int(text) if text.isdigit() else 0


def delete_custom_sequence(folder: Path, head: HeadRef, sequence_id: int | str) -> bool:
    """Remove one custom sequence of ``head``; ``False`` if there was none with that id."""
    with _lock(custom_path(folder, head)):
        existing = read_custom_sequences(folder, head)
        kept = [s for s in existing if str(s.get("sequence_id")) != str(sequence_id)]
        if len(kept) == len(existing):
            return False
        _write(folder, head, kept)
    return True
