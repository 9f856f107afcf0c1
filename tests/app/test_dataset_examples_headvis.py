"""The Dataset examples page with issue #11 wired in: custom sequences, projections, export, HeadVis data, and
HeadVis deep links (?layer=&head=&tab=&interval=, ?scan=) that reopen the same view."""

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from tests.app.test_dataset_examples import control, downloads, iframes, run_scan_on_page
from tests.conftest import app_test

PAGE = "pages/3_Dataset_examples.py"


def url_in_the_browser(at) -> dict[str, str]:
    """The query parameters the browser shows after this run.

    The page writes some itself (``at.query_params``: model, scan, layer, head); a widget bound with
    ``bind="query-params"`` is written by Streamlit's frontend, which AppTest does not run: the parameter
    named by the widget's ``query_param_key`` gets the label of the chosen option, and is dropped while the
    widget holds its default. This reproduces that from the widgets' protos.
    """
    params = {key: value for key, value in at.query_params.items()}

    def put(key, value, default):
        params.pop(key, None)
        if value != default:
            params[key] = value

    for w in at.get("button_group"):
        if w.proto.query_param_key:
            labels = [option.content for option in w.proto.options]
            put(w.proto.query_param_key, [labels[i] for i in w.indices], [labels[i] for i in w.proto.default])
            if w.proto.query_param_key in params:
                params[w.proto.query_param_key] = params[w.proto.query_param_key][0]
    for w in at.get("selectbox"):
        if w.proto.query_param_key:
            put(w.proto.query_param_key, w.proto.options[w.index], w.proto.options[w.proto.default])
    for w in at.get("radio"):
        if w.proto.query_param_key:
            put(w.proto.query_param_key, w.proto.options[w.index], w.proto.options[w.proto.default])
    for w in at.get("checkbox"):
        if w.proto.query_param_key:
            put(w.proto.query_param_key, str(w.value).lower(), str(w.proto.default).lower())
    for w in at.get("number_input"):
        if w.proto.query_param_key:
            put(w.proto.query_param_key, str(int(w.value)), str(int(w.proto.default)))
    for w in at.get("text_input"):
        if w.proto.query_param_key:
            put(w.proto.query_param_key, w.value, w.proto.default)
    return params


def figures(at):
    return [chart.proto.spec for chart in at.get("plotly_chart")]


def captions(at):
    return [c.value for c in at.caption]


def test_custom_sequences_projections_export_and_headvis_data_on_the_page(scans_dir, text_dir, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("HEADVIS_CORPUS_ROOTS", str(tmp_path))  # corpora and HeadVis data under the allowed roots
    at = app_test(PAGE, layer=1, head=2, interval=-1).run()
    at = run_scan_on_page(at, text_dir)
    assert not at.exception and not at.error, at.exception
    assert control(at, "interval").value == "-1"  # HeadVis's interval -1: the custom sequences
    assert any("custom_sequences shape" in c for c in captions(at))
    at.text_area(key="ex_custom_text").set_value("the <b>cat</b> sat")
    at = at.button(key="ex_custom_add").click().run()
    assert not at.exception and not at.error
    assert any("custom 1: the <b>cat</b> sat" in t.value for t in at.text)
    assert all("<b>cat" not in v for v in iframes(at)) and any("&lt;" in v for v in iframes(at))
    # the same sequences under ?tab=custom, from a URL in a new session
    url = {k: v for k, v in url_in_the_browser(at).items() if k != "interval"}
    as_tab = app_test(PAGE, **url, tab="custom").run()
    assert not as_tab.exception and control(as_tab, "tab").value == "custom"
    assert [t.value for t in as_tab.text if t.value.startswith("custom ")] == ["custom 1: the <b>cat</b> sat"]
    assert iframes(as_tab) == iframes(at)
    at = at.button(key="ex_custom_delete_1").click().run()
    assert not any("custom 1" in t.value for t in at.text)
    at.text_area(key="ex_custom_text").set_value("   ")
    at = at.button(key="ex_custom_add").click().run()
    assert at.error and not at.exception
    at = control(at, "tab").set_value("pca").run()
    at.number_input(key="ex_pca_pairs").set_value(40)
    at = at.button(key="ex_pca_run").click().run()
    assert not at.exception, at.exception
    assert at.selectbox(key="pca_kind").value == "O"
    at.text_input(key="pca_prompt").set_value("a b c a <script>b c")
    at = at.run()
    assert not at.exception and not at.error and len(figures(at)) == 1
    assert "<script>" not in figures(at)[0]
    assert {"Download projection (HTML)", "Download pairs (CSV)"} <= downloads(at)
    at = at.button(key="ex_export").click().run()
    assert not at.exception and not at.error
    assert "Download HeadVis data (zip)" in downloads(at)
    # open the exported tree as HeadVis data
    data = at.session_state["ex_export_zip"][1]
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path / "tree")
    at2 = app_test(PAGE, layer=0, head=1, interval="abc").run()
    at2 = at2.text_input(key="ex_tree").set_value(str(tmp_path / "tree" / "data")).run()
    at2 = at2.button(key="ex_open_tree").click().run()
    assert not at2.exception and not at2.error, at2.exception
    assert at2.subheader[0].value.startswith("Head 0.1 on 12 windows")
    assert any("?interval=abc" in c for c in captions(at2))
    assert at2.button(key="ex_export").disabled
    at2 = control(at2, "tab").set_value("pca").run()
    assert any("Projections need" in c for c in captions(at2)) and not at2.exception
    at2 = control(at2, "tab").set_value("custom").run()
    assert at2.button(key="ex_custom_add").disabled is False
    at2 = at2.text_input(key="ex_tree").set_value(str(tmp_path)).run()
    at2 = at2.button(key="ex_open_tree").click().run()
    assert at2.error and "not HeadVis data" in at2.error[0].value and not at2.exception
    at2 = at2.text_input(key="ex_tree").set_value("/etc").run()
    at2 = at2.button(key="ex_open_tree").click().run()
    assert at2.error and "allowed" in at2.error[0].value and not at2.exception


