"""Issue #11's review of the HeadVis import: custom ids, bounds, paths out of the tree, wrong types, failed writes."""

import errno
import json
import shutil

import pytest

from headvis_core.data.roots import check_corpus_path
from headvis_core.errors import CorruptFileError, HeadVisError, InputError
from headvis_core.heads import HeadRef
from headvis_core.headvis_format import custom
from headvis_core.headvis_format.custom import add_custom_sequence, delete_custom_sequence, read_custom_sequences
from headvis_core.headvis_format.export import export_headvis, head_record
from headvis_core.headvis_format.importer import example_from_record, import_headvis
from headvis_core.headvis_format.links import page_view
from headvis_core.headvis_format.locate import scan_folder_from_url, tree_under_roots
from headvis_core.headvis_format.validate import validate_tree
from headvis_core.scan import store as scan_store
from tests.headvis_format.scans import tiny_scan


@pytest.fixture(scope="module")
def scan(tiny_llama, tmp_path_factory):
    return tiny_scan(tiny_llama, tmp_path_factory.mktemp("hardening"))


@pytest.fixture
def tree(scan, tmp_path):
    out = tmp_path / "root" / "data"
    export_headvis(scan, out)
    return out


def edit_config(tree, **changes):
    config = json.loads((tree / "config.json").read_text())
    config.update(changes)
    (tree / "config.json").write_text(json.dumps(config))


def errors(tree):
    return [p for p in validate_tree(tree) if p.severity == "error"]


# -- 1: custom ids as HeadVis writes them ---------------------------------------------------------------------

def test_custom_sequences_with_c_ids_are_read_added_and_deleted_in_a_tree(tiny_llama, scan, tree):
    head = HeadRef(1, 2)
    add_custom_sequence(tiny_llama, scan.path, head, "a b a b")  # the scan's id 1 ...
    try:
        out = tree.parent / "again"
        export_headvis(scan, out)  # ... is written "c1" in the tree
    finally:
        delete_custom_sequence(scan.path, head, 1)
    [written] = read_custom_sequences(out, head)
    assert written["sequence_id"] == "c1"
    example = example_from_record(written, -1)
    assert example.window_index == "c1" and example.str_tokens == written["tokens"]
    assert example_from_record({**written, "sequence_id": 7}, -1).window_index == 7
    added = add_custom_sequence(tiny_llama, import_headvis(out).path, head, "c d c d")
    assert added["sequence_id"] == "c2"
    assert [example_from_record(s, -1).window_index for s in read_custom_sequences(out, head)] == ["c1", "c2"]
    assert delete_custom_sequence(out, head, "c1")
    assert [s["sequence_id"] for s in read_custom_sequences(out, head)] == ["c2"]
    assert errors(out) == []


def test_a_tree_whose_dataset_sequences_have_string_ids_shows_them(tree):
    heads = tree / "heads" / "L0H1.json"
    data = json.loads(heads.read_text())
    for i, seq in enumerate(data["sequences"]):
        seq["sequence_id"] = f"w{i}"
    heads.write_text(json.dumps(data))
    imported = import_headvis(tree)
    shown = [ex.window_index for bucket in imported.deciles(HeadRef(0, 1)) for ex in bucket.examples]
    assert shown and all(isinstance(i, str) and i.startswith("w") for i in shown)
    assert {ex.window_index for ex in imported.top_examples(HeadRef(0, 1))} <= {f"w{i}" for i in range(99)}


# -- 2: n_intervals has a sane bound --------------------------------------------------------------------------

@pytest.mark.parametrize("n_intervals", [10 ** 30, 101])
def test_a_huge_n_intervals_is_a_validator_error(tree, n_intervals):
    edit_config(tree, n_intervals=n_intervals)
    assert [(p.file, p.field) for p in errors(tree)] == [("config.json", "n_intervals")]
    with pytest.raises(CorruptFileError, match="config.json: n_intervals"):
        import_headvis(tree)
    unchecked = import_headvis(tree, check=False)  # an unchecked tree is refused where it is read
    with pytest.raises(CorruptFileError, match="n_intervals"):
        unchecked.deciles(HeadRef(0, 0))


