"""Where the app finds a scan or a HeadVis tree named on a page or in a URL (``?scan=``), under its path policy.

A stored scan is named by its folder's name and looked up in the scans root only; a HeadVis ``data/`` tree is
named by its path and opened only under the allowed corpus roots (:mod:`headvis_core.data.roots`), as a corpus
is. Every failure, a path the file system refuses to look up included (a name too long), is an
:class:`~headvis_core.errors.InputError` (or its :class:`~headvis_core.data.roots.DisallowedPathError`) or a
:class:`~headvis_core.errors.CorruptFileError` with a message for the user.
"""

import os
from pathlib import Path
from typing import Sequence

from headvis_core.data.roots import DisallowedPathError, check_corpus_path
from headvis_core.errors import CorruptFileError, InputError
from headvis_core.headvis_format.contract import is_tree
from headvis_core.scan import store as scan_store

NAME_MAX = 255  # bytes in one file or folder name on Linux, macOS and Windows file systems


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def tree_under_roots(path: str, roots: Sequence[Path]) -> Path:
    """The resolved HeadVis tree at ``path``; only under ``roots`` (like a corpus)."""
    try:
        tree = check_corpus_path(path, roots)
    except DisallowedPathError as err:
        listed = ", ".join(str(root) for root in roots)
        raise DisallowedPathError(f"HeadVis data is opened only from the allowed corpus roots ({listed}); "
                                  f"{_shown(path)} is outside them.") from err
    try:
        found = is_tree(tree)
    except OSError as err:
        raise InputError(f"{_shown(path)} cannot be looked up ({err.strerror or err}).") from None
    if not found:
        raise CorruptFileError(f"{_shown(path)} is not HeadVis data: it needs config.json and a heads/ folder.")
    return tree


def scan_folder_from_url(value: str, roots: Sequence[Path]) -> Path:
    """``?scan=``: a stored scan's folder name (in the scans root only) or an imported HeadVis tree's path.

    A bare name that is neither comes back as the scans root's folder of that name: opening it says that no
    scan is stored there.
    """
    name = Path(value).name
    if len(os.fsencode(name)) > NAME_MAX:  # found nowhere, wherever the lookup stops first
        raise InputError(f"?scan={_shown(value)} cannot be looked up (File name too long).")
    stored_folder = scan_store.scans_root() / name
    try:
        stored = value == name and name not in (".", "..") and stored_folder.exists()
    except OSError as err:
        raise InputError(f"?scan={_shown(value)} cannot be looked up ({err.strerror or err}).") from None
    if stored:
        return stored_folder
    try:
        return tree_under_roots(value, roots)
    except DisallowedPathError:
        raise
    except InputError:
        if value == name:
            return stored_folder
        raise InputError(f"?scan={_shown(value)} names no stored scan and no HeadVis data under the allowed "
                         "corpus roots.") from None
