"""Dataset examples: a head's windows across a corpus by decile, its top tokens and attention distances, the
projections of its Q/K/V/O and its custom sequences; every view choice is in the URL (HeadVis's deep links)."""

import shutil
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

import headvis_ui as ui
from headvis_core import scan as scans
from headvis_core.attribution.edge import EdgeSpec, attribution_link_for_window
from headvis_core.data.corpus import open_corpus
from headvis_core.data.roots import list_corpora, resolve_app_corpus
from headvis_core.errors import HeadVisError
from headvis_core.heads import HeadRef
from headvis_core.headvis_format.contract import CUSTOM_INTERVAL
from headvis_core.headvis_format.custom import add_custom_sequence, delete_custom_sequence, read_custom_sequences
from headvis_core.headvis_format.export import export_headvis
from headvis_core.headvis_format.importer import ImportedScan, example_from_record, open_any_scan
from headvis_core.headvis_format.links import DEFAULT_TAB, TABS, TOP_INTERVAL, page_view
from headvis_core.headvis_format.locate import scan_folder_from_url, tree_under_roots
from headvis_core.limits import check_scan_memory
from headvis_core.projections.clusters import delete_cluster, read_clusters, save_cluster
from headvis_core.projections.prompt import project_prompt, stored_pairs_table
from headvis_core.projections.run import ProjectionParams, project_scan
from headvis_core.projections.store import load_projections
from headvis_core.projections.umap_fit import umap_available
from headvis_core.scan import store as scan_store
from headvis_core.viz import projections as projection_figures
from headvis_core.viz import scan as scan_figures
from headvis_core.viz.token_view import token_view_html

loaded = ui.page_setup("Dataset examples")
info = loaded.info
state = st.session_state
ui.repair_url(integers=("min_count",), flags=("pca_3d",))


@st.cache_resource(max_entries=4, show_spinner="Opening the stored scan...")
def open_scan(folder: str, stamp: tuple) -> scans.ScanResult:
    # a stored scan or a HeadVis data/ tree
    return open_any_scan(Path(folder))  # stamp: the files' sizes and times, so a changed file is checked again


def files_stamp(folder: Path) -> tuple:
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()
                            if p.is_file()))
    except OSError:
        return ()


# -- head ---------------------------------------------------------------------------------------------------
chosen = ui.selected_head(loaded) or HeadRef(0, 0)
c1, c2, c3 = st.columns([1, 1, 3])
layer = c1.number_input("Layer", 0, info.n_layers - 1, chosen.layer, key="ex_layer")
head_index = c2.number_input("Head", 0, info.n_heads - 1, chosen.head, key="ex_head")
head = HeadRef(int(layer), int(head_index))
if head != ui.selected_head(loaded):
    ui.set_selected_head(head)
c3.caption("The head chosen here is shared with the other pages (and comes from the atlas when you click a head "
           "there).")

# -- scan: run or open ----------------------------------------------------------------------------------------
stored = [s for s in scans.list_scans(model_name=info.name)]
folder = None
url_scan = ui.query_param("scan")
if url_scan and "ex_scan_folder" not in state:
    try:
        state.ex_scan_folder = str(scan_folder_from_url(url_scan, ui.corpus_roots()))
    except HeadVisError as err:  # the page goes on: a scan can still be run or opened
        st.error(f"The link's scan is not opened: {ui.escape_markdown(str(err))}")  # it quotes the URL