def test_n_intervals_at_the_bound_is_accepted(tree):
    edit_config(tree, n_intervals=100)
    assert not [p for p in errors(tree) if p.field == "n_intervals"]


# -- 3: no file outside the tree ------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["../../outside/L{layer}H{head}.json", "/etc/L{layer}H{head}.json",
                                     "sub/L{layer}H{head}.json", "..\\L{layer}H{head}.json", "L{layer}..H{head}",
                                     ["L{layer}H{head}.json"]])
def test_a_head_data_pattern_leading_out_of_heads_is_refused(tree, pattern):
    outside = tree.parent.parent / "outside"
    outside.mkdir(exist_ok=True)
    for source in (tree / "heads").iterdir():
        shutil.copy(source, outside / source.name)  # readable files there: only the check keeps them out
    edit_config(tree, head_data_pattern=pattern)
    assert [(p.file, p.field) for p in errors(tree)] == [("config.json", "head_data_pattern")]
    with pytest.raises(CorruptFileError, match="head_data_pattern"):
        import_headvis(tree)
    if isinstance(pattern, str):
        with pytest.raises(CorruptFileError, match="head_data_pattern"):
            import_headvis(tree, check=False).deciles(HeadRef(0, 0))


def test_a_head_file_linked_out_of_the_tree_is_not_read(tree):
    outside = tree.parent.parent / "outside.json"
    shutil.copy(tree / "heads" / "L0H0.json", outside)
    (tree / "heads" / "L0H0.json").unlink()
    (tree / "heads" / "L0H0.json").symlink_to(outside)
    assert any(p.file == "heads/L0H0.json" and "outside the tree" in p.message for p in errors(tree))
    with pytest.raises(CorruptFileError, match="outside"):
        import_headvis(tree, check=False).deciles(HeadRef(0, 0))
    (tree / "custom_sequences" / "L0H0.json").unlink()
    (tree / "custom_sequences" / "L0H0.json").symlink_to(outside)
    with pytest.raises(CorruptFileError, match="outside"):
        read_custom_sequences(tree, HeadRef(0, 0))


# -- 6: a path the file system refuses is an InputError -------------------------------------------------------

def test_a_name_too_long_is_an_input_error_not_an_oserror(tmp_path, monkeypatch):
    monkeypatch.setattr(scan_store, "scans_root", lambda: tmp_path / "scans")
    long = "a" * 300
    for call in (lambda: check_corpus_path(long, [tmp_path]), lambda: check_corpus_path(f"{tmp_path}/{long}",
                                                                                         [tmp_path]),
                 lambda: tree_under_roots(long, [tmp_path]), lambda: scan_folder_from_url(long, [tmp_path]),
                 lambda: scan_folder_from_url(f"{tmp_path}/{long}", [tmp_path])):
        with pytest.raises(InputError, match="too long|no stored scan"):
            call()


