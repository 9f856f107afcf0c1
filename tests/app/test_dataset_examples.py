import pytest

from tests.app import bound_params
from tests.conftest import app_test

PAGE = "pages/3_Dataset_examples.py"


def run_scan_on_page(at, corpus, windows=12):
    at.text_input(key="ex_corpus").set_value(str(corpus))
    at.number_input(key="ex_window").set_value(8)
    at.number_input(key="ex_max_windows").set_value(windows)
    at.number_input(key="ex_per_decile").set_value(1)
    return at.button(key="ex_run").click().run()


def iframes(at):
    return [e.proto.srcdoc for e in at.get("iframe")]


def control(at, key):
    """The segmented control (``st.segmented_control``) with this key."""
    return next(w for w in at.get("button_group") if w.key == key)


def downloads(at):
    return {b.label for b in at.get("download_button")}


def test_scan_from_the_page_shows_deciles_tokens_and_distances(scans_dir, text_dir):
    at = app_test(PAGE, layer=1, head=2).run()
    assert not at.exception and "Run a scan or open" in at.info[0].value
    at = run_scan_on_page(at, text_dir)
    assert not at.exception and not at.error
    assert any("photo.txt: binary" in w.value for w in at.warning)  # the binary file is skipped, not fatal
    assert "Scanned 12 windows" in at.success[0].value
    assert at.subheader[0].value == "Head 1.2 on 12 windows of 8 tokens"
    assert [t.label for t in at.tabs] == ["Run a scan", "Open a stored scan (0)"]
    view, interval = control(at, "tab"), control(at, "interval")
    assert [o.content for o in view.proto.options] == ["examples", "tokens", "pca", "custom"]  # HeadVis's ?tab=
    assert [o.content for o in interval.proto.options] == ["top"] + [str(d) for d in range(10, 0, -1)] + ["-1"]
    assert view.value == "examples" and interval.value == "top"
    views = iframes(at)  # the exact top windows
    assert views and all(v.count("<script") == 1 for v in views)
    assert len(at.dataframe) == 1  # the head summary
    assert at.query_params["scan"] == next(scans_dir.iterdir()).name
    assert at.query_params["layer"] == "1" and at.query_params["head"] == "2"
    assert {"Download examples (CSV)", "Download score histogram (HTML)"} <= downloads(at)
    at = view.set_value("tokens").run()
    assert not at.exception and not at.error and not iframes(at)
    assert len(at.dataframe) == 3  # query tokens, key tokens, head summary
    assert {"Download query tokens (CSV)", "Download key tokens (CSV)", "Download distances (CSV)"} <= downloads(at)


def test_a_stored_scan_reopens_from_the_url_and_a_corrupt_one_is_not_shown(scans_dir, text_dir):
    run_scan_on_page(app_test(PAGE).run(), text_dir)
    key = next(scans_dir.iterdir()).name
    at = app_test(PAGE, scan=key, layer=0, head=1).run()
    assert not at.exception and not at.error
    assert at.subheader[0].value == "Head 0.1 on 12 windows of 8 tokens"
    assert at.tabs[1].label == "Open a stored scan (1)"
    data_file = next((scans_dir / key).glob("complete-*.npz"))
    data_file.write_bytes(data_file.read_bytes()[:1000])  # a partial write
    at = app_test(PAGE, scan=key).run()
    assert not at.exception and "corrupt" in at.error[0].value and not iframes(at)
    at = run_scan_on_page(at, text_dir)  # running again recomputes it
    assert not at.exception and not at.error and "Scanned 12 windows" in at.success[0].value


@pytest.mark.parametrize("corpus, message", [
    ("/no/such/folder", "outside them"),  # not under the allowed corpus roots
    ("", "No corpus given"),
])
def test_missing_corpus_is_an_error(scans_dir, corpus, message):
    at = app_test(PAGE).run()
    at = run_scan_on_page(at, corpus)
    assert not at.exception and message in at.error[0].value


