"""Compare: two models' heads side by side, matched by metric profile; per-head changes for same-shape checkpoints."""

import streamlit as st

import headvis_ui as ui
from headvis_core.atlas.run import METRIC_COLUMNS, compute_atlas, corpus_files
from headvis_core.compare.run import compare_atlases
from headvis_core.data.roots import resolve_app_corpus
from headvis_core.limits import check_atlas_memory
from headvis_core.models.loader import load_model
from headvis_core.models.registry import KNOWN_MODELS
from headvis_core.store.kinds import ATLAS, atlas_inputs, atlas_link
from headvis_core.store.results import cached
from headvis_core.viz.atlas import AXES
from headvis_core.viz.compare import comparison_report_html, delta_heatmap, depth_figure, pairs_figure, side_by_side

OTHER = "other (type below)"


@st.cache_resource(max_entries=1, show_spinner=False)
def second_model(name: str, device: str, dtype: str):
    # One second model at a time; load_model refuses it (with the sizes) where it would not fit in free memory.
    return load_model(name, device=device, dtype=dtype)


def stored_atlas(loaded_model, folder: str | None, n_seqs: int, seq_len: int, label: str, refresh: bool):
    """The model's atlas from the result store (shared with the Head atlas page and the CLI), or computed."""
    slot, progress = ui.lazy_progress(f"Atlas of {label}")  # drawn only when computing

    def compute():
        check_atlas_memory(loaded_model, n_seqs, seq_len)  # refuse before running what cannot fit
        return compute_atlas(loaded_model.model, folder=folder, n_seqs=n_seqs, seq_len=seq_len,
                             model_name=loaded_model.info.name, progress=progress)

    stored = cached(ATLAS, loaded_model, atlas_inputs(folder, n_seqs, seq_len, None, 0), compute, refresh=refresh,
                    link=atlas_link(folder, n_seqs, seq_len))  # Home lists it under its own model
    slot.empty()
    return stored


loaded = ui.page_setup("Compare models")
st.caption("Model A is the sidebar's model. Both models' head atlases are measured on the same probe text, their "
           "behaviours compared by relative depth, and their heads paired one to one by metric profile. Two "
           "checkpoints of one architecture also get per-head changes.")

ui.repair_url(integers=("n", "len"))
with st.form("compare_inputs"):
    cols = st.columns([2, 2, 3, 1, 1])
    choice = cols[0].selectbox("Model B", ["", *KNOWN_MODELS, OTHER], key="b", bind="query-params",
                               format_func=lambda n: n or "choose a model")
    typed = cols[1].text_input("Model B: HF id or local directory", key="b_other", bind="query-params",
                               placeholder="/path/to/checkpoint")
    folder_text = cols[2].text_input("Corpus folder (empty: the built-in prompts)", key="corpus",
                                     bind="query-params", placeholder="gutenberg, or a folder under an allowed root",
                                     help=ui.corpus_roots_help())
    n_seqs = cols[3].number_input("Sequences", 1, 1024, 64, key="n", bind="query-params")
    seq_len = cols[4].number_input("Tokens each", 8, 8192, 128, key="len", bind="query-params")
    st.form_submit_button("Compare")

name_b = typed.strip() if choice == OTHER else choice
if not name_b:
    st.info("Choose model B (a short name, or 'other' and an HF id or a local checkpoint directory), then Compare.")
    st.stop()
info = loaded.info
recompute = ui.recompute_button("compare_recompute")
with ui.user_errors():
    # A folder from the URL or the text box is read only under the allowed corpus roots.
    folder = resolve_app_corpus(folder_text, ui.corpus_roots(), allow_datasets=False) if folder_text.strip() else None
    if folder is not None:
        corpus_files(folder)  # a bad folder fails before the second model loads
    if name_b.lower() == info.name.lower():
        loaded_b = loaded  # the same model twice: no second copy
    else:
        with st.spinner(f"Loading {name_b} (a second model, beside {info.name})..."):
            loaded_b = second_model(name_b, info.device, info.dtype)
    stored_a = stored_atlas(loaded, folder, int(n_seqs), int(seq_len), f"A: {info.name}", recompute)
    stored_b = stored_atlas(loaded_b, folder, int(n_seqs), int(seq_len), f"B: {name_b}",
                            recompute and loaded_b is not loaded)
atlas_a, atlas_b = stored_a.value, stored_b.value
ui.show_stored(stored_a, f"Atlas of A ({info.name})")
if loaded_b is not loaded:
    ui.show_stored(stored_b, f"Atlas of B ({name_b})")
comparison = compare_atlases(atlas_a, atlas_b, info.name, name_b)
matching = comparison.matching

for line in comparison.summary():
    st.markdown(f"- {line}")
for note in dict.fromkeys(atlas_a.notes + atlas_b.notes):
    st.info(note)

st.subheader("Both atlases")
axes = st.columns(2)
x = axes[0].selectbox("x", AXES, index=AXES.index("previous_token"), key="x", bind="query-params")
y = axes[1].selectbox("y", AXES, index=AXES.index("induction"), key="y", bind="query-params")
scatter = side_by_side(comparison, x, y)
st.plotly_chart(scatter, width="stretch")
ui.download_figure(scatter, "compare_atlases.html")

st.subheader("Behaviour by relative depth")
depth = depth_figure(comparison.depth)
st.plotly_chart(depth, width="stretch")
ui.download_figure(depth, "compare_depth.html")

st.subheader("Heads matched by metric profile")
pairs = pairs_figure(matching, info.name, name_b)
st.plotly_chart(pairs, width="stretch")
ui.download_figure(pairs, "compare_pairs.html")
st.dataframe(matching.pairs, hide_index=True, width="stretch")
st.markdown(f"**Outliers** ({len(matching.outliers)}): pairs past the distance fence {matching.fence:.3f}, and "
            "unpaired heads with nothing that close in the other model.")
st.dataframe(matching.outliers, hide_index=True, width="stretch")

if comparison.same_shape:
    st.subheader("Same shape: per-head changes (B - A)")
    metric = st.selectbox("Metric", METRIC_COLUMNS, index=METRIC_COLUMNS.index("induction"), key="delta",
                          bind="query-params")
    heatmap = delta_heatmap(comparison, metric)
    st.plotly_chart(heatmap, width="stretch")
    ui.download_figure(heatmap, f"compare_delta_{metric}.html")
    st.markdown(f"**Changed heads** ({len(comparison.changed)})")
    st.dataframe(comparison.changed, hide_index=True, width="stretch")

st.subheader("Downloads")
downloads = st.columns(6)
tables = {"heads": comparison.heads_table(), "pairs": matching.pairs, "unmatched": matching.unmatched,
          "depth": comparison.depth}
if comparison.deltas is not None:
    tables["deltas"] = comparison.deltas
for column, (label, table) in zip(downloads, tables.items()):
    with column:
        ui.download_table(table, f"compare_{label}.csv", label=f"{label}.csv")
with downloads[-1]:
    st.download_button("HTML report (offline)", comparison_report_html(comparison).encode("utf-8"),
                       file_name="compare_report.html", mime="text/html", key="download-compare-report")
