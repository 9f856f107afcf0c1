import pandas as pd
import pytest

from headvis_core.atlas import run as atlas_run
from headvis_core.heads import HeadRef
from tests.app import bound_params
from tests.conftest import app_test

PAGE = "pages/1_Head_atlas.py"


def atlas_page(**query):
    return app_test(PAGE, model="tiny-llama", n=6, len=32, **query)


def stored_metrics(at):
    state = at.session_state._state._state.filtered_state
    return [value for key, value in state.items() if key.startswith("atlas_metrics@tiny-llama")]


def test_atlas_shows_scatter_passport_table_and_downloads():
    at = atlas_page().run()
    assert not at.exception and not at.error
    assert at.subheader[0].value.startswith("Passport: head ")
    assert [s.value for s in at.subheader[1:]] == ["Layer breakdown", "All heads"]
    stored = stored_metrics(at)
    assert len(stored) == 1 and isinstance(stored[0], pd.DataFrame) and len(stored[0]) == 8
    assert {"layer", "head", "induction", "behaviour", "confidence"} <= set(stored[0].columns)
    assert any(len(df.value) == 8 and "behaviour" in df.value.columns for df in at.dataframe)  # all heads
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Download CSV" in labels and any("HTML report" in label for label in labels)
    assert at.selectbox(key="x").value == "previous_token" and at.selectbox(key="y").value == "induction"
    assert bound_params(at) == {"corpus", "n", "len", "x", "y", "colour", "heat"}


def test_choosing_a_head_opens_its_card_and_shares_it():
    at = atlas_page().run()
    at.selectbox(key="atlas_head").set_value("1.2").run()
    assert not at.exception
    assert at.subheader[0].value == "Passport: head 1.2"
    assert at.session_state["selected_head"] == HeadRef(1, 2)
    assert at.query_params["layer"] == "1" and at.query_params["head"] == "2"


def test_url_reopens_the_same_view():
    at = atlas_page(layer=1, head=3, x="layer", y="copying", colour="entropy", heat="attention_sink").run()
    assert not at.exception and not at.error
    assert at.subheader[0].value == "Passport: head 1.3"
    assert at.selectbox(key="x").value == "layer" and at.selectbox(key="y").value == "copying"
    assert at.selectbox(key="colour").value == "entropy"
    assert at.selectbox(key="heat").value == "attention_sink"
    assert at.number_input(key="n").value == 6 and at.number_input(key="len").value == 32


def test_hostile_url_values_give_defaults_or_a_warning():
    at = app_test(PAGE, model="tiny-llama", n="6", len="1e400", x="<script>", y="", colour="1e309",
                  heat="induction,copying", layer="9", head="-1").run()
    assert not at.exception and not at.error
    assert at.number_input(key="len").value == 128 and at.number_input(key="n").value == 6
    assert (at.selectbox(key="x").value, at.selectbox(key="y").value) == ("previous_token", "induction")
    assert at.selectbox(key="colour").value == "behaviour" and at.selectbox(key="heat").value == "induction"
    assert any("out of range" in w.value for w in at.warning)  # head 9.-1 is ignored, with a word why
    assert at.query_params.get("layer") != "9" and "len" not in at.query_params
    at = app_test(PAGE, model="tiny-llama", n="-inf", len="32").run()
    assert not at.exception and not at.error and at.number_input(key="n").value == 64


