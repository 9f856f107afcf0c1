import pytest

from headvis_core.data.text import argument_text, decode_text, read_text_file
from headvis_core.errors import InputError


def test_latin1_bytes_decode_as_windows_1252():
    assert decode_text("café".encode("latin-1"), "x") == ("café", "cp1252")
    assert decode_text("\ufeffcafé".encode("utf-8"), "x") == ("café", "utf-8")


@pytest.mark.parametrize("data", [b"ab\x00cd", b"\x81\x8d\x8f\x90\x9d\xff\xfe"])
def test_binary_and_undecodable_bytes_are_refused(data):
    with pytest.raises(InputError, match="binary|not text"):
        decode_text(data, "The prompt")


def test_an_argument_with_undecodable_bytes_is_decoded_like_a_file():
    argv_text = b"caf\xe9 au lait".decode("utf-8", errors="surrogateescape")  # how Python hands argv over
    assert argument_text(argv_text) == "café au lait"
    assert argument_text("plain") == "plain"
    with pytest.raises(InputError, match="not text"):
        argument_text("a\ud800b")


def test_text_files(tmp_path):
    latin = tmp_path / "p.txt"
    latin.write_bytes("naïve\n".encode("latin-1"))
    assert read_text_file(latin)[0] == "naïve\n"
    with pytest.raises(InputError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="folder"):
        read_text_file(tmp_path)
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * 100)
    with pytest.raises(InputError, match="over the limit"):
        read_text_file(big, max_bytes=10)