run_tab, open_tab = st.tabs(["Run a scan", f"Open a stored scan ({len(stored)})"])
with run_tab:
    allowed_corpora = list_corpora(ui.corpus_roots())  # the app reads corpora only under the operator's allowed roots
    default_corpus = str(allowed_corpora[0]) if allowed_corpora else ""
    if allowed_corpora:
        st.selectbox("Allowed corpora", allowed_corpora, index=None, key="ex_corpus_pick", format_func=str,
                     placeholder="Pick a folder under the allowed corpus roots...",
                     on_change=lambda: state.update(ex_corpus=str(state.ex_corpus_pick or state.ex_corpus)))
    corpus_spec = st.text_input("Corpus", default_corpus, key="ex_corpus",
                                help="A folder of .txt files or a .txt or .jsonl file (field 'text') under the "
                                     "allowed corpus roots (set by the operator: HEADVIS_CORPUS_ROOTS), or a "
                                     "Hugging Face dataset name (needs the network).")
    r1, r2, r3 = st.columns(3)
    window_len = r1.number_input("Tokens per window", 2, min(info.n_ctx - 1, 1024), min(64, info.n_ctx - 1),
                                 key="ex_window")
    max_windows = r2.number_input("Windows (at most)", 1, 1_000_000, 200, key="ex_max_windows",
                                  help="A scan resumes where it stopped if interrupted; on a CPU, SmolLM2 reads "
                                       "a few hundred tokens a second.")
    per_decile = r3.number_input("Examples per decile", 1, 20, 4, key="ex_per_decile")
    if st.button("Run scan", type="primary", key="ex_run"):
        with ui.user_errors():
            # a path outside the allowed roots is refused
            corpus = open_corpus(resolve_app_corpus(corpus_spec, ui.corpus_roots()))
            for skipped in corpus.skipped:
                st.warning(f"Skipped {skipped.path}: {skipped.reason}.")
            if corpus.recoded:
                st.info(f"{len(corpus.recoded)} file(s) are not UTF-8 and were read as Windows-1252.")
            params = scans.ScanParams(window_len=int(window_len), max_windows=int(max_windows),
                                      examples_per_decile=int(per_decile))
            check_scan_memory(loaded, params.window_len, 8, params.max_windows)  # run_scan's batch size
            result = scans.run_scan(loaded, corpus, params, progress=ui.progress_bar("Scanning"))
        state.ex_scan_folder = str(result.path)
        st.success(f"Scanned {result.n_windows} windows of {corpus.description}.")
with open_tab:
    if not stored:
        st.caption("No stored scans for this model yet: run one.")
    else:
        by_label = {s.label: s for s in stored}
        labels = list(by_label)
        current = next((i for i, s in enumerate(stored) if str(s.folder) == state.get("ex_scan_folder")), None)
        picked = st.selectbox("Stored scans", labels, index=current, key="ex_stored",
                              placeholder="Choose a stored scan")
        if picked is not None and st.button("Open", key="ex_open"):
            state.ex_scan_folder = str(by_label[picked].folder)
        partial = [s for s in stored if s.status == "partial"]
        if partial:
            st.caption(f"{len(partial)} scan(s) are unfinished: run them again with the same settings to resume.")

with open_tab:
    tree_path = st.text_input("Or open HeadVis data (a data/ folder with config.json)", key="ex_tree",
                              help="A tree written by export-headvis or by Neuronpedia's HeadVis pipeline, under "
                                   "the allowed corpus roots; read without a model.")
    if tree_path and st.button("Open HeadVis data", key="ex_open_tree"):
        with ui.user_errors():
            state.ex_scan_folder = str(tree_under_roots(tree_path, ui.corpus_roots()))

if "ex_scan_folder" not in state:
    st.info("Run a scan or open a stored one to see this head's examples.")
    st.stop()

folder = Path(state.ex_scan_folder)
# a stored scan by its name (it lives in the scans root); an imported tree by its path, checked again on reopening
ui.set_query_params(scan=folder.name if folder.parent == scan_store.scans_root() else str(folder))
try:
    result = open_scan(str(folder), files_stamp(folder))
except (HeadVisError, OSError) as err:  # a broken tree or scan: the message names the file and the field
    advice = (" Fix the HeadVis data or export it again." if folder.parent != scan_store.scans_root()
              else " Run the scan again and it will be recomputed.")
    st.error(f"{ui.escape_markdown(str(err))} It is not shown.{advice}")
    st.stop()

# -- results ------------------------------------------------------------------------------------------------------
if getattr(result, "stale_note", None):  # a stored scan from before the HeadVis statistics (an imported tree has none)
    st.info(result.stale_note)
meta = result.meta
made_with = ui.escape_markdown(str(meta["model"]["name"]))
if meta["model"]["name"] != info.name:
    st.warning(f"This scan was made with {made_with}, not {ui.escape_markdown(info.name)}.")
elif (result.n_layers, result.n_heads) != (info.n_layers, info.n_heads):
    st.warning(f"This scan was made with a {made_with} of {result.n_layers} layers x {result.n_heads} heads; the "
               f"one loaded has {info.n_layers} x {info.n_heads}.")
with ui.user_errors():
    buckets = result.deciles(head)
params = result.params
st.subheader(f"Head {head} on {result.n_windows} windows of {params.window_len} tokens")
corpus_text = ui.escape_markdown(str(meta["corpus"]["description"]))  # an imported tree's text is anyone's
created = ui.escape_markdown(str(meta["created"]))
st.caption(f"{corpus_text}; scanned {created}. A window's score is its largest attention weight outside the row "
           "and column of position 0; deciles of that score, 10 = highest. Examples per decile are a random sample; "
           "'top' holds the exact highest-scoring windows.")

