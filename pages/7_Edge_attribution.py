"""Edge attribution: why a head attends from a query token to a key token (QK), and what it moves (OV).

The URL reopens the same edge: ``?model=NAME&prompt=TEXT&layer=L&head=H&q=Q&k=K`` (positions count
the model's tokens, BOS included), optionally ``&sae=DIR&sae_side=query|key|both``.
"""

import json

import streamlit as st

import headvis_ui as ui
from headvis_core.attribution.edge import (
    SAE_SIDES,
    EdgeSpec,
    attribute_edges,
    attribution_inputs,
    attribution_link,
)
from headvis_core.heads import HeadRef
from headvis_core.lab.positions import induction_key
from headvis_core.lab.prompt_lab import rank_heads_by_attention
from headvis_core.store import cached
from headvis_core.store.kinds import ATTRIBUTION
from headvis_core.tokens import token_labels, tokenize_prompt
from headvis_core.viz.attribution import (
    offset_profile_figure,
    pair_bars,
    path_diagram_html,
    ranked_bars,
    top_tokens_bars,
)

DEFAULT_PROMPT = "Mr and Mrs Dursley, of number four, Privet Drive, were proud to say. Mr and Mrs Dursley"

loaded = ui.page_setup("Edge attribution")
info, model = loaded.info, loaded.model
state = st.session_state
ui.repair_url(integers=("layer", "head", "q", "k"))
ui.claim_shared_keys({"prompt": DEFAULT_PROMPT})  # the Prompt lab and Ablation pages bind ?prompt= too

st.caption("Explain one attention edge: the head's pre-softmax score as an exact sum of (query-side component, "
           "key-side component) terms, with norms frozen at their value on this prompt, and what the head moves "
           "along the edge. Components: token and position embeddings, every earlier head (labelled with the "
           "token it mostly attended to), every earlier MLP, biases; or a sparse dictionary's features.")

# Keys of widgets bound with bind="query-params" are the URL's parameter names.
text = st.text_area("Prompt", DEFAULT_PROMPT, key="prompt", height=90, bind="query-params")
ui.mark_shared_keys(("prompt",))
with ui.user_errors():
    prompt = tokenize_prompt(model, text)
labels = token_labels(prompt.str_tokens)
n = prompt.n_tokens
default_query = n - 1
default_key = induction_key(prompt.tokens[0].tolist(), default_query)


def strongest_head() -> HeadRef:
    """The head that attends most from the default query to the default key (one pass)."""
    ranking = rank_heads_by_attention(model, prompt.tokens, default_query, default_key)
    return HeadRef(int(ranking.layer.iloc[0]), int(ranking["head"].iloc[0]))


# With no head chosen elsewhere, open on the edge's strongest head: a first look shows an edge that matters.
default_head = ui.selected_head(loaded) or ui.session_memo(
    "edge_default_head", f"{ui.model_key(loaded)}:{prompt.tokens[0].tolist()}", strongest_head)

c1, c2, c3, c4 = st.columns(4)
layer = c1.number_input("Layer", value=default_head.layer, step=1, key="layer", bind="query-params")
head = c2.number_input("Head", value=default_head.head, step=1, key="head", bind="query-params")
query = c3.number_input("Query position", value=default_query, step=1, key="q", bind="query-params",
                        help="Token index that attends (BOS included); see the token list below.")
key = c4.number_input("Key position", value=default_key, step=1, key="k", bind="query-params",
                      help="Token index attended to; at most the query position.")
with st.expander(f"Tokens ({n})"):
    st.text("  ".join(labels))
with st.expander("Sparse dictionary (optional)"):
    sae_dir = st.text_input("SAELens-format folder on the head layer's input (cfg.json, sae_weights.safetensors)",
                            "", key="sae", bind="query-params")
    sae_side = st.radio("Features replace the components on", SAE_SIDES, index=2, key="sae_side",
                        horizontal=True, bind="query-params")

sae = None
with ui.user_errors():
    if sae_dir.strip():
        from headvis_core.attribution.sae import load_sae

        sae = load_sae(sae_dir.strip())
    edge = EdgeSpec(HeadRef(int(layer), int(head)), int(query), int(key))

    def compute():
        return attribute_edges(model, prompt.tokens, [edge], sae=sae, sae_side=sae_side,
                               progress=ui.progress_bar("Attributing the edge"))[0]

    stored = cached(ATTRIBUTION, loaded, attribution_inputs(prompt.tokens, [edge], sae, sae_side), compute,
                    link=attribution_link(text, edge, sae_dir.strip(), sae_side))
    result = stored.value
