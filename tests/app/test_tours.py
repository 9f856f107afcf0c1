"""The Tours page, driven with AppTest on tiny-llama: a step with its figure, links and downloads; URL state;
an error path (IOI needs single-token names, which a byte-level tokenizer lacks)."""

import pytest

from tests.conftest import app_test

PAGE = "pages/9_Tours.py"


@pytest.fixture(autouse=True)
def private_store(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADVIS_STORE_DIR", str(tmp_path / "store"))


def test_url_opens_a_step_with_its_sentence_figure_and_downloads():
    at = app_test(PAGE, tour="induction", step="2").run()
    assert not at.exception and not at.error
    assert at.selectbox(key="tour").value == "induction"
    assert at.selectbox(key="step").value == "2"
    finding = " ".join(w.value for w in at.warning) + " ".join(s.value for s in at.success)
    assert "previous-token" in finding  # the sentence written from the atlas
    assert len(at.get("plotly_chart")) == 1
    downloads = [d.proto.label for d in at.get("download_button")]
    assert "Download the tour as a notebook (.ipynb)" in downloads and "Download steps 1-2 as HTML" in downloads
    assert any("Head_atlas?model=tiny-llama" in m.value for m in at.markdown)

    at.selectbox(key="step").set_value("3").run()
    assert not at.exception and not at.error
    # (a bound widget's URL is written by the browser, which AppTest has not: the URL test is the one above)
    assert at.subheader[0].value.startswith("3. Induction heads")
    assert any("induction" in w.value for w in list(at.warning) + list(at.success))
    at.run()  # a second visit: the step comes from the result store
    assert any("from the result store" in c.value for c in at.caption)


def test_a_tour_that_cannot_run_on_this_model_says_why():
    at = app_test(PAGE, tour="ioi", step="1").run()
    assert not at.exception
    assert "single tokens" in " ".join(e.value for e in at.error)


def test_a_bad_url_step_falls_back_to_a_real_one():
    at = app_test(PAGE, tour="no-such-tour", step="99").run()
    assert not at.exception and not at.error
    assert at.selectbox(key="tour").value in ("induction", "ioi", "greater-than")
    assert at.selectbox(key="step").value == "1"
