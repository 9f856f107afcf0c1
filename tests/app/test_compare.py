import pytest

from tests.app import bound_params
from tests.conftest import app_test

PAGE = "pages/8_Compare.py"


def compare_page(**query):
    return app_test(PAGE, model="tiny-llama", n=4, len=24, **query)


def test_without_model_b_the_page_asks_for_one():
    at = compare_page().run()
    assert not at.exception and not at.error
    assert any("Choose model B" in i.value for i in at.info)
    assert bound_params(at) >= {"b", "b_other", "corpus", "n", "len"}


def test_two_tiny_models_of_different_shapes():
    at = compare_page(b="tiny-gemma3").run()
    assert not at.exception and not at.error
    assert [s.value for s in at.subheader] == ["Both atlases", "Behaviour by relative depth",
                                               "Heads matched by metric profile", "Downloads"]
    summary = " ".join(m.value for m in at.markdown)
    assert "A = tiny-llama: 2 layers x 4 heads" in summary and "B = tiny-gemma3: 3 layers x 4 heads" in summary
    assert "8 heads paired by metric profile" in summary and "4 heads of the larger model are left unpaired" in summary
    pairs = at.dataframe[0].value
    assert len(pairs) == 8 and pairs.distance.is_monotonic_increasing
    labels = [b.proto.label for b in at.get("download_button")]
    assert {"heads.csv", "pairs.csv", "unmatched.csv", "depth.csv", "HTML report (offline)"} <= set(labels)
    assert "deltas.csv" not in labels  # different shapes: no per-head deltas
    assert bound_params(at) >= {"b", "b_other", "corpus", "n", "len", "x", "y"}


def test_same_model_twice_gives_zero_deltas_and_no_changed_heads():
    at = compare_page(b="tiny-llama", delta="copying").run()
    assert not at.exception and not at.error
    assert "Same shape: per-head changes (B - A)" in [s.value for s in at.subheader]
    assert at.selectbox(key="delta").value == "copying"
    changed = at.dataframe[-1].value
    assert len(changed) == 0
    assert any("0 of 8 heads changed" in m.value for m in at.markdown)
    assert "deltas.csv" in [b.proto.label for b in at.get("download_button")]


def test_other_checkpoint_directory_that_does_not_exist_is_a_clear_error(tmp_path):
    at = compare_page(b="other (type below)", b_other=str(tmp_path / "missing")).run()
    assert not at.exception
    assert at.error and "not a directory" in at.error[0].value


def test_bad_corpus_folder_and_hostile_url_values(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADVIS_CORPUS_ROOTS", str(tmp_path))
    at = compare_page(b="tiny-gpt2", corpus=str(tmp_path / "nope")).run()
    assert not at.exception
    assert at.error and "There is no corpus" in at.error[0].value
    at = app_test(PAGE, model="tiny-llama", b="<script>alert(1)</script>", n="1e400", len="-3").run()
    assert not at.exception and not at.error
    assert at.selectbox(key="b").value == ""  # not a known model: the page asks for one


@pytest.mark.parametrize("folder", ["/", "/etc", "../../../../etc"])
def test_a_url_corpus_outside_the_allowed_roots_is_refused_before_anything_loads(folder, tmp_path, monkeypatch):
    from headvis_core.atlas import run as atlas_run

    monkeypatch.setenv("HEADVIS_CORPUS_ROOTS", str(tmp_path))
    calls = []
    monkeypatch.setattr(atlas_run, "compute_atlas", lambda *args, **kwargs: calls.append(1))
    at = compare_page(b="tiny-gpt2", corpus=folder).run()
    assert not at.exception and calls == []
    assert at.error and "allowed corpus roots" in at.error[0].value


def test_both_atlases_come_from_the_store_on_reopening_and_recompute_computes_them(tmp_path, monkeypatch):
    from headvis_core.atlas import run as atlas_run

    monkeypatch.setenv("HEADVIS_STORE_DIR", str(tmp_path / "store"))
    calls = []
    real = atlas_run.compute_atlas

    def counted(model, **kwargs):
        calls.append(kwargs["model_name"])
        return real(model, **kwargs)

    monkeypatch.setattr(atlas_run, "compute_atlas", counted)
    at = compare_page(b="tiny-gpt2").run()
    assert not at.exception and not at.error and sorted(calls) == ["tiny-gpt2", "tiny-llama"]
    reopened = compare_page(b="tiny-gpt2").run()  # a new session
    assert not reopened.exception and not reopened.error and len(calls) == 2
    captions = [c.value for c in reopened.caption if c.value.startswith("Atlas of ")]
    assert len(captions) == 2 and all("from the store" in c for c in captions)
    reopened.button(key="compare_recompute").click().run()
    assert not reopened.exception and len(calls) == 4
    atlas_page = app_test("pages/1_Head_atlas.py", model="tiny-llama", n=4, len=24).run()  # the same atlas
    assert not atlas_page.exception and len(calls) == 4