def test_interval_and_tab_set_on_the_page_are_in_the_url_and_reopen_the_same_view(scans_dir, text_dir):
    at = run_scan_on_page(app_test(PAGE, layer=1, head=2).run(), text_dir)
    assert url_in_the_browser(at).keys() == {"model", "scan", "layer", "head"}  # every choice at its default
    at = control(at, "interval").set_value("7").run()
    assert not at.exception and not at.error
    url = url_in_the_browser(at)
    assert url["interval"] == "7" and "tab" not in url
    decile_7 = [c for c in captions(at) if c.startswith("Decile 7:")]
    assert decile_7 and iframes(at)
    reopened = app_test(PAGE, **url).run()
    assert not reopened.exception and not reopened.error
    assert control(reopened, "interval").value == "7"
    assert [c for c in captions(reopened) if c.startswith("Decile 7:")] == decile_7
    assert iframes(reopened) == iframes(at)  # the same windows, drawn the same
    # the top interval is the default: it leaves the URL, and the URL without it opens the top windows again
    at = control(at, "interval").set_value("top").run()
    assert "interval" not in url_in_the_browser(at)
    assert iframes(app_test(PAGE, **url_in_the_browser(at)).run()) == iframes(at)
    at = control(at, "tab").set_value("tokens").run()
    at = at.number_input(key="min_count").set_value(1).run()
    url = url_in_the_browser(at)
    assert url["tab"] == "tokens" and url["min_count"] == "1"
    reopened = app_test(PAGE, **url).run()
    assert control(reopened, "tab").value == "tokens" and reopened.number_input(key="min_count").value == 1
    assert [d.value.to_dict() for d in reopened.dataframe] == [d.value.to_dict() for d in at.dataframe]


def test_projection_view_choices_are_in_the_url_and_reopen_the_same_figure(scans_dir, text_dir):
    at = run_scan_on_page(app_test(PAGE, layer=1, head=1, tab="pca").run(), text_dir)
    at.number_input(key="ex_pca_pairs").set_value(30)
    at = at.button(key="ex_pca_run").click().run()
    assert not at.exception and not at.error
    colours = at.selectbox(key="pca_colour").options
    assert {"query token", "key token", "distance", "attention", "norm", "query position"} <= set(colours)
    at.selectbox(key="pca_kind").set_value("Q")
    at.selectbox(key="pca_colour").set_value("attention")
    at.text_input(key="pca_prompt").set_value("b a b a")
    at = at.checkbox(key="pca_3d").check().run()
    assert not at.exception and not at.error
    url = url_in_the_browser(at)
    assert {k: url[k] for k in ("tab", "pca_kind", "pca_colour", "pca_3d", "pca_prompt")} == {
        "tab": "pca", "pca_kind": "Q", "pca_colour": "attention", "pca_3d": "true", "pca_prompt": "b a b a"}
    assert '"scatter3d"' in figures(at)[0] and "attention A[q,k]" in figures(at)[0]
    assert '"name":"prompt"' in figures(at)[0].replace(" ", "")  # the typed prompt's pairs are drawn in
    reopened = app_test(PAGE, **url).run()
    assert not reopened.exception and not reopened.error
    assert reopened.selectbox(key="pca_colour").value == "attention" and reopened.checkbox(key="pca_3d").value
    assert figures(reopened) == figures(at)
    reopened.text_input(key="pca_prompt").set_value("   ")  # nothing to project: an error, the cloud stays
    reopened = reopened.run()
    assert not reopened.exception and reopened.error and len(figures(reopened)) == 1
    assert '"name":"prompt"' not in figures(reopened)[0].replace(" ", "")
    assert "Download projection (HTML)" in downloads(reopened) and "Prepare HeadVis data" in {
        b.label for b in reopened.button}
    hostile = app_test(PAGE, **{**url, "pca_colour": "<script>", "pca_kind": "Z", "tab": "nope"}).run()
    assert not hostile.exception and control(hostile, "tab").value == "examples"


