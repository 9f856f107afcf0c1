"""Dataset examples: a head's windows across a corpus by decile, its top tokens and attention distances."""

from pathlib import Path

import pandas as pd
import streamlit as st

import headvis_ui as ui
from headvis_core import scan as scans
from headvis_core.data.corpus import open_corpus
from headvis_core.data.roots import list_corpora, resolve_app_corpus
from headvis_core.errors import CorruptFileError
from headvis_core.heads import HeadRef
from headvis_core.limits import check_scan_memory
from headvis_core.scan import store as scan_store
from headvis_core.viz import scan as scan_figures
from headvis_core.viz.token_view import token_view_html

loaded = ui.page_setup("Dataset examples")
info = loaded.info
state = st.session_state
ui.repair_url(integers=("min_count",))


@st.cache_resource(max_entries=4, show_spinner="Opening the stored scan...")
def open_scan(folder: str, stamp: tuple) -> scans.ScanResult:
    return scans.load_scan(Path(folder))  # stamp: the files' sizes and times, so a changed file is checked again


def files_stamp(folder: Path) -> tuple:
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()))
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
    state.ex_scan_folder = str(scan_store.scans_root() / Path(url_scan).name)

run_tab, open_tab = st.tabs(["Run a scan", f"Open a stored scan ({len(stored)})"])
with run_tab:
    allowed_corpora = list_corpora()  # the app reads corpora only under the operator's allowed roots
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
            corpus = open_corpus(resolve_app_corpus(corpus_spec))  # a path outside the allowed roots: refused
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

if "ex_scan_folder" not in state:
    st.info("Run a scan or open a stored one to see this head's examples.")
    st.stop()

folder = Path(state.ex_scan_folder)
ui.set_query_params(scan=folder.name)
try:
    result = open_scan(str(folder), files_stamp(folder))
except CorruptFileError as err:
    st.error(f"{err} It is not shown; run the scan again and it will be recomputed.")
    st.stop()

# -- results ------------------------------------------------------------------------------------------------------
meta = result.meta
if (result.n_layers, result.n_heads) != (info.n_layers, info.n_heads) or meta["model"]["name"] != info.name:
    st.warning(f"This scan was made with {meta['model']['name']}, not {info.name}.")
with ui.user_errors():
    buckets = result.deciles(head)
params = result.params
st.subheader(f"Head {head} on {result.n_windows} windows of {params.window_len} tokens")
st.caption(f"{meta['corpus']['description']}; scanned {meta['created']}. A window's score is its largest attention "
           "weight outside the row and column of position 0; deciles of that score, 10 = highest. Examples per decile "
           "are a random sample; 'Top' holds the exact highest-scoring windows.")

tabs = st.tabs(["Top"] + [f"Decile {b.decile}" for b in buckets])


def show_examples(examples, label: str) -> None:
    if not examples:
        st.caption(f"No windows in {label} (several deciles can share one score when many windows tie).")
    for ex in examples:
        pair = f"{ex.max_query}:{ex.str_tokens[ex.max_query]!r} \u2190 {ex.max_key}:{ex.str_tokens[ex.max_key]!r}"
        st.text(f"window {ex.window_index}: score {ex.score:.3f} at {pair}")  # plain text: tokens are not markdown
        html = token_view_html(ex.str_tokens, ex.attention, selected=ex.max_query, top_k=params.top_k_keys)
        ui.show_html(html)


with tabs[0]:
    show_examples(result.top_examples(head), "the top")
for tab, bucket in zip(tabs[1:], buckets):
    with tab:
        st.caption(f"{bucket.n_windows} windows with scores {bucket.low:.3f} to {bucket.high:.3f}.")
        show_examples(bucket.examples, f"decile {bucket.decile}")
ui.download_table(result.examples_table(head), f"examples_{head}.csv", label="Download examples (CSV)")

st.subheader("Top tokens")
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

d_col, s_col = st.columns(2)
with d_col:
    shares = result.distance_histogram(head)
    fig = scan_figures.distance_figure(shares, title=f"Head {head}: attention by query-key distance")
    st.plotly_chart(fig, width="stretch", key="ex_distance")
    ui.download_figure(fig, f"distance_{head}.html")
    ui.download_table(pd.DataFrame({"distance": range(len(shares)), "share": shares}), f"distance_{head}.csv",
                      label="Download distances (CSV)")
with s_col:
    edges, counts = result.score_histogram(head)
    fig = scan_figures.score_histogram_figure(edges, counts, title=f"Head {head}: window scores")
    st.plotly_chart(fig, width="stretch", key="ex_scores")
    ui.download_figure(fig, f"window_scores_{head}.html", label="Download score histogram (HTML)")

with st.expander("All heads in this scan"):
    summary = result.head_summary()
    st.dataframe(summary, hide_index=True, width="stretch")
    ui.download_table(summary, "scan_heads.csv", label="Download head summary (CSV)")