def test_scan_folder_from_url_finds_a_stored_scan_or_a_tree_under_the_roots(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(scan_store, "scans_root", lambda: tmp_path / "scans")
    (tmp_path / "scans" / "abc").mkdir(parents=True)
    root = tree.parent
    assert scan_folder_from_url("abc", [root]) == tmp_path / "scans" / "abc"
    assert scan_folder_from_url("data", [root]) == tree.resolve()
    assert scan_folder_from_url("nothing", [root]) == tmp_path / "scans" / "nothing"  # says "no scan" when opened
    with pytest.raises(InputError, match="only from the allowed corpus roots"):
        scan_folder_from_url(str(tree), [tmp_path / "scans"])
    with pytest.raises(CorruptFileError, match="not HeadVis data"):
        tree_under_roots(str(root), [root])


# -- 7: wrong types are validator errors, never a TypeError ---------------------------------------------------

WRONG = [[1, 2], {"a": 1}, "text", 3.5, None, True, -1]
CONFIG_FIELDS = ["heads", "n_intervals", "n_layers", "n_heads", "head_data_pattern", "model_name",
                 "metric_descriptions", "has_umap", "umap_heads", "custom_tables", "custom_plots",
                 "statistics_display", "scatter", "dimensions", "workbench"]
NESTED = {"scatter": ["default_x", "default_y", "default_color", "discrete_axes"],
          "dimensions": ["primary", "secondary"],
          "workbench": ["n_windows", "window_len", "top_k_keys", "examples_per_decile", "top_examples", "corpus",
                        "created", "scan_key"]}


def opened_or_refused(tree) -> None:
    """Validating, opening and showing the tree either works or says why (a HeadVisError): nothing else."""
    validate_tree(tree)
    try:
        imported = import_headvis(tree)
        for head in (HeadRef(0, 0), HeadRef(1, 3)):
            imported.deciles(head)
            imported.top_examples(head)
            imported.examples_table(head)
            imported.top_tokens(head)
            imported.distance_histogram(head)
        imported.head_summary()
        _ = imported.params, imported.n_windows, imported.meta
    except HeadVisError:
        pass


@pytest.mark.parametrize("field", CONFIG_FIELDS)
def test_a_config_field_of_the_wrong_type_is_an_error_not_a_crash(tree, field):
    original = (tree / "config.json").read_text()
    for value in WRONG:
        (tree / "config.json").write_text(original)
        edit_config(tree, **{field: value})
        opened_or_refused(tree)


@pytest.mark.parametrize("field", list(NESTED))
def test_a_nested_config_field_of_the_wrong_type_is_an_error_not_a_crash(tree, field):
    original = (tree / "config.json").read_text()
    for key in NESTED[field]:
        for value in WRONG:
            (tree / "config.json").write_text(original)
            config = json.loads(original)
            config[field] = {**(config.get(field) or {}), key: value}
            (tree / "config.json").write_text(json.dumps(config))
            opened_or_refused(tree)
    key = {"scatter": "default_x", "dimensions": "primary", "workbench": "n_windows"}[field]
    for value in ([1], {"a": 1}):  # the reviewer's two: an unhashable axis or label name
        config = json.loads(original)
        config[field] = {**(config.get(field) or {}), key: value}
        (tree / "config.json").write_text(json.dumps(config))
        assert any(p.field == f"{field}.{key}" for p in errors(tree)), field


def test_a_head_files_own_keys_of_the_wrong_type_are_errors_not_crashes(tree):
    heads = tree / "heads" / "L0H0.json"
    original = json.loads(heads.read_text())
    changes = [("workbench", [1]), ("workbench", {"score_counts": [[0, 1]], "score_bins": "x"}),
               ("workbench", {"score_counts": [[99999, 1]], "score_bins": 4}),
               ("workbench", {"score_counts": "x", "score_bins": 4})]
    for key, value in changes:
        heads.write_text(json.dumps({**original, key: value}))
        assert any(p.file == "heads/L0H0.json" and p.field.startswith("workbench") for p in errors(tree))
        opened_or_refused(tree)
    for key, value in (("score", "x"), ("top_rank", "1"), ("sample", "no")):
        data = json.loads(json.dumps(original))
        data["sequences"][0][key] = value
        heads.write_text(json.dumps(data))
        assert any(p.field == f"sequences[0].{key}" for p in errors(tree)), key
        opened_or_refused(tree)


# -- 8: a failed write of custom sequences is a clear error and changes nothing -------------------------------

def test_custom_sequences_folder_that_is_a_file_is_a_clear_error(tiny_llama, tree):
    shutil.rmtree(tree / "custom_sequences")
    (tree / "custom_sequences").write_text("not a folder")
    with pytest.raises(InputError, match="cannot write custom_sequences/L0H1.json"):
        add_custom_sequence(tiny_llama, tree, HeadRef(0, 1), "one two")
    assert (tree / "custom_sequences").read_text() == "not a folder"


def test_a_failed_write_leaves_the_old_file_whole(tiny_llama, tree, monkeypatch):
    head = HeadRef(0, 1)
    add_custom_sequence(tiny_llama, tree, head, "one two")
    before = (tree / "custom_sequences" / "L0H1.json").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(custom, "atomic_write_text", disk_full)
    for change in (lambda: add_custom_sequence(tiny_llama, tree, head, "three"),
                   lambda: delete_custom_sequence(tree, head, "c1")):
        with pytest.raises(InputError, match="cannot write.*No space left"):
            change()
    assert (tree / "custom_sequences" / "L0H1.json").read_bytes() == before
    assert sorted(p.name for p in (tree / "custom_sequences").iterdir()) == sorted(
        p.name for p in (tree / "heads").iterdir())  # no stray temporary file


# -- 4/5: one reading of ?tab= and ?interval= -----------------------------------------------------------------

def test_page_view_translates_headvis_tabs_and_names_what_is_shown():
    for theirs, ours in (("umap", "pca"), ("metrics", "tokens")):
        view = page_view({"tab": theirs}, 2, 4, 10)
        assert view.tab == ours and view.repairs({"tab": theirs}) == {"tab": ours}
        assert view.notes == (f"?tab={theirs} (HeadVis's name) opens this page's {ours} tab.",)
    sequences = page_view({"tab": "sequences"}, 2, 4, 10)
    assert (sequences.tab, sequences.notes, sequences.repairs({"tab": "sequences"})) == ("examples", (),
                                                                                          {"tab": None})
    beyond = page_view({"interval": "99"}, 2, 4, 10)
    assert beyond.interval == "top" and beyond.repairs({"interval": "99"}) == {"interval": None}
    assert beyond.notes == ("?interval=99 is not 1-10 or -1; showing top (the exact highest-scoring windows).",)
    assert page_view({"interval": "7"}, 2, 4, 5).interval == "top"  # a tree of 5 intervals has no 7th
    for fine in ({"interval": "-1"}, {"interval": "3", "tab": "tokens"}, {"interval": "top"}, {}):
        view = page_view(fine, 2, 4, 10)
        assert not view.notes and not view.repairs({k: v for k, v in fine.items() if v != "top"})
    assert page_view({"interval": "07"}, 2, 4, 10).repairs({"interval": "07"}) == {"interval": "7"}
    hostile = page_view({"tab": "<script>", "layer": "9", "interval": "x" * 500}, 2, 4, 10)
    assert (hostile.tab, hostile.interval) == ("examples", "top") and len(hostile.notes) == 3
    assert all(len(note) < 200 for note in hostile.notes)


# -- export: a head's row is found by (layer, head) ------------------------------------------------------------

def test_head_record_finds_the_heads_row_by_layer_and_head(scan):
    summary = scan.head_summary()
    shuffled = summary.sample(frac=1, random_state=0).reset_index(drop=True)
    assert not shuffled[["layer", "head"]].equals(summary[["layer", "head"]])
    for head in (HeadRef(0, 1), HeadRef(1, 3)):
        assert head_record(scan, head, summary=shuffled) == head_record(scan, head, summary=summary)
    with pytest.raises(CorruptFileError, match="0 rows for head 1.3"):
        head_record(scan, HeadRef(1, 3), summary=summary[summary["layer"] == 0])



def test_a_custom_sequences_file_changed_after_opening_is_checked_when_read(tree):
    path = tree / "custom_sequences" / "L0H1.json"
    path.write_text(json.dumps({"sequences": [{"sequence_id": "c1", "seq_len": 2}]}))
    with pytest.raises(CorruptFileError, match="custom_sequences/L0H1.json: sequences\\[0\\].tokens: missing"):
        read_custom_sequences(tree, HeadRef(0, 1))