def test_an_imported_tree_reopens_from_scan_in_the_url_and_one_outside_the_roots_is_refused(
        scans_dir, text_dir, tmp_path, monkeypatch):
    at = run_scan_on_page(app_test(PAGE).run(), text_dir)
    at = at.button(key="ex_export").click().run()
    assert not at.exception and not at.error
    zipfile.ZipFile(io.BytesIO(at.session_state["ex_export_zip"][1])).extractall(text_dir / "exported")
    zipfile.ZipFile(io.BytesIO(at.session_state["ex_export_zip"][1])).extractall(tmp_path / "elsewhere")
    tree = text_dir / "exported" / "data"
    at = app_test(PAGE, layer=1, head=3).run()
    at = at.text_input(key="ex_tree").set_value(str(tree)).run()
    at = at.button(key="ex_open_tree").click().run()
    assert not at.exception and not at.error
    control(at, "interval").set_value("9").run()
    url = url_in_the_browser(at)
    assert url["scan"] == str(tree.resolve()) and url["interval"] == "9"
    reopened = app_test(PAGE, **url).run()
    assert not reopened.exception and not reopened.error
    assert reopened.subheader[0].value == at.subheader[0].value == "Head 1.3 on 12 windows of 8 tokens"
    assert iframes(reopened) == iframes(at) and control(reopened, "interval").value == "9"
    relative = app_test(PAGE, **{**url, "scan": "exported/data"}).run()  # a path under a root, as typed
    assert not relative.exception and not relative.error and iframes(relative) == iframes(at)
    # the same tree outside the allowed roots is refused, with the reason; a folder that is no tree too
    for scan, message in ((tmp_path / "elsewhere" / "data", "only from the allowed corpus roots"),
                          (text_dir, "not HeadVis data")):
        refused = app_test(PAGE, scan=str(scan)).run()
        assert not refused.exception and not refused.subheader and not iframes(refused)
        assert any(message in e.value for e in refused.error), [e.value for e in refused.error]


def test_an_imported_tree_with_warnings_lists_them_on_the_page(scans_dir, text_dir):
    at = run_scan_on_page(app_test(PAGE).run(), text_dir)
    at = at.button(key="ex_export").click().run()
    zipfile.ZipFile(io.BytesIO(at.session_state["ex_export_zip"][1])).extractall(text_dir / "exported")
    tree = text_dir / "exported" / "data"
    clean = app_test(PAGE, scan=str(tree)).run()
    assert not clean.exception and not clean.error and clean.subheader
    assert not any("about this HeadVis data" in e.label for e in clean.expander)
    (tree / "server_config.json").unlink()  # the frontend would log a failed fetch: a warning, not an error
    warned = app_test(PAGE, scan=str(tree)).run()
    assert not warned.exception and not warned.error and warned.subheader
    labels = [e.label for e in warned.expander if "about this HeadVis data" in e.label]
    assert labels == ["1 warning(s) about this HeadVis data"], [e.label for e in warned.expander]
    assert any("server_config.json" in t.value for t in warned.text)


# -- issue #11's review of the page ------------------------------------------------------------------------------

def exported_tree(at, root):
    """Export the scan shown in ``at`` and unzip it under ``root`` (an allowed corpus root): the tree's path."""
    at = at.button(key="ex_export").click().run()
    assert not at.exception and not at.error, at.exception
    zipfile.ZipFile(io.BytesIO(at.session_state["ex_export_zip"][1])).extractall(root / "exported")
    return root / "exported" / "data"