imported = isinstance(result, ImportedScan)
if imported and result.warnings:  # what the HeadVis frontend would miss or log about this tree
    with st.expander(f"{len(result.warnings)} warning(s) about this HeadVis data"):
        for warning in result.warnings:
            st.text(str(warning))
same_model = meta["model"]["name"] == info.name and (result.n_layers, result.n_heads) == (info.n_layers,
                                                                                           info.n_heads)
# HeadVis's deep link ?layer=&head=&tab=&interval= (interval -1: the custom sequences). The view and the interval
# are widgets bound to those URL parameters, so the URL always names the view shown; an option's label is its
# value in the URL, hence HeadVis's names. "top" (the default, absent from the URL) is ours: the exact top windows.
# page_view is the one reading of ?tab= and ?interval=: HeadVis's tab names and an interval this scan has not are
# rewritten in the URL before the bound controls are drawn, and its notes (kept over that rerun) say what is shown.
TOP = TOP_INTERVAL
shown_link = page_view(st.query_params.to_dict(), result.n_layers, result.n_heads, len(buckets))
if shown_link.repairs(st.query_params.to_dict()):
    state.ex_link_notes = shown_link.notes
    ui.repair_url(rewrites=shown_link.repairs(st.query_params.to_dict()))  # reruns where it changed the URL
for note in dict.fromkeys((*state.pop("ex_link_notes", ()), *shown_link.notes)):
    st.caption(ui.escape_markdown(note))  # a note quotes the URL's value
view = st.segmented_control("View", TABS, default=DEFAULT_TAB, key="tab", bind="query-params", required=True,
                            help="examples: windows by interval; tokens: top query and key tokens, distances; "
                                 "pca: projections of Q, K, V and O at the top pairs; custom: prompts typed for "
                                 "this head. The URL's ?tab= keeps the choice.")


def show_examples(examples, label: str) -> None:
    if not examples:
        st.caption(f"No windows in {label} (several deciles can share one score when many windows tie).")
    for ex in examples:
        pair = f"{ex.max_query}:{ex.str_tokens[ex.max_query]!r} \u2190 {ex.max_key}:{ex.str_tokens[ex.max_key]!r}"
        st.text(f"window {ex.window_index}: score {ex.score:.3f} at {pair}")  # plain text: tokens are not markdown
        html = token_view_html(ex.str_tokens, ex.attention, selected=ex.max_query, top_k=params.top_k_keys)
        ui.show_html(html)
        if same_model and not imported:  # an imported tree's windows carry no token ids
            edge = attribution_link_for_window(loaded.model, ex.token_ids, EdgeSpec(head, ex.max_query, ex.max_key))
            if edge is not None:
                ui.link_to_page(edge["page"], f"Why does {head} attend here? Attribution of this edge",
                                {"model": info.name, **edge["query"]})


def show_custom_sequences() -> None:
    st.caption("Prompts typed for this head, kept with the scan in HeadVis's custom_sequences shape. "
               f"Link: ?layer={head.layer}&head={head.head}&interval={CUSTOM_INTERVAL}")
    try:
        sequences = read_custom_sequences(folder, head)
    except HeadVisError as err:  # a broken file: said (it may quote the file), and the rest of the page stays
        st.error(ui.escape_markdown(str(err)))
        sequences = []
    with ui.user_errors():
        for seq in sequences:
            st.text(f"custom {seq['sequence_id']}: {str(seq.get('text', ''.join(seq['tokens'])))[:200]}")
            ex = example_from_record(seq, CUSTOM_INTERVAL)
            ui.show_html(token_view_html(ex.str_tokens, ex.attention, selected=ex.max_query,
                                         top_k=ex.attention.keys.shape[1]))
            if st.button("Delete", key=f"ex_custom_delete_{seq['sequence_id']}"):
                delete_custom_sequence(folder, head, seq["sequence_id"])
                st.rerun()
    if state.pop("ex_custom_added", False):  # the prompt is stored: empty the box so a second click adds nothing
        state.ex_custom_text = ""
    custom_text = st.text_area("Add a prompt for this head", key="ex_custom_text")
    if st.button("Add", key="ex_custom_add", disabled=not same_model,
                 help=None if same_model else f"Needs {made_with} loaded in the sidebar."):
        try:  # an error here is shown without stopping the page
            add_custom_sequence(loaded, folder, head, custom_text)
        except HeadVisError as err:
            st.error(ui.escape_markdown(str(err)))
        else:
            state.ex_custom_added = True
            st.rerun()


