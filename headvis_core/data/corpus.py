"""Reading a text corpus and cutting it into windows of N tokens for dataset scans.

A corpus is one of:

* a folder: every ``.txt`` file under it (recursively, sorted by path) is one
  document, and every ``.jsonl`` file holds one document per line;
* a ``.txt`` file (one document) or a ``.jsonl`` file (field ``"text"`` of each line);
* a Hugging Face dataset name (``name``, ``name:config`` or ``name:config:split``),
  streamed, where there is network; offline this fails at once with a clear message.

A folder's subfolders and files that cannot be read (permissions, a file
that vanished) are skipped and listed in ``skipped``, like binary files. The
filesystem root and the system folders (``/proc``, ``/sys``, ``/dev``) are
refused: walking them would take very long and read no text.

Files are read as UTF-8; a file that is not valid UTF-8 but is valid
Windows-1252 (which covers Latin-1 text, common in old corpora) is read as
that and counted in ``recoded``. Files that are binary (a NUL byte in the
first 8 KiB) or decode as neither are skipped and counted, so one stray
image does not stop a scan. Text is read in
blocks of about a megabyte cut at a line break, so memory stays small
whatever the size of the files. Documents are joined with a blank line and
the token stream is cut into consecutive, non-overlapping windows of
``window_len`` tokens (the last, incomplete window is dropped).
"""

import codecs
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from headvis_core.errors import InputError

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
BLOCK_CHARS = 1 << 20  # characters tokenized at once, at most
FIRST_BLOCK_CHARS = 1 << 14
SNIFF_BYTES = 8192
DOCUMENT_SEPARATOR = "\n\n"


FALLBACK_ENCODING = "cp1252"
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")  # never a corpus (nor, in the CLI, an output folder)


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str  # "binary", "not text in UTF-8 or Windows-1252" or "unreadable ..." (file or folder)


@dataclass(frozen=True)
class Corpus:
    """A resolved corpus: what to read, what was skipped, and a fingerprint for result keys."""

    spec: str  # what the user gave
    kind: str  # "folder", "txt", "jsonl" or "hf"
    files: tuple[Path, ...] = ()
    skipped: tuple[SkippedFile, ...] = ()
    recoded: tuple[str, ...] = ()  # files read as Windows-1252 because they are not UTF-8
    total_bytes: int = 0
    text_field: str = "text"
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    fingerprint: str = ""  # changes when a file is added, removed or modified

    @property
    def description(self) -> str:
        if self.kind == "hf":
            config = f" ({self.hf_config})" if self.hf_config else ""
            return f"Hugging Face dataset {self.hf_name}{config}, split {self.hf_split}"
        size = f"{self.total_bytes / 1e6:.1f} MB"
        skipped = f"; skipped {len(self.skipped)} unreadable file(s)" if self.skipped else ""
        skipped += f"; {len(self.recoded)} read as Windows-1252" if self.recoded else ""
        if self.kind == "folder":
            return f"{len(self.files)} file(s) in {self.spec} ({size}){skipped}"
        return f"{self.spec} ({size})"


@dataclass
class Window:
    index: int  # position of the window in the corpus, from 0
    tokens: np.ndarray  # [window_len] int64, no BOS


@dataclass
class WindowBatch:
    indices: np.ndarray  # [batch] int64
    tokens: np.ndarray  # [batch, window_len] int64
    fraction_read: float  # of the corpus bytes, for progress (0 for streamed datasets)