def custom_texts(at):
    return [t.value for t in at.text if t.value.startswith("custom ")]


def test_a_tree_exported_with_a_custom_sequence_opens_and_takes_adds_and_deletes(scans_dir, text_dir):
    at = run_scan_on_page(app_test(PAGE, layer=1, head=2, interval=-1).run(), text_dir)
    at.text_area(key="ex_custom_text").set_value("the cat sat")
    at = at.button(key="ex_custom_add").click().run()
    assert custom_texts(at) == ["custom 1: the cat sat"]
    tree = exported_tree(at, text_dir)  # the custom sequence goes with it, as "c1"
    opened = app_test(PAGE, scan=str(tree), layer=1, head=2, interval=-1).run()
    assert not opened.exception and not opened.error, opened.exception
    assert control(opened, "interval").value == "-1" and custom_texts(opened) == ["custom c1: the cat sat"]
    assert len(iframes(opened)) == 1
    opened.text_area(key="ex_custom_text").set_value("a dog ran")
    opened = opened.button(key="ex_custom_add").click().run()
    assert not opened.exception and not opened.error, opened.exception
    assert custom_texts(opened) == ["custom c1: the cat sat", "custom c2: a dog ran"]
    assert opened.text_area(key="ex_custom_text").value == ""  # the box is emptied: a second click adds nothing
    opened = opened.button(key="ex_custom_add").click().run()
    assert opened.error and len(custom_texts(opened)) == 2 and not opened.exception
    opened = opened.button(key="ex_custom_delete_c1").click().run()
    assert not opened.exception and custom_texts(opened) == ["custom c2: a dog ran"]
    as_tab = app_test(PAGE, scan=str(tree), layer=1, head=2, tab="custom").run()
    assert not as_tab.exception and custom_texts(as_tab) == ["custom c2: a dog ran"]


@pytest.mark.parametrize("theirs, ours", [("umap", "pca"), ("metrics", "tokens"), ("sequences", "examples")])
def test_a_headvis_tab_name_in_the_url_opens_our_tab_and_stays_in_the_url(scans_dir, text_dir, theirs, ours):
    tree = exported_tree(run_scan_on_page(app_test(PAGE).run(), text_dir), text_dir)
    at = app_test(PAGE, scan=str(tree), layer=1, head=2, tab=theirs).run()
    assert not at.exception and not at.error, at.exception
    assert control(at, "tab").value == ours
    assert url_in_the_browser(at).get("tab") == (None if ours == "examples" else ours)
    notes = [c for c in captions(at) if c.startswith("?tab")]
    assert notes == ([] if ours == "examples" else [f"?tab={theirs} \\(HeadVis's name\\) opens this page's {ours} "
                                                     "tab\\."])
    if ours == "pca":
        assert any("Projections need" in c for c in captions(at))
    if ours == "tokens":
        assert len(at.dataframe) == 3


def test_an_interval_out_of_range_says_it_shows_the_top_windows_and_does(scans_dir, text_dir):
    at = run_scan_on_page(app_test(PAGE, layer=1, head=2).run(), text_dir)
    top = iframes(at)
    url = url_in_the_browser(at)
    for bad in ("99", "abc", "0"):
        reopened = app_test(PAGE, **url, interval=bad).run()
        assert not reopened.exception and not reopened.error
        assert control(reopened, "interval").value == "top" and "interval" not in url_in_the_browser(reopened)
        notes = [c for c in captions(reopened) if c.startswith("?interval")]
        assert len(notes) == 1 and "showing top" in notes[0] and bad in notes[0], notes
        assert iframes(reopened) == top


def test_a_scan_name_too_long_for_the_file_system_is_a_message(scans_dir, text_dir):
    for scan in ("a" * 300, str(text_dir / ("a" * 300)), "x/" + "a" * 300):
        at = app_test(PAGE, scan=scan).run()
        assert not at.exception, at.exception
        assert at.error and at.button(key="ex_run")
    at = app_test(PAGE).run()
    at = at.text_input(key="ex_tree").set_value(str(text_dir / ("b" * 300))).run()
    at = at.button(key="ex_open_tree").click().run()
    assert not at.exception and at.error


@pytest.mark.parametrize("field, value", [("scatter", {"default_x": ["a"]}), ("dimensions", {"primary": ["a"]}),
                                          ("n_intervals", 10 ** 30),
                                          ("head_data_pattern", "../../outside/L{layer}H{head}.json")])