def show_interval() -> None:
    by_interval = {str(b.decile): b for b in buckets}
    options = [TOP, *by_interval, str(CUSTOM_INTERVAL)]
    chosen = st.segmented_control(
        "Interval", options, default=TOP, key="interval", bind="query-params", required=True,
        help="HeadVis's intervals: deciles of the window score, 10 = highest; -1 = the custom sequences; top "
             "= the exact highest-scoring windows. The URL's ?interval= keeps the choice.")
    if chosen == str(CUSTOM_INTERVAL):
        show_custom_sequences()
    elif chosen in by_interval:
        bucket = by_interval[chosen]
        st.caption(f"Decile {bucket.decile}: {bucket.n_windows} windows with scores {bucket.low:.3f} to "
                   f"{bucket.high:.3f}.")
        show_examples(bucket.examples, f"decile {bucket.decile}")
    else:
        st.caption("The exact highest-scoring windows of the corpus.")
        show_examples(result.top_examples(head), "the top")
    ui.download_table(result.examples_table(head), f"examples_{head}.csv", label="Download examples (CSV)")
    edges, counts = result.score_histogram(head)
    fig = scan_figures.score_histogram_figure(edges, counts, title=f"Head {head}: window scores")
    st.plotly_chart(fig, width="stretch", key="ex_scores")
    ui.download_figure(fig, f"window_scores_{head}.html", label="Download score histogram (HTML)")


def show_tokens() -> None:
    min_count = st.number_input("Least occurrences for a token to be listed", 1, 1000, 5, key="min_count",
                                bind="query-params")  # ?min_count= in the URL
    q_col, k_col = st.columns(2)
    with q_col:
        st.markdown("**Queries paying the most attention** (to positions after 0, per occurrence)")
        queries = result.top_tokens(head, "query", n=25, min_count=int(min_count))
        st.dataframe(queries, hide_index=True, width="stretch")
        ui.download_table(queries, f"top_query_tokens_{head}.csv", label="Download query tokens (CSV)")
    with k_col:
        st.markdown("**Keys receiving the most attention** (summed over queries, per occurrence)")
        keys = result.top_tokens(head, "key", n=25, min_count=int(min_count))
        st.dataframe(keys, hide_index=True, width="stretch")
        ui.download_table(keys, f"top_key_tokens_{head}.csv", label="Download key tokens (CSV)")
    shares = result.distance_histogram(head)
    fig = scan_figures.distance_figure(shares, title=f"Head {head}: attention by query-key distance")
    st.plotly_chart(fig, width="stretch", key="ex_distance")
    ui.download_figure(fig, f"distance_{head}.html")
    ui.download_table(pd.DataFrame({"distance": range(len(shares)), "share": shares}), f"distance_{head}.csv",
                      label="Download distances (CSV)")


def compute_projections_form() -> None:
    p1, p2 = st.columns(2)
    n_pairs = p1.number_input("Top pairs per head", 10, 5000, 1000, key="ex_pca_pairs")
    n_windows = p2.number_input("Windows run again", 1, 1000, 64, key="ex_pca_windows")
    with_umap = st.checkbox("Also UMAP", key="ex_pca_umap", disabled=not umap_available(),
                            help="a UMAP layout of each kind next to the PCA (seed 0)" if umap_available()
                            else "needs the package umap-learn (pip install umap-learn==0.5.12)")
    if st.button("Compute projections", key="ex_pca_run", disabled=not same_model,
                 help=None if same_model else f"Needs {made_with} loaded in the sidebar."):
        with ui.user_errors():
            project_scan(loaded, result, ProjectionParams(max_pairs=int(n_pairs), max_windows=int(n_windows),
                                                          umap=with_umap),
                         progress=ui.progress_bar("Projecting"))
            st.rerun()


