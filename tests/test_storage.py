import pytest

from headvis_core.errors import CorruptFileError
from headvis_core.storage import atomic_write_json, read_json


def test_atomic_json_round_trip_leaves_no_temporary_files(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "r.json", {"a": [1, 2]})
    assert read_json(path) == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_truncated_file_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"a": [1, 2')
    with pytest.raises(CorruptFileError, match="corrupt"):
        read_json(path)