def test_a_malformed_tree_is_refused_with_a_message_that_fits_headvis_data(scans_dir, text_dir, field, value):
    tree = exported_tree(run_scan_on_page(app_test(PAGE).run(), text_dir), text_dir)
    config = json.loads((tree / "config.json").read_text())
    config[field] = value
    (tree / "config.json").write_text(json.dumps(config))
    at = app_test(PAGE, scan=str(tree)).run()
    assert not at.exception, at.exception
    assert at.error and field in at.error[0].value.replace("\\", "") and not iframes(at)
    assert "Fix the HeadVis data" in at.error[0].value and "run the scan again" not in at.error[0].value.lower()


def test_add_on_a_tree_whose_custom_sequences_is_a_file_is_a_message(scans_dir, text_dir):
    tree = exported_tree(run_scan_on_page(app_test(PAGE).run(), text_dir), text_dir)
    shutil.rmtree(tree / "custom_sequences")
    (tree / "custom_sequences").write_text("a file")
    at = app_test(PAGE, scan=str(tree), layer=0, head=1, tab="custom").run()
    assert not at.exception, at.exception
    at.text_area(key="ex_custom_text").set_value("one two")
    at = at.button(key="ex_custom_add").click().run()
    assert not at.exception, at.exception
    assert at.error and "cannot write custom\\_sequences/L0H1\\.json" in at.error[0].value
    assert (tree / "custom_sequences").read_text() == "a file"


def test_a_tree_of_another_model_names_it_escaped_and_one_of_another_shape_says_so(scans_dir, text_dir):
    tree = exported_tree(run_scan_on_page(app_test(PAGE).run(), text_dir), text_dir)
    config = json.loads((tree / "config.json").read_text())
    (tree / "config.json").write_text(json.dumps({**config, "model_name": "**bold** [x](http://e.com)"}))
    at = app_test(PAGE, scan=str(tree), tab="custom").run()
    assert not at.exception and not at.error
    assert at.warning[0].value.startswith("This scan was made with \\*\\*bold\\*\\* \\[x\\]")
    assert at.button(key="ex_custom_add").disabled
    assert at.button(key="ex_custom_add").help.startswith("Needs \\*\\*bold\\*\\* \\[x\\]\\(http\\:")
    # the same name, another shape (a tree of 3 layers named tiny-llama): the message says what differs
    (tree / "config.json").write_text(json.dumps({**config, "model_name": "tiny-llama", "n_layers": 3}))
    other = app_test(PAGE, scan=str(tree)).run()
    assert not other.exception and not other.error
    assert [w.value for w in other.warning] == ["This scan was made with a tiny\\-llama of 3 layers x 4 heads; the "
                                                "one loaded has 2 x 4."]


def test_link_to_page_escapes_its_label_as_escape_markdown_does(monkeypatch):
    import headvis_ui as ui

    shown = []
    monkeypatch.setattr(ui.st, "markdown", shown.append)
    label = "Why :red[does] 1.2 attend here?"
    ui.link_to_page("pages/1_Head_atlas.py", label, {"model": "m"})
    assert shown[0].startswith(f"[{ui.escape_markdown(label)}](")


def test_a_broken_custom_sequences_file_is_a_message_on_the_page(scans_dir, text_dir):
    tree = exported_tree(run_scan_on_page(app_test(PAGE).run(), text_dir), text_dir)
    at = app_test(PAGE, scan=str(tree), layer=0, head=1, tab="custom").run()
    assert not at.exception and not at.error
    (tree / "custom_sequences" / "L0H1.json").write_text(json.dumps({"sequences": [{"sequence_id": "c1"}]}))
    at = at.run()
    assert not at.exception, at.exception
    assert at.error and "custom\\_sequences/L0H1\\.json" in at.error[0].value


def test_a_scan_stored_before_the_headvis_statistics_says_so_on_the_page(scans_dir, text_dir):
    from headvis_core.scan.store import read_stage, write_stage

    at = run_scan_on_page(app_test(PAGE).run(), text_dir)
    folder = Path(at.session_state["ex_scan_folder"])
    assert not any("stored before the HeadVis statistics" in i.value for i in at.info)
    status, arrays, meta = read_stage(folder)
    old = {name: array for name, array in arrays.items() if name != "score_sum" and not name.startswith("high_")}
    write_stage(folder, status, old, {k: v for k, v in meta.items() if k != "stage"}, {})
    reopened = app_test(PAGE, scan=folder.name).run()
    assert not reopened.exception and not reopened.error and reopened.subheader
    assert any("stored before the HeadVis statistics" in i.value for i in reopened.info), \
        [i.value for i in reopened.info]