def _looks_binary(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\x00" in f.read(SNIFF_BYTES)


def _decodes_as(path: Path, encoding: str) -> bool:
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _check_file(path: Path) -> tuple[Optional[str], str]:
    """``(why path cannot be read as text or None, the encoding to read it with)``."""
    if _looks_binary(path):
        return "binary", ""
    if _decodes_as(path, "utf-8"):
        return None, "utf-8"
    if _decodes_as(path, FALLBACK_ENCODING):
        return None, FALLBACK_ENCODING
    return "not text in UTF-8 or Windows-1252", ""


def file_encoding(corpus: "Corpus", path: Path) -> str:
    return FALLBACK_ENCODING if str(path) in corpus.recoded else "utf-8-sig"


def _fingerprint(parts: list[Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def _file_fingerprint(files: list[Path], root: Path) -> str:
    entries = []
    for path in files:
        stat = path.stat()
        entries.append([str(path.relative_to(root)) if path != root else path.name, stat.st_size, stat.st_mtime_ns])
    return _fingerprint(entries)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec or spec.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)


def open_corpus(spec: str, text_field: str = "text", hf_split: str = "train") -> Corpus:
    """Resolve ``spec`` (folder, ``.txt``, ``.jsonl`` or HF dataset name) into a :class:`Corpus`.

    Raises :class:`InputError` for an empty spec, a missing path, a folder or
    file with no readable text, or a dataset name with no network.
    """
    spec = (spec or "").strip()
    if not spec:
        raise InputError("No corpus given: give a folder of .txt files, a .txt or .jsonl file, "
                         "or a Hugging Face dataset name.")
    path = Path(spec).expanduser()
    refuse_system_path(spec, path)
    if path.is_dir():
        return _open_folder(spec, path, text_field)
    if path.is_file():
        return _open_file(spec, path, text_field)
    if _looks_like_path(spec):
        raise InputError(f"There is no file or folder {spec!r}. Give a folder of .txt files, a .txt or "
                         ".jsonl file, or a Hugging Face dataset name.")
    return _open_hf(spec, text_field, hf_split)


def is_system_path(path: Path) -> bool:
    """Whether ``path`` (symbolic links resolved) is the filesystem root or in a system folder."""
    resolved = path.expanduser().resolve()
    return resolved == Path(resolved.anchor) or any(resolved == Path(folder) or resolved.is_relative_to(folder)
                                                    for folder in SYSTEM_FOLDERS)


def refuse_system_path(spec: str, path: Path) -> None:
    """:class:`InputError` for ``/`` and the system folders (and files in them) as a corpus."""
    if is_system_path(path):
        raise InputError(f"The corpus {spec!r} is the whole filesystem or a system folder "
                         f"({', '.join(SYSTEM_FOLDERS)}): give the folder that holds your text files.")


def _unreadable(err: OSError, what: str = "") -> str:
    return f"unreadable{what} ({err.strerror or err})"


def _folder_candidates(root: Path, skipped: list[SkippedFile]) -> list[Path]:
    """Text and JSONL files under ``root`` (hidden names left out), sorted; unreadable subfolders skipped."""
    def note_unreadable(err: OSError) -> None:
        where = Path(err.filename) if err.filename else root
        relative = where.relative_to(root) if where.is_relative_to(root) else where
        skipped.append(SkippedFile(f"{relative}/", _unreadable(err, " folder")))

    found = []
    for folder, subfolders, names in os.walk(root, onerror=note_unreadable):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]  # not walked at all
        found.extend(Path(folder) / name for name in names
                     if not name.startswith(".") and name.lower().endswith(TEXT_SUFFIXES + JSONL_SUFFIXES))
    return sorted(found)


def _open_folder(spec: str, root: Path, text_field: str) -> Corpus:
    skipped: list[SkippedFile] = []
    files, recoded, total_bytes = [], [], 0
    for path in _folder_candidates(root, skipped):
        relative = str(path.relative_to(root))
        try:
            if not path.is_file():  # a dangling link, a folder named like a text file
                continue
            reason, encoding = _check_file(path)
            size = path.stat().st_size
        except OSError as err:  # permissions, a file removed meanwhile
            skipped.append(SkippedFile(relative, _unreadable(err)))
            continue
        if reason:
            skipped.append(SkippedFile(relative, reason))
        elif size > 0:
            files.append(path)
            total_bytes += size
            if encoding == FALLBACK_ENCODING:
                recoded.append(str(path))
    if not files:
        why = (f" ({len(skipped)} skipped: " + ", ".join(f"{s.path} is {s.reason}" for s in skipped[:5]) + ")"
               if skipped else "")
        raise InputError(f"The folder {spec!r} holds no readable, non-empty .txt or .jsonl files{why}.")
    return Corpus(spec=spec, kind="folder", files=tuple(files), skipped=tuple(skipped), recoded=tuple(recoded),
                  total_bytes=total_bytes, text_field=text_field,
                  fingerprint=_file_fingerprint(files, root) + f":{text_field}")


def _open_file(spec: str, path: Path, text_field: str) -> Corpus:
    suffix = path.suffix.lower()
    kind = "jsonl" if suffix in JSONL_SUFFIXES else "txt"
    reason, encoding = _check_file(path)
    if reason:
        raise InputError(f"{spec!r} is {reason}: give a UTF-8 .txt or .jsonl file.")
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    if not head.strip():
        raise InputError(f"The file {spec!r} is empty.")
    return Corpus(spec=spec, kind=kind, files=(path,), total_bytes=path.stat().st_size, text_field=text_field,
                  recoded=(str(path),) if encoding == FALLBACK_ENCODING else (),
                  fingerprint=_file_fingerprint([path], path) + f":{text_field}")


def _open_hf(spec: str, text_field: str, hf_split: str) -> Corpus:
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else hf_split
    # imported here: the loader brings in torch, which reading local files (and the CLI's checks) never need
    from headvis_core.models.loader import hub_reachable

    if not hub_reachable():
        raise InputError(f"{spec!r} is not a file or folder here, so it was taken as a Hugging Face dataset "
                         "name, which needs the network, and this machine cannot reach the hub. Give a folder "
                         "of .txt files, or a .txt or .jsonl file.")
    return Corpus(spec=spec, kind="hf", hf_name=name, hf_config=config, hf_split=split, text_field=text_field,
                  fingerprint=_fingerprint(["hf", name, config, split, text_field]))


def _read_text_file(path: Path, block_chars: int, encoding: str = "utf-8-sig") -> Iterator[str]:
    """A text file in blocks of up to ``block_chars`` characters, cut after a line break where possible.

    Blocks start small and double, so a scan of a few windows does not tokenize a megabyte first.
    """
    carry = ""
    size = min(FIRST_BLOCK_CHARS, block_chars)
    with path.open("r", encoding=encoding, newline="") as f:
        while True:
            chunk = f.read(size)
            size = min(2 * size, block_chars)
            if not chunk:
                break
            text = carry + chunk
            cut = text.rfind("\n")
            if cut < 0 or cut < len(text) // 2:
                carry, text = "", text
            else:
                carry, text = text[cut + 1:], text[:cut + 1]
            yield text
    if carry:
        yield carry


def _read_jsonl(path: Path, text_field: str, encoding: str = "utf-8-sig") -> Iterator[str]:
    with path.open("r", encoding=encoding) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a malformed line is skipped like a binary file
            text = record.get(text_field) if isinstance(record, dict) else None
            if isinstance(text, str) and text.strip():
                yield text


def iter_documents(corpus: Corpus, block_chars: int = BLOCK_CHARS) -> Iterator[tuple[str, bool, int]]:
    """``(text, starts_document, bytes_done)`` pieces of the corpus, in order.

    A long document comes in several pieces; ``starts_document`` marks the first.
    """
    if corpus.kind == "hf":
        yield from _iter_hf(corpus)
        return
    done = 0
    for path in corpus.files:
        size = path.stat().st_size
        if path.suffix.lower() in JSONL_SUFFIXES:
            for text in _read_jsonl(path, corpus.text_field, file_encoding(corpus, path)):
                yield text, True, done
        else:
            first, consumed = True, 0
            for text in _read_text_file(path, block_chars, file_encoding(corpus, path)):
                consumed += len(text.encode("utf-8"))
                yield text, first, done + min(consumed, size)
                first = False
        done += size
        yield "", False, done


def _iter_hf(corpus: Corpus) -> Iterator[tuple[str, bool, int]]:
    try:
        from datasets import load_dataset  # heavy (pyarrow, fsspec): only for hub corpora

        dataset = load_dataset(corpus.hf_name, corpus.hf_config, split=corpus.hf_split, streaming=True)
    except Exception as err:  # datasets raises many kinds; the user needs the message
        raise InputError(f"Could not open the Hugging Face dataset {corpus.spec!r}: {err}") from err
    for record in dataset:
        text = record.get(corpus.text_field)
        if isinstance(text, str) and text.strip():
            yield text, True, 0


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def iter_window_batches(corpus: Corpus, tokenizer: Any, window_len: int, batch_size: int,
                        max_windows: Optional[int] = None, start: int = 0,
                        block_chars: int = BLOCK_CHARS) -> Iterator[WindowBatch]:
    """Consecutive windows ``[batch, window_len]`` of the corpus's token stream, from window ``start``.

    Windows before ``start`` are tokenized and skipped (resuming a scan).
    Only one block of text and one batch of windows is held at a time.
    """
    if window_len < 2:
        raise InputError("Windows must be at least 2 tokens long.")
    separator = encode(tokenizer, DOCUMENT_SEPARATOR)
    buffer: list[int] = []
    index = 0
    batch_indices: list[int] = []
    batch_tokens: list[list[int]] = []
    total = max(corpus.total_bytes, 1)
    started_any = False
    for text, starts_document, bytes_done in iter_documents(corpus, block_chars):
        if starts_document and started_any:
            buffer.extend(separator)
        if text:
            buffer.extend(encode(tokenizer, text))
            started_any = True
        n_full = len(buffer) // window_len
        for w in range(n_full):
            if max_windows is not None and index >= max_windows:
                break
            if index >= start:
                batch_indices.append(index)
                batch_tokens.append(buffer[w * window_len:(w + 1) * window_len])
                if len(batch_indices) == batch_size:
                    yield WindowBatch(np.asarray(batch_indices, dtype=np.int64),
                                      np.asarray(batch_tokens, dtype=np.int64), bytes_done / total)
                    batch_indices, batch_tokens = [], []
            index += 1
        del buffer[:n_full * window_len]
        if max_windows is not None and index >= max_windows:
            break
    if batch_indices:
        yield WindowBatch(np.asarray(batch_indices, dtype=np.int64), np.asarray(batch_tokens, dtype=np.int64), 1.0)
    if index == 0:
        where = f" (in the {corpus.text_field!r} field of each line)" if corpus.kind == "jsonl" else ""
        raise InputError(f"The corpus {corpus.spec!r} has fewer than {window_len} tokens of text{where}, not "
                         "enough for one window. Give more text or use shorter windows.")


def iter_windows(corpus: Corpus, tokenizer: Any, window_len: int,
                 max_windows: Optional[int] = None) -> Iterator[Window]:
    """One :class:`Window` at a time (the slow, simple path used by tests and references)."""
    for batch in iter_window_batches(corpus, tokenizer, window_len, 1, max_windows):
        yield Window(int(batch.indices[0]), batch.tokens[0])
