import os

import pytest

from headvis_core.data.roots import (
    DisallowedPathError,
    allowed_roots,
    check_corpus_path,
    list_corpora,
    resolve_app_corpus,
)
from headvis_core.errors import InputError


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "root"
    (root / "books").mkdir(parents=True)
    (root / "books" / "a.txt").write_text("some text")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("do not show")
    return root, outside


def test_paths_under_a_root_are_allowed_absolute_or_relative(layout):
    root, _ = layout
    assert check_corpus_path(str(root / "books"), [root.resolve()]) == (root / "books").resolve()
    assert check_corpus_path("books", [root.resolve()]) == (root / "books").resolve()
    assert check_corpus_path(str(root), [root.resolve()]) == root.resolve()


@pytest.mark.parametrize("spec", ["/", "/etc", "{outside}", "{outside}/key.txt", "../secret", "books/../../secret",
                                  "{root}/../secret", "~"])
def test_anything_outside_the_roots_is_refused(layout, spec):
    root, outside = layout
    spec = spec.format(outside=outside, root=root)
    with pytest.raises(DisallowedPathError, match="outside"):
        check_corpus_path(spec, [root.resolve()])


def test_a_symlink_out_of_a_root_is_refused(layout):
    root, outside = layout
    os.symlink(outside, root / "link")
    with pytest.raises(DisallowedPathError):
        check_corpus_path(str(root / "link"), [root.resolve()])
    with pytest.raises(DisallowedPathError):
        check_corpus_path("link", [root.resolve()])


def test_missing_and_empty_specs_are_input_errors_not_disallowed(layout):
    root, _ = layout
    with pytest.raises(InputError, match="There is no corpus") as err:
        check_corpus_path("nothing-here", [root.resolve()])
    assert not isinstance(err.value, DisallowedPathError)
    with pytest.raises(InputError, match="No corpus"):
        check_corpus_path("  ", [root.resolve()])


def test_roots_come_from_the_environment_then_the_setting_then_the_defaults(layout, monkeypatch, tmp_path):
    root, outside = layout
    monkeypatch.delenv("HEADVIS_CORPUS_ROOTS", raising=False)
    monkeypatch.setenv("HEADVIS_HOME", str(tmp_path / "home"))
    defaults = allowed_roots()
    assert defaults[0].name == "corpus" and defaults[0].parent.name == "shared"
    assert defaults[1] == (tmp_path / "home" / "data").resolve()
    assert allowed_roots([outside]) == [outside.resolve()]
    monkeypatch.setenv("HEADVIS_CORPUS_ROOTS", f"{root}{os.pathsep}{outside}")
    assert allowed_roots(["/ignored"]) == [root.resolve(), outside.resolve()]
    assert check_corpus_path(str(outside / "key.txt")) == (outside / "key.txt").resolve()


def test_list_corpora_offers_the_roots_and_their_folders(layout):
    root, _ = layout
    assert list_corpora([root.resolve(), root.resolve() / "missing"]) == [root.resolve(), (root / "books").resolve()]


def test_pages_may_name_a_dataset_but_never_a_server_path(layout, monkeypatch, tmp_path):
    root, outside = layout
    roots = [root.resolve()]
    assert resolve_app_corpus("books", roots) == str((root / "books").resolve())
    assert resolve_app_corpus("wikitext:wikitext-2-raw-v1", roots) == "wikitext:wikitext-2-raw-v1"
    monkeypatch.chdir(outside)  # a bare name that open_corpus would read from the working directory
    with pytest.raises(InputError):
        resolve_app_corpus("key.txt", roots)
    with pytest.raises(InputError):
        resolve_app_corpus("wikitext", roots, allow_datasets=False)
    for spec in ("/etc", str(outside), "../secret", "~/x"):
        with pytest.raises(InputError):
            resolve_app_corpus(spec, roots)


def test_a_path_the_file_system_refuses_is_an_input_error(layout):
    root, _ = layout
    for spec in ("a" * 300, str(root / ("a" * 300)), "books/" + "b" * 300):
        with pytest.raises(InputError, match="cannot be looked up \\(File name too long\\)"):
            check_corpus_path(spec, [root.resolve()])
        with pytest.raises(InputError):
            resolve_app_corpus(spec, [root.resolve()])
