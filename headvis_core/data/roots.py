"""Which corpus folders the app may read: only those under roots the operator allows.

The app runs on a server and takes corpus paths from text boxes and URLs
(``?corpus=``), so without a limit any visitor could make it read, and show
tokens of, any file the server can read. Every corpus path the pages take
goes through :func:`check_corpus_path`. The CLI does not: a user running it
reads their own files.

The allowed roots are, in order of precedence:

* ``$HEADVIS_CORPUS_ROOTS``: folders separated by ``os.pathsep`` (``:``);
* the ``configured`` argument (the app's setting);
* by default ``../shared/corpus`` beside the project and the user's data
  folder, ``data/`` under the headvis cache root (:func:`user_data_dir`).

A path is allowed where, with every symbolic link resolved, it is one of the
roots or inside one; a relative path is looked up under each root in turn, so
``gutenberg`` names ``../shared/corpus/gutenberg``.
"""

import os
from pathlib import Path
from typing import Optional, Sequence

from headvis_core.errors import InputError
from headvis_core.paths import cache_root

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_CORPUS = PROJECT_ROOT.parent / "shared" / "corpus"


class DisallowedPathError(InputError):
    """A corpus path outside the allowed roots."""


def user_data_dir() -> Path:
    """The user's own data folder: ``data/`` under the headvis cache root."""
    return cache_root() / "data"


def allowed_roots(configured: Optional[Sequence[str | os.PathLike]] = None) -> list[Path]:
    """The folders corpus paths in the app must lie under (resolved; see the module docstring)."""
    env = os.environ.get("HEADVIS_CORPUS_ROOTS", "")
    if env.strip():
        raw: Sequence[str | os.PathLike] = [p for p in env.split(os.pathsep) if p.strip()]
    elif configured:
        raw = list(configured)
    else:
        raw = [SHARED_CORPUS, user_data_dir()]
    roots = []
    for entry in raw:
        root = Path(str(entry).strip()).expanduser().resolve()
        if root not in roots:
            roots.append(root)
    return roots


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _roots_text(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "none"


def check_corpus_path(spec: str, roots: Optional[Sequence[Path]] = None) -> Path:
    """The resolved path of ``spec`` if it lies under an allowed root; :class:`DisallowedPathError` if not.

    Raises :class:`InputError` for an empty spec and for a path that exists nowhere under the roots.
    """
    roots = list(roots) if roots is not None else allowed_roots()
    text = (spec or "").strip()
    if not text:
        raise InputError("No corpus given: choose a folder under the allowed corpus roots "
                         f"({_roots_text(roots)}).")
    if "\x00" in text:
        raise DisallowedPathError("A corpus path cannot hold a NUL character.")
    try:
        return _check_under_roots(text, roots)
    except OSError as err:  # a name too long for the file system, a loop of links, an unreadable folder...
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InputError(f"The path {shown!r} cannot be looked up ({err.strerror or err}).") from None


def _check_under_roots(text: str, roots: list[Path]) -> Path:
    given = Path(text).expanduser()
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if not _within(resolved, roots):
            continue
        if resolved.exists():
            return resolved
    if given.is_absolute() and not _within(given.resolve(), roots):
        raise DisallowedPathError(
            f"The app reads corpora only from the allowed corpus roots ({_roots_text(roots)}); {text!r} is "
            "outside them. Copy the texts into one of them, or ask the operator to add a root "
            "(HEADVIS_CORPUS_ROOTS).")
    if not given.is_absolute() and any(not _within((root / given).resolve(), roots) for root in roots):
        raise DisallowedPathError(f"{text!r} leads outside the allowed corpus roots ({_roots_text(roots)}).")
    raise InputError(f"There is no corpus {text!r} under the allowed corpus roots ({_roots_text(roots)}).")


def resolve_app_corpus(spec: str, roots: Optional[Sequence[Path]] = None, allow_datasets: bool = True) -> str:
    """What a page passes to ``open_corpus``: a path under the allowed roots, or a Hugging Face dataset name.

    A dataset name (``wikitext:wikitext-2-raw-v1``) is let through only where it cannot be read as a
    path: it names nothing under the roots, has no path separator or leading ``.``, ``/`` or ``~``,
    and is not a file or folder relative to the server's working directory (which ``open_corpus``
    would otherwise read).
    """
    text = (spec or "").strip()
    try:
        return str(check_corpus_path(text, roots))
    except DisallowedPathError:
        raise
    except InputError:
        looks_like_path = text.startswith((".", "/", "~")) or os.sep in text or bool(os.altsep and os.altsep in text)
        if not text or not allow_datasets or looks_like_path or _exists_here(text):
            raise
    return text


def _exists_here(text: str) -> bool:
    """Whether ``text`` names a file or folder relative to the working directory (one it cannot look up: yes)."""
    try:
        return Path(text).exists()
    except OSError:
        return True


def is_allowed(spec: str, roots: Optional[Sequence[Path]] = None) -> bool:
    try:
        check_corpus_path(spec, roots)
    except InputError:
        return False
    return True


def list_corpora(roots: Optional[Sequence[Path]] = None) -> list[Path]:
    """Each allowed root that exists and the folders directly inside it, for a picker."""
    found = []
    for root in roots if roots is not None else allowed_roots():
        if root.is_dir():
            found.append(root)
            found.extend(sorted(p.resolve() for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    return list(dict.fromkeys(found))
