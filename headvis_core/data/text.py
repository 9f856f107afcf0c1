"""Text a user types or names (a prompt, a template, a prompt file) decoded like the corpus reader decodes files.

Everything is read as UTF-8, and where it is not valid UTF-8 but is valid
Windows-1252 (which covers Latin-1), as that, with the same fallback encoding
as :mod:`headvis_core.data.corpus`. Binary data (a NUL byte) and bytes that
decode as neither are refused with an :class:`InputError`, never a traceback.

Command-line arguments reach Python as ``str`` decoded with the
``surrogateescape`` error handler, so bytes that are not UTF-8 show up as lone
surrogates; :func:`argument_text` turns them back into bytes and decodes
those like a file.
"""

import os
from pathlib import Path
from typing import Optional

from headvis_core.data.corpus import FALLBACK_ENCODING, SNIFF_BYTES
from headvis_core.errors import InputError

MAX_TEXT_FILE_BYTES = 64 * 2**20  # a prompt or template file; a corpus goes through data.corpus


def decode_text(data: bytes, what: str) -> tuple[str, str]:
    """``(text, encoding)`` of ``data``: UTF-8 (a BOM dropped), else Windows-1252; binary is refused."""
    if b"\x00" in data[:SNIFF_BYTES]:
        raise InputError(f"{what} is binary, not text: give a UTF-8 text file.")
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode(FALLBACK_ENCODING), FALLBACK_ENCODING
    except UnicodeDecodeError:
        raise InputError(f"{what} is not text in UTF-8 or Windows-1252: save it as UTF-8.") from None


def has_undecoded_bytes(text: str) -> bool:
    """Whether ``text`` holds lone surrogates (bytes an OS-level decode could not read as UTF-8)."""
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def argument_text(text: str, what: str = "the text") -> str:
    """A command-line argument with any undecodable bytes decoded as a file would be (see the module docstring)."""
    if not has_undecoded_bytes(text):
        return text
    try:
        raw = text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:  # surrogates that did not come from bytes
        raise InputError(f"{what} holds characters that are not text (lone surrogates).") from None
    decoded, _ = decode_text(raw, what)
    return decoded


def read_text_file(path: str | os.PathLike, what: Optional[str] = None,
                   max_bytes: int = MAX_TEXT_FILE_BYTES) -> tuple[str, str]:
    """``(text, encoding)`` of a small text file; :class:`InputError` for a missing, huge or binary file."""
    file = Path(path).expanduser()
    what = what or f"The file {str(path)!r}"
    if not file.exists():
        raise InputError(f"{what} does not exist.")
    if file.is_dir():
        raise InputError(f"{what} is a folder, not a file.")
    try:
        size = file.stat().st_size
        if size > max_bytes:
            raise InputError(f"{what} is {size / 2**20:.0f} MiB, over the limit of {max_bytes / 2**20:.0f} MiB "
                             "for a prompt or template file.")
        with file.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise InputError(f"{what} cannot be read ({err.strerror or err}).") from err
    if len(data) > max_bytes:  # a file that grows, or /proc-like files that report size 0
        raise InputError(f"{what} is over the limit of {max_bytes / 2**20:.0f} MiB for a prompt or template file.")
    return decode_text(data, what)