def test_folder_with_only_a_binary_file_is_an_error(scans_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADVIS_CORPUS_ROOTS", str(tmp_path))
    (tmp_path / "only.txt").write_bytes(b"\x00\x01\x02\x03")
    at = run_scan_on_page(app_test(PAGE).run(), tmp_path)
    assert not at.exception and "no readable" in at.error[0].value and "only.txt is binary" in at.error[0].value


@pytest.mark.parametrize("query, message", [
    # a path is read as HeadVis data, and only under the allowed roots
    ({"scan": "../../../etc", "layer": "abc", "head": "1"}, "only from the allowed corpus roots"),
    ({"scan": "/etc", "tab": "<script>", "interval": "1e400"}, "only from the allowed corpus roots"),
    ({"scan": "<script>alert(1)</script>", "layer": "1", "head": "99"}, "names no stored scan and no HeadVis data"),
    ({"scan": "[a](javascript:alert(1))/x", "tab": "**x**"}, r"\[a\]\(javascript\:alert\(1\)\)/x"),  # literal
    # a name is looked up in the scans root only
    ({"scan": "no-such-scan", "min_count": "inf"}, "No scan is stored"),
])
def test_hostile_url_values_give_a_message_not_a_traceback(scans_dir, text_dir, query, message):
    at = app_test(PAGE, **query).run()
    assert not at.exception
    assert at.number_input(key="ex_layer").value in (0, 1) and at.number_input(key="ex_head").value in (0, 1)
    assert not iframes(at)
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    # the message is shown literally (markdown escaped): the path is there once the escapes are read
    assert all(str(scans_dir) in e.value.replace("\\", "") for e in at.error if "No scan" in e.value)
    assert at.button(key="ex_run")  # the page still offers to run or open a scan


def test_a_scan_reopens_with_its_head_and_token_count_from_the_url(scans_dir, text_dir):
    run_scan_on_page(app_test(PAGE).run(), text_dir)
    key = next(scans_dir.iterdir()).name
    at = app_test(PAGE, scan=key, layer=1, head=3, tab="tokens", min_count=2).run()
    assert not at.exception and not at.error
    assert at.subheader[0].value == "Head 1.3 on 12 windows of 8 tokens"
    assert at.number_input(key="min_count").value == 2
    assert "min_count" in bound_params(at)


@pytest.mark.parametrize("corpus", ["/", "/etc", "../../../../etc", "~/.ssh"])
def test_a_corpus_outside_the_allowed_roots_is_refused_and_never_read(scans_dir, text_dir, corpus):
    at = run_scan_on_page(app_test(PAGE).run(), corpus)
    assert not at.exception
    assert any("allowed corpus roots" in e.value for e in at.error)
    assert not scans_dir.exists() or not any(scans_dir.iterdir())


def test_the_default_corpus_is_an_allowed_one(text_dir):
    at = app_test(PAGE).run()
    assert not at.exception and at.text_input(key="ex_corpus").value == str(text_dir)


def test_a_scan_over_the_memory_cap_is_refused_before_it_runs(scans_dir, text_dir, monkeypatch):
    monkeypatch.setenv("HEADVIS_MEMORY_CAP_GB", "0.01")  # under what this process already holds
    at = run_scan_on_page(app_test(PAGE).run(), text_dir)
    assert not at.exception
    assert any("needs about" in e.value and "over the limit of" in e.value for e in at.error)
    assert not scans_dir.exists() or not any(scans_dir.iterdir())


def test_picking_an_allowed_corpus_fills_the_corpus_box(text_dir, tmp_path, monkeypatch):
    (text_dir / "sub").mkdir()
    at = app_test(PAGE).run()
    picker = at.selectbox(key="ex_corpus_pick")
    assert [str(p) for p in picker.options] == [str(text_dir), str(text_dir / "sub")]
    picker.select_index(1).run()
    assert not at.exception and at.text_input(key="ex_corpus").value == str(text_dir / "sub")


def test_an_example_links_to_the_attribution_of_its_strongest_edge(scans_dir, text_dir):
    at = run_scan_on_page(app_test(PAGE, layer=1, head=2).run(), text_dir)
    assert not at.exception and not at.error
    links = [m.value for m in at.markdown if "Edge_attribution?" in m.value]
    assert links, "no example links to its edge"
    assert all("model=tiny-llama" in link and "layer=1&head=2" in link for link in links)
