"""The contract validator: each broken fact is found and named by file and field; the import refuses such trees."""

import json
import shutil

import pytest

from headvis_core.errors import CorruptFileError
from headvis_core.headvis_format.export import export_headvis
from headvis_core.headvis_format.importer import import_headvis
from headvis_core.headvis_format.validate import check_tree, validate_tree
from tests.headvis_format.scans import tiny_scan


@pytest.fixture(scope="module")
def good_tree(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("validate") / "data"
    export_headvis(tiny_scan(tiny_llama, tmp_path_factory.mktemp("scan")), out)
    return out


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def set_interval(value):
    def change(data):
        data["sequences"][0]["interval"] = value
    return change


def set_index(data):
    seq = data["sequences"][0]
    seq["attention_indices"][-1] = seq["seq_len"] ** 2


def config_change(change):
    return ("config.json", change)


BREAKS = {
    "interval as a string": ("heads/L1H1.json", set_interval("10"), "heads/L1H1.json", "sequences[0].interval"),
    "interval above n": ("heads/L1H1.json", set_interval(11), "heads/L1H1.json", "sequences[0].interval"),
    "interval as a float": ("heads/L1H1.json", set_interval(3.0), "heads/L1H1.json", "sequences[0].interval"),
    "COO index out of bounds": ("heads/L0H3.json", set_index, "heads/L0H3.json",
                                "sequences[0].attention_indices"),
    "seq_len not len(tokens)": ("heads/L0H0.json", lambda d: d["sequences"][1].update(seq_len=3),
                                "heads/L0H0.json", "sequences[1].seq_len"),
    "n_intervals missing": ("config.json", lambda d: d.pop("n_intervals"), "config.json", "n_intervals"),
    "default axis not a column": ("config.json", lambda d: d["scatter"].update(default_x="induction"),
                                  "config.json", "scatter.default_x"),
    "repeated table key": ("config.json", lambda d: d["custom_tables"].append(dict(d["custom_tables"][0])),
                           "config.json", "custom_tables[2].key"),
    "table key not named": ("config.json", lambda d: d["custom_tables"].pop(1), "config.json", "custom_tables"),
    "attribution entry without ov": ("attributions/manifest.json", lambda d: d.update(L0H0={"qk": []}),
                                     "attributions/manifest.json", "[0]"),
    "top token without weight": ("heads/L1H0.json", lambda d: d["top_key_tokens"][0].pop("weight"),
                                 "heads/L1H0.json", "top_key_tokens"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_each_break_is_named_by_file_and_field(good_tree, tmp_path, name):
    file, change, where, field = BREAKS[name]
    tree = tmp_path / "data"
    shutil.copytree(good_tree, tree)
    edit_json(tree / file, change)
    problems = validate_tree(tree)
    assert any(p.file == where and p.field == field for p in problems), problems
    with pytest.raises(CorruptFileError, match=f"{where}: {field}".replace("[", r"\[").replace("]", r"\]")):
        import_headvis(tree)


def test_nan_missing_files_and_repeated_json_keys(good_tree, tmp_path):
    tree = tmp_path / "data"
    shutil.copytree(good_tree, tree)
    text = (tree / "heads/L0H2.json").read_text()
    (tree / "heads/L0H2.json").write_text(text.replace('"max_activation":', '"max_activation":NaN,"x":', 1))
    (tree / "heads/L1H3.json").unlink()
    (tree / "custom_sequences/L0H1.json").unlink()
    (tree / "server_config.json").write_text('{"a": 1, "a": 2}')
    problems = {(p.file, p.field) for p in validate_tree(tree)}
    assert ("heads/L0H2.json", "(file)") in problems  # NaN is not JSON
    assert ("heads/L1H3.json", "(file)") in problems
    assert ("custom_sequences/L0H1.json", "(file)") in problems
    assert ("server_config.json", "a") in problems


def test_a_good_tree_has_no_problems(good_tree):
    assert validate_tree(good_tree) == []
    check_tree(good_tree)
