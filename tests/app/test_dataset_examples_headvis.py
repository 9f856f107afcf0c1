"""The Dataset examples page with issue #11 wired in: custom sequences, projections, export, HeadVis data,
deep links (?interval=)."""


from tests.app.test_dataset_examples import run_scan_on_page
from tests.conftest import app_test

PAGE = "pages/3_Dataset_examples.py"


def test_custom_sequences_projections_export_and_headvis_data_on_the_page(scans_dir, text_dir, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("HEADVIS_CORPUS_ROOTS", str(tmp_path))  # corpora and HeadVis data under the allowed roots
    at = app_test(PAGE, layer=1, head=2, interval=-1).run()
    at = run_scan_on_page(at, text_dir)
    assert not at.exception and not at.error, at.exception
    assert [t.label for t in at.tabs][2:] == ["Top"] + [f"Decile {d}" for d in range(10, 0, -1)]
    assert any(e.label == "Custom sequences for this head" for e in at.expander)
    at.text_area(key="ex_custom_text").set_value("the <b>cat</b> sat")
    at = at.button(key="ex_custom_add").click().run()
    assert not at.exception and not at.error
    assert any("custom 1: the <b>cat</b> sat" in t.value for t in at.text)
    at = at.button(key="ex_custom_delete_1").click().run()
    assert not any("custom 1" in t.value for t in at.text)
    at.text_area(key="ex_custom_text").set_value("   ")
    at = at.button(key="ex_custom_add").click().run()
    assert at.error and not at.exception
    at.number_input(key="ex_pca_pairs").set_value(40)
    at = at.button(key="ex_pca_run").click().run()
    assert not at.exception, at.exception
    assert at.selectbox(key="ex_pca_kind").value == "O"
    at.text_input(key="ex_pca_prompt").set_value("a b c a b c")
    at = at.run()
    assert not at.exception
    at = at.button(key="ex_export").click().run()
    assert not at.exception and not at.error
    assert "Download HeadVis data (zip)" in {b.label for b in at.get("download_button")}
    # open the exported tree as HeadVis data
    import io
    import zipfile
    data = at.session_state["ex_export_zip"][1]
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path / "tree")
    at2 = app_test(PAGE, layer=0, head=1, interval="abc").run()
    at2 = at2.text_input(key="ex_tree").set_value(str(tmp_path / "tree" / "data")).run()
    at2 = at2.button(key="ex_open_tree").click().run()
    assert not at2.exception and not at2.error, at2.exception
    assert at2.subheader[0].value.startswith("Head 0.1 on 12 windows")
    assert any("?interval=abc" in c.value for c in at2.caption)
    assert at2.button(key="ex_export").disabled and at2.button(key="ex_custom_add").disabled is False
    assert any("need the scan's windows" in c.value or "Projections need" in c.value for c in at2.caption)
    at2 = at2.text_input(key="ex_tree").set_value(str(tmp_path)).run()
    at2 = at2.button(key="ex_open_tree").click().run()
    assert at2.error and "not HeadVis data" in at2.error[0].value and not at2.exception
    at2 = at2.text_input(key="ex_tree").set_value("/etc").run()
    at2 = at2.button(key="ex_open_tree").click().run()
    assert at2.error and "allowed" in at2.error[0].value and not at2.exception