for note in stored.notes:
    st.info(note)
if stored.from_store:
    st.caption(f"From the result store (computed {stored.computed_at_text}).")

st.subheader(f"Head {result.edge.head}: {labels[result.edge.query]} \u2192 {labels[result.edge.key]}")
m1, m2, m3 = st.columns(3)
m1.metric("Pre-softmax score (model)", f"{result.score:.4f}")
m2.metric("Sum of the QK terms", f"{result.qk.reconstructed:.4f}")
m3.metric("Attention weight", f"{result.pattern:.3f}")
for note in result.notes:
    st.warning(note)

qk_tab, ov_tab, diagram_tab, position_tab = st.tabs(["QK: why it attends", "OV: what it moves", "Path diagram",
                                                     "Position"])
with qk_tab:
    left, right = st.columns(2)
    with left:
        fig = ranked_bars(result.query_side(), "Query side (component \u00b7 k)")
        st.plotly_chart(fig, width="stretch", key="query_side_chart")
        ui.download_figure(fig, "query_side.html")
        st.dataframe(result.query_side(), hide_index=True, width="stretch")
        ui.download_table(result.query_side(), "query_side.csv", label="Download query side (CSV)")
    with right:
        fig = ranked_bars(result.key_side(), "Key side (q \u00b7 component)")
        st.plotly_chart(fig, width="stretch", key="key_side_chart")
        ui.download_figure(fig, "key_side.html", label="Download key-side figure (HTML)")
        st.dataframe(result.key_side(), hide_index=True, width="stretch")
        ui.download_table(result.key_side(), "key_side.csv", label="Download key side (CSV)")
    left, right = st.columns(2)
    left.markdown("**Query side by kind of component**")
    left.dataframe(result.qk.by_kind("query"), hide_index=True, width="stretch")
    right.markdown("**Key side by kind of component**")
    right.dataframe(result.qk.by_kind("key"), hide_index=True, width="stretch")
    pairs = result.top_pairs(20)
    st.plotly_chart(pair_bars(pairs), width="stretch", key="pairs_chart")
    st.dataframe(pairs, hide_index=True, width="stretch")
    ui.download_table(result.qk.table(), "qk_terms.csv", label="Download all QK terms (CSV)")

with ov_tab:
    left, right = st.columns(2)
    with left:
        fig = ranked_bars(result.value_side(), "Value side (projection on the edge's write)",
                          axis_title="projection on A\u00b7v\u00b7W_O")
        st.plotly_chart(fig, width="stretch", key="value_side_chart")
        st.dataframe(result.value_side(), hide_index=True, width="stretch")
        ui.download_table(result.value_side(), "ov_value_side.csv", label="Download value side (CSV)")
    with right:
        st.plotly_chart(top_tokens_bars(result.top_tokens), width="stretch", key="tokens_chart")
        st.dataframe(result.top_tokens, hide_index=True, width="stretch")
        st.markdown("**Later heads reading this edge** (share of their Q/K/V input at the query position)")
        st.dataframe(result.ov.readers.head(20), hide_index=True, width="stretch")
        ui.download_table(result.ov.readers, "ov_readers.csv", label="Download readers (CSV)")

with diagram_tab:
    diagram = path_diagram_html(result)
    ui.show_html(diagram, height=400)
    st.download_button("Download diagram (HTML)", diagram.encode("utf-8"), file_name="edge_path.html",
                       mime="text/html", key="download-edge_path.html")

with position_tab:
    if result.offsets is None:
        st.info("This model has learned position embeddings: position information is the pos_embed component "
                "in the QK tables.")
    else:
        st.caption("On a RoPE model position enters through the rotation, not a component. With the query and "
                   "key content held fixed, this is the score they would get at every query-key offset; a "
                   "positional head peaks at its offset.")
        st.plotly_chart(offset_profile_figure(result.offsets), width="stretch", key="offsets_chart")

st.download_button("Download the attribution (JSON)", json.dumps(result.as_json(), indent=1).encode("utf-8"),
                   file_name="edge_attribution.json", mime="application/json", key="download-edge.json")