def test_a_missing_corpus_folder_is_an_error_box_and_the_form_keeps_its_values(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADVIS_CORPUS_ROOTS", str(tmp_path))
    at = atlas_page().run()
    at.text_input(key="corpus").set_value(str(tmp_path / "no_such_folder"))
    at.button[0].click().run()
    assert not at.exception
    assert any("There is no corpus" in e.value for e in at.error)
    assert at.text_input(key="corpus").value == str(tmp_path / "no_such_folder")
    at.text_input(key="corpus").set_value("  ")
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert any(c.value.startswith("Probe: ") and "folder" not in c.value for c in at.caption)


def test_a_corpus_folder_with_text_works_and_reopens_from_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADVIS_CORPUS_ROOTS", str(tmp_path))
    (tmp_path / "doc.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    at = atlas_page().run()
    at.text_input(key="corpus").set_value(str(tmp_path))
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert any(f"folder {tmp_path}" in c.value for c in at.caption)
    assert any("hold more text than the atlas reads" in i.value for i in at.info)
    reopened = atlas_page(corpus=str(tmp_path)).run()
    assert not reopened.exception and not reopened.error
    assert reopened.text_input(key="corpus").value == str(tmp_path)
    assert any(f"folder {tmp_path}" in c.value for c in reopened.caption)


def counting_compute_atlas(monkeypatch) -> list:
    """Count the page's calls of compute_atlas (the page imports it afresh on every run)."""
    calls = []
    real = atlas_run.compute_atlas

    def counted(*args, **kwargs):
        calls.append(kwargs.get("seq_len"))
        return real(*args, **kwargs)

    monkeypatch.setattr(atlas_run, "compute_atlas", counted)
    return calls


def store_caption(at) -> str:
    return next(c.value for c in at.caption if c.value.startswith("Head atlas: computed at "))


def test_a_reopened_atlas_comes_from_the_store_and_recompute_computes_it_again(monkeypatch):
    calls = counting_compute_atlas(monkeypatch)
    first = app_test(PAGE, model="tiny-llama", n=3, len=24).run()
    assert not first.exception and not first.error
    computed = len(calls)
    assert "just now" in store_caption(first) or computed == 0  # 0: an earlier test stored this atlas
    reopened = app_test(PAGE, model="tiny-llama", n=3, len=24).run()  # a new session, as after a restart
    assert not reopened.exception and not reopened.error
    assert len(calls) == computed and "from the store" in store_caption(reopened)
    assert len(stored_metrics(reopened)[0]) == 8
    reopened.button(key="atlas_recompute").click().run()
    assert not reopened.exception and not reopened.error
    assert len(calls) == computed + 1 and "just now" in store_caption(reopened)
    reopened.run()  # a plain rerun after Recompute reads the new stored atlas
    assert len(calls) == computed + 1 and "from the store" in store_caption(reopened)


def test_a_damaged_stored_atlas_is_recomputed_with_a_warning(monkeypatch):
    from headvis_core.store import default_store

    at = app_test(PAGE, model="tiny-llama", n=2, len=16).run()
    assert not at.exception and not at.error
    store = default_store()
    key = next(e.key for e in store.entries(kind="atlas") if e.inputs.get("n_seqs") == 2
               and e.inputs.get("seq_len") == 16)
    results, _ = store._open()
    blob = bytearray(results.get(key))
    blob[-5] ^= 0xFF  # one flipped byte in the pickled value
    results.set(key, bytes(blob))
    calls = counting_compute_atlas(monkeypatch)
    reopened = app_test(PAGE, model="tiny-llama", n=2, len=16).run()
    assert not reopened.exception and not reopened.error
    assert len(calls) == 1 and "just now" in store_caption(reopened)
    assert any("damaged" in w.value and "computed again" in w.value for w in reopened.warning)


@pytest.mark.parametrize("folder", ["/etc", "/", "../../../../etc", "~"])
def test_a_url_corpus_outside_the_allowed_roots_is_refused_and_never_read(folder, monkeypatch, tmp_path):
    monkeypatch.setenv("HEADVIS_CORPUS_ROOTS", str(tmp_path))
    calls = counting_compute_atlas(monkeypatch)
    at = atlas_page(corpus=folder).run()
    assert not at.exception
    assert any("allowed corpus roots" in e.value for e in at.error)
    assert calls == [] and not stored_metrics(at)


def test_the_home_page_links_to_a_stored_atlas():
    at = app_test(PAGE, model="tiny-llama", n=4, len=20).run()
    assert not at.exception and not at.error
    home = app_test("Home.py", model="tiny-llama").run()
    assert not home.exception and not home.error
    links = [m.value for m in home.markdown if m.value.startswith("[atlas, computed ")]
    assert any("](Head_atlas?" in link and "n=4" in link and "len=20" in link and "model=tiny-llama" in link
               for link in links)
    target = next(link for link in links if "n=4" in link and "len=20" in link)
    query = dict(part.split("=", 1) for part in target.split("](Head_atlas?", 1)[1].rstrip(")").split("&"))
    reopened = app_test(PAGE, **{k: v for k, v in query.items() if k != "model"}, model=query["model"]).run()
    assert not reopened.exception and not reopened.error
    assert "from the store" in store_caption(reopened)


@pytest.mark.real_model
def test_an_atlas_too_large_for_memory_is_refused_with_the_estimate(monkeypatch):
    calls = counting_compute_atlas(monkeypatch)
    at = app_test(PAGE, model="smollm2-135m", timeout=300, n=16, len=8192).run()
    assert not at.exception
    assert calls == []
    assert any("needs about" in e.value and "over the limit of" in e.value for e in at.error)


def test_a_corpus_named_under_the_default_roots_is_read(corpus_dir, monkeypatch):
    monkeypatch.delenv("HEADVIS_CORPUS_ROOTS", raising=False)  # the default roots: ../shared/corpus first
    at = atlas_page(corpus="gutenberg").run()
    assert not at.exception and not at.error
    assert any(f"folder {(corpus_dir / 'gutenberg').resolve()}" in c.value for c in at.caption)  # links resolved


def test_the_operator_setting_in_secrets_names_the_allowed_corpus_roots(tmp_path, monkeypatch):
    monkeypatch.delenv("HEADVIS_CORPUS_ROOTS", raising=False)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("The cat sat on the mat. " * 200, encoding="utf-8")
    at = app_test(PAGE, corpus=str(texts), n=2, len=16)
    at.secrets["corpus_roots"] = [str(tmp_path)]
    at.run()
    assert not at.exception and not at.error
    refused = app_test(PAGE, corpus=str(texts), n=2, len=16).run()  # no setting: the defaults refuse it
    assert any("allowed" in e.value for e in refused.error)