def show_projections() -> None:
    st.markdown("**Projections of Q, K, V and O at the head's top pairs** (pairs ranked by "
                "||A[q,k] v_k W_O||)")
    if imported:
        st.caption("Projections need the scan's windows and the model: open a scan made here, not HeadVis data.")
        return
    projections = load_projections(folder)
    if projections is None:
        compute_projections_form()
        return
    try:
        projection = projections.head(head)
    except HeadVisError as err:  # this head was skipped: the rest of the page stays
        st.error(str(err))
        return
    table = stored_pairs_table(projection, projections.arrays["window_tokens"], result.token_strings)
    v1, v2, v3 = st.columns(3)
    # every view choice is bound to the URL (?pca_kind=&pca_colour=&pca_3d=&pca_method=&pca_prompt=)
    kind = v1.selectbox("Kind", ["Q", "K", "V", "O"], index=3, key="pca_kind", bind="query-params")
    colours = projection_figures.color_options(table)
    colour = v2.selectbox("Colour by", colours, key="pca_colour", bind="query-params",
                          help="a token, or a per-pair metric: distance q - k, attention A[q,k], norm "
                               "||A[q,k] v_k W_O|| (the ranking key), value norm ||v_k W_O||, query position")
    if len(colours) < len(projection_figures.COLOR_OPTIONS):
        v2.caption("Recompute the projections to colour by attention (these were stored without it).")
    dims = 3 if v3.checkbox("3-D", key="pca_3d", bind="query-params") else 2
    method = st.radio("Method", projection_figures.METHODS, horizontal=True, key="pca_method",
                      bind="query-params") if projections.has_umap else "PCA"
    prompt_text = st.text_input("Project this prompt (its pairs drawn with the saved rotation)", key="pca_prompt",
                                bind="query-params", max_chars=4000)
    overlay = None
    if prompt_text and not same_model:
        st.caption(f"Projecting a prompt needs {made_with} loaded in the sidebar.")
    elif prompt_text:
        try:
            overlay = project_prompt(loaded, projection, prompt_text)
        except HeadVisError as err:  # the cloud is still drawn, without the prompt
            st.error(str(err))
    if overlay is not None and method == "UMAP":
        st.caption("A typed prompt is drawn in the PCA view (a UMAP layout keeps no rotation).")
    fig = projection_figures.projection_figure(table, kind, colour, dims, projection.fits[kind].explained, overlay,
                                               title=f"Head {head}: {kind} at its top pairs ({method})",
                                               method=method)
    event = st.plotly_chart(fig, width="stretch", key="ex_pca_figure", on_select="rerun",
                            selection_mode=("box", "lasso"))
    ui.download_figure(fig, f"pca_{kind}_{head}.html", label="Download projection (HTML)")
    rows = projection_figures.selected_rows(event.selection if event else None)
    if rows:
        cluster_name = st.text_input(f"Name the {len(rows)} selected pairs as a cluster", key="ex_cluster_name")
        if st.button("Save cluster", key="ex_cluster_save"):
            try:
                save_cluster(folder, head, cluster_name, rows, len(projection.norms))
            except HeadVisError as err:
                st.error(str(err))
    for cluster in read_clusters(folder, head):
        c1, c2 = st.columns([4, 1])
        c1.text(f"cluster {cluster['name']}: {len(cluster['indices'])} pairs")
        if c2.button("Delete", key=f"ex_cluster_delete_{cluster['name']}"):
            delete_cluster(folder, head, cluster["name"])
            st.rerun()
    ui.download_table(table, f"pca_pairs_{head}.csv", label="Download pairs (CSV)")


{"examples": show_interval, "tokens": show_tokens, "pca": show_projections, "custom": show_custom_sequences}[view]()

with st.expander("All heads in this scan"):
    summary = result.head_summary()
    st.dataframe(summary, hide_index=True, width="stretch")
    ui.download_table(summary, "scan_heads.csv", label="Download head summary (CSV)")

with st.expander("Export for the HeadVis frontend"):
    st.caption("The static data/ tree that HeadVis loads (every head, custom sequences, projections where "
               "computed), checked against the contract, as a zip.")
    if st.button("Prepare HeadVis data", key="ex_export", disabled=imported,
                 help="This is HeadVis data already." if imported else None):
        with ui.user_errors(), tempfile.TemporaryDirectory() as work:
            export_headvis(result, Path(work) / "data", progress=ui.progress_bar("Exporting"))
            archive = shutil.make_archive(str(Path(work) / "headvis-data"), "zip", work, "data")
            state.ex_export_zip = (str(folder), Path(archive).read_bytes())
    exported = state.get("ex_export_zip")
    if exported and exported[0] == str(folder):  # the zip of the scan shown, not of one opened before
        st.download_button("Download HeadVis data (zip)", exported[1], file_name="headvis-data.zip",
                           mime="application/zip", key="ex_export_download")
