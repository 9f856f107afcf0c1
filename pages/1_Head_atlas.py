"""Head atlas: every head in one scatter of per-head metrics, classified, with a passport card."""

import pandas as pd
import streamlit as st

import headvis_ui as ui
from headvis_core.atlas.classes import rules_table
from headvis_core.atlas.run import METRIC_COLUMNS, METRICS, compute_atlas, passport
from headvis_core.atlas.selection import opening_head
from headvis_core.data.roots import resolve_app_corpus
from headvis_core.heads import HeadRef
from headvis_core.limits import check_atlas_memory
from headvis_core.store import cached
from headvis_core.store.kinds import ATLAS, atlas_inputs, atlas_link
from headvis_core.viz.atlas import (
    AXES,
    COLOURS,
    head_scatter,
    layer_heatmap,
    passport_metrics_figure,
    passport_pattern_figure,
    top_tokens_table,
)
from headvis_core.viz.atlas_report import atlas_report_html


@st.cache_data(show_spinner=False, max_entries=4)
def cached_report(store_key: str, _result) -> bytes:
    return atlas_report_html(_result).encode("utf-8")


loaded = ui.page_setup("Head atlas")
st.caption("Every head measured on a probe set: real text for the attention metrics, repeated random tokens for "
           "induction, the weights for the OV copying score. Heads at the extremes of a metric are usually the "
           "ones worth studying. Select a point (or pick a head below) to open its passport card.")

# Widget keys are the URL's parameter names (bind="query-params"): a link reopens the same view.
ui.repair_url(integers=("n", "len"))
with st.form("atlas_probe"):
    cols = st.columns([4, 1, 1])
    folder_text = cols[0].text_input("Corpus folder of text files (empty: the built-in prompts)", key="corpus",
                                     bind="query-params", placeholder="gutenberg, or a folder under an allowed root",
                                     help=ui.corpus_roots_help())
    n_seqs = cols[1].number_input("Sequences", 1, 1024, 64, key="n", bind="query-params")
    seq_len = cols[2].number_input("Tokens each", 8, 8192, 128, key="len", bind="query-params")
    st.form_submit_button("Compute atlas")

recompute = ui.recompute_button("atlas_recompute")
slot, progress = ui.lazy_progress("Head atlas")  # drawn only when computing, not for a stored atlas
with ui.user_errors():
    # A folder from the URL or the text box is read only under the allowed corpus roots.
    folder = resolve_app_corpus(folder_text, ui.corpus_roots(), allow_datasets=False) if folder_text.strip() else None

    def compute():
        check_atlas_memory(loaded, int(n_seqs), int(seq_len))  # refuse before running what cannot fit
        return compute_atlas(loaded.model, folder=folder, n_seqs=int(n_seqs), seq_len=int(seq_len),
                             model_name=loaded.info.name, progress=progress)

    stored = cached(ATLAS, loaded, atlas_inputs(folder, int(n_seqs), int(seq_len), None, 0), compute,
                    refresh=recompute, link=atlas_link(folder, int(n_seqs), int(seq_len)))
slot.empty()
result = stored.value
table = result.table
ui.remember(ui.ATLAS_METRICS, loaded, table)
st.caption(f"Probe: {result.probe}.")
ui.show_stored(stored, "Head atlas")
for note in result.notes:
    st.info(note)

heads = [str(HeadRef(int(l), int(h))) for l, h in zip(table.layer, table["head"])]
behaviour_of = dict(zip(heads, zip(table.behaviour, table.confidence)))
selected = ui.selected_head(loaded)
if st.session_state.get("atlas_head") not in heads:
    st.session_state["atlas_head"] = str(selected or opening_head(table))

left, right = st.columns([3, 2])
with left:
    axes = st.columns(3)
    # Options are the table's column names, which are also what the URL holds (?x=previous_token).
    x = axes[0].selectbox("x", AXES, index=AXES.index("previous_token"), key="x", bind="query-params")
    y = axes[1].selectbox("y", AXES, index=AXES.index("induction"), key="y", bind="query-params")
    colour = axes[2].selectbox("colour", COLOURS, key="colour", bind="query-params")
    current = HeadRef.from_label(st.session_state["atlas_head"])
    scatter = head_scatter(table, x, y, colour, selected=current)
    event = st.plotly_chart(scatter, width="stretch", on_select="rerun", selection_mode="points",
                            key="atlas_scatter")
    points = list(event.selection.points) if event and event.selection else []
    if points and "customdata" in points[0]:
        clicked = "{}.{}".format(*map(int, points[0]["customdata"][:2]))
        if clicked != st.session_state.get("atlas_clicked"):
            st.session_state["atlas_clicked"] = clicked
            st.session_state["atlas_head"] = clicked
            st.rerun()
    ui.download_figure(scatter, "head_atlas_scatter.html")

with right:
    chosen = st.selectbox("Head", heads, key="atlas_head",
                          format_func=lambda h: f"{h}: {behaviour_of[h][0]} ({behaviour_of[h][1]:.2f})")
    head = HeadRef.from_label(chosen)
    if head != ui.selected_head(loaded):
        ui.set_selected_head(head)
    card = passport(result, head)
    st.subheader(f"Passport: head {head}")
    st.markdown(f"**{card.behaviour}** (confidence {card.confidence:.2f}). "
                f"Behaviours held: {card.behaviours or 'none'}.")
    st.plotly_chart(passport_metrics_figure(card), width="stretch")
    st.plotly_chart(passport_pattern_figure(card), width="stretch")
    st.markdown("**Top attended tokens** (share of the head's attention outside position 0, over the probe text)")
    st.dataframe(top_tokens_table(card), hide_index=True, width="stretch")

st.subheader("Layer breakdown")
heat_metric = st.selectbox("Metric", METRIC_COLUMNS, index=METRIC_COLUMNS.index("induction"), key="heat",
                           bind="query-params")
heatmap = layer_heatmap(table, heat_metric)
st.plotly_chart(heatmap, width="stretch")
ui.download_figure(heatmap, f"head_atlas_{heat_metric}.html")

st.subheader("All heads")
st.dataframe(table, hide_index=True, width="stretch")
downloads = st.columns(2)
with downloads[0]:
    ui.download_table(table, f"head_atlas_{loaded.info.name.replace('/', '_')}.csv")
with downloads[1]:
    st.download_button("Download HTML report (all passport cards, offline)",
                       cached_report(stored.key, result),
                       file_name=f"head_atlas_{loaded.info.name.replace('/', '_')}.html", mime="text/html",
                       key="download-atlas-report")
with st.expander("How heads are classified"):
    st.dataframe(rules_table(), hide_index=True, width="stretch")
    st.caption("confidence = (1 + strength) / 2 x (1 + rarity) / 2: strength is how far the score is past the "
               "threshold towards saturation, rarity the fraction of other heads scoring lower. The main behaviour "
               "is the most confident; attention-sink only when nothing else holds.")
    st.dataframe(pd.DataFrame({"metric": [m.label for m in METRICS], "column": [m.column for m in METRICS],
                               "definition": [m.definition for m in METRICS]}), hide_index=True)
