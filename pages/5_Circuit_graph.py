"""Circuit graph: Q/K/V composition between heads against a random baseline, checked by path patching."""

import streamlit as st

import headvis_ui as ui
from headvis_core.circuits.candidates import patch_candidates, patched_edges_table
from headvis_core.circuits.composition import KINDS, check_composable, compute_composition, head_weights, io_scores
from headvis_core.circuits.graph import (
    EDGE_KIND_NAMES,
    MEASURES,
    GraphFilter,
    all_edges,
    build_graph,
    edges_frame,
    role_comparison,
    to_graphml,
    to_json,
)
from headvis_core.circuits.path_patching import path_patch
from headvis_core.circuits.published_roles import published_roles_for
from headvis_core.data.prompt_pairs import induction_prompt_pairs, ioi_prompts
from headvis_core.errors import HeadVisError, InputError
from headvis_core.heads import parse_heads
from headvis_core.store import cached, peek
from headvis_core.store.kinds import (
    COMPOSITION,
    IO_SCORES,
    PATH_PATCHING,
    composition_inputs,
    io_inputs,
    path_patching_inputs,
)
from headvis_core.viz.circuit_graph import to_html

PROMPT_SETS = {"ioi": "IOI: clean vs ABC corruption (logit IO - S)",
               "induction": "Induction: repeated random tokens vs a fresh first half"}
PATCH_STATE = "circuit_graph_patching"
MEMO = "circuit_graph_memo"  # edges of this session, by the stored scores they come from


loaded = ui.page_setup("Circuit graph")
info = loaded.info
st.caption("Composition scores (Elhage et al. 2021) measure how much of what an earlier head writes (its OV "
           "circuit) lands in what a later head reads: its queries (Q), keys (K) or values (V). A score is read "
           "against random matrices of the same shapes: **ratio** = times above that baseline, **z** = standard "
           "deviations above it. Weights alone do not say an edge is used; the path-patching check below measures "
           "it on prompts.")

# Widgets bound with bind="query-params" take the URL parameter's name as their key: a link
# reopens the same graph, and a value a widget cannot hold gives its default.
URL = "query-params"
# Old links: ?kinds=q,k&io=1&fold=0.
ui.repair_url(lists=("kinds",), flags=("io", "fold"), integers=("top_k", "max_edges"))
ui.claim_shared_keys({"heads": ""})  # ?heads= is also a list of heads on the Prompt lab
sent = ui.recall(ui.GRAPH_HEADS, loaded)
if sent and sent != st.session_state.get("graph_sent"):  # heads just sent from the Ablation page
    st.session_state.graph_sent = sent
    st.session_state.heads = ", ".join(str(h) for h in sent)

selected = ui.selected_head(loaded)
with st.container(border=True):
    row = st.columns([2, 2, 1.3, 1, 1])
    kinds = row[0].multiselect("Composition kinds", list(KINDS), default=list(KINDS), key="kinds", bind=URL,
                               help="; ".join(f"{k}: {name}" for k, name in EDGE_KIND_NAMES.items() if k in KINDS))
    measure = row[1].radio("Rank and threshold by", list(MEASURES), key="measure", bind=URL, horizontal=True,
                           help="; ".join(f"{k}: {v}" for k, v in MEASURES.items()))
    threshold = row[2].number_input("Threshold (empty: none)", value=None, step=0.1, key="threshold", bind=URL,
                                    placeholder="none")
    top_k = row[3].number_input("Top-k per node", 0, 100, 3, key="top_k", bind=URL,
                                help="Keep each node's k strongest in and out edges (0: no limit).")
    max_edges = row[4].number_input("Max edges", 1, 2000, 200, key="max_edges", bind=URL)
    row = st.columns([3, 1.2, 1.2, 1.6])
    heads_text = row[0].text_input("Only these heads and their neighbours (empty: all)", key="heads", bind=URL,
                                   placeholder="e.g. 5.1, 6.9")
    ui.mark_shared_keys(("heads",))
    with_io = row[1].checkbox("Embedding and logits nodes", key="io", bind=URL,
                              help="Edges from the token embedding into heads' Q/K/V, and from heads' outputs "
                                   "straight to the logits, by the same score.")
    fold_ln = row[2].checkbox("Fold layer norm", True, key="fold", bind=URL,
                              help="Fold each layer's ln1 gain into the reading weights (and centre them for "
                                   "LayerNorm models), as TransformerLens process_weights does.")
    if selected is not None:
        row[3].button(f"Focus on head {selected}", key="graph_focus",
                      on_click=lambda: st.session_state.update(heads=str(selected)))

recompute = ui.recompute_button("graph_recompute")
slot, progress = ui.lazy_progress("Composition scores")
with ui.user_errors():
    if not kinds:
        raise InputError("Choose at least one composition kind (Q, K or V).")
    check_composable(info.n_layers)
    heads = tuple(parse_heads(heads_text, info.n_layers, info.n_heads)) if heads_text.strip() else ()
    # Every kind is computed once and filtered below: one stored result serves any choice of kinds.
    link = {"page": "pages/5_Circuit_graph.py", "query": {"fold": str(fold_ln).lower()}}
    stored = cached(COMPOSITION, loaded, composition_inputs(KINDS, fold_ln),
                    lambda: compute_composition(loaded.model, KINDS, fold_ln=fold_ln, progress=progress),
                    refresh=recompute, link=link)
    result = stored.value
    io = None
    if with_io:
        stored_io = cached(IO_SCORES, loaded, io_inputs(KINDS, fold_ln),
                           lambda: io_scores(loaded.model, head_weights(loaded.model, fold_ln=fold_ln), KINDS),
                           refresh=recompute, link={**link, "query": {**link["query"], "io": "true"}})
        io = stored_io.value
slot.empty()
ui.show_stored(stored, "Composition scores")
if with_io:
    ui.show_stored(stored_io, "Embedding and logits scores")
edges = ui.session_memo(MEMO, f"edges|{stored.key}|io={stored_io.key if with_io else None}",
                        lambda: all_edges(result, io))

(st.info if result.ln_folded else st.warning)(result.folding_note)
base_text = "; ".join(f"{k.upper()} {b.mean:.4f} ± {b.std:.4f}" for k, b in result.baselines.items())
st.caption(f"Random baseline (Gaussian W_Q, W_K, W_V, W_O of this model's shapes, d_model {result.d_model}, "
           f"d_head {result.d_head}, {next(iter(result.baselines.values())).n_pairs} random pairs): {base_text}."
           + (f" Grouped-query attention: {result.n_heads} query heads share {result.n_kv_heads} key/value heads, "
              "so query heads of one group share their K and V weights." if result.n_kv_heads < result.n_heads else ""))

atlas = ui.recall(ui.ATLAS_METRICS, loaded)
importance = ui.recall(ui.ABLATION_IMPORTANCE, loaded)
published = published_roles_for(info.name, info.source)
patch_state = st.session_state.get(PATCH_STATE)
patching = patch_state["table"] if patch_state and patch_state["model"] == ui.model_key(loaded) else None

flt = GraphFilter(kinds=tuple(kinds) + (("out",) if with_io else ()), measure=measure, threshold=threshold,
                  top_k=int(top_k) or None, heads=heads, max_edges=int(max_edges))
with ui.user_errors():
    graph = build_graph(result, flt, io=io, atlas=atlas, importance=importance, published=published,
                        patching=patching, model_name=info.name, edges=edges)

overlays = {"atlas roles": atlas, "ablation importance": importance, "published IOI roles": published}
sources = [name for name, overlay in overlays.items() if overlay is not None]
missing = [name for name, present in (("head atlas", atlas is None), ("ablation", importance is None)) if present]
st.markdown(f"**{graph.number_of_nodes()} heads, {graph.number_of_edges()} edges.** "
            + (f"Overlaid: {', '.join(sources)}. " if sources else "")
            + (f"Run the {' and '.join(missing)} page{'s' if len(missing) > 1 else ''} to colour nodes by role and "
               "size them by importance." if missing else ""))
prefer = "atlas"
if atlas is not None and published is not None:
    prefer = st.radio("Colour nodes by", ["atlas", "published"], horizontal=True, key="graph_prefer",
                      format_func=lambda p: {"atlas": "atlas role", "published": "published role"}[p])
elif published is not None:
    prefer = "published"
page = to_html(graph, height="720px", prefer=prefer)
ui.show_html(page, height=740)  # labels and tooltips in `page` are HTML-escaped (circuit_graph.to_html)

name = info.name.replace("/", "_")
downloads = st.columns(4)
downloads[0].download_button("Download GraphML", to_graphml(graph).encode("utf-8"), file_name=f"circuit_{name}.graphml",
                             mime="application/xml", key="download-graphml")
downloads[1].download_button("Download JSON", to_json(graph).encode("utf-8"), file_name=f"circuit_{name}.json",
                             mime="application/json", key="download-json")
downloads[2].download_button("Download HTML (offline)", page.encode("utf-8"), file_name=f"circuit_{name}.html",
                             mime="text/html", key="download-html")
table = edges_frame(graph)  # strongest first
with downloads[3]:
    ui.download_table(table, f"circuit_edges_{name}.csv", label="Download edges (CSV)")
st.dataframe(table, hide_index=True, width="stretch")

st.subheader("Check the edges by path patching")
st.caption("Each head-to-head edge of the graph is patched alone (Wang et al. 2022): the sender's output from the "
           "other prompt set goes only into the receiver's Q, K or V input. Noising (the paper's direction) runs "
           "the clean prompts and sends in the sender's corrupted output; a negative effect means the edge carries "
           "what the task needs. Normalised by the clean - corrupted logit difference.")
row = st.columns([3, 1, 1, 1.4])
prompt_set = row[0].selectbox("Prompts", list(PROMPT_SETS), format_func=PROMPT_SETS.get, key="graph_patch_set")
n_prompts = row[1].number_input("Prompts", 1, 64, 8, key="graph_patch_n")
n_edges = row[2].number_input("Edges (strongest first)", 1, 200, 20, key="graph_patch_edges")
direction = row[3].radio("Direction", ["noising", "denoising"], key="graph_patch_direction", horizontal=True)
candidates = patch_candidates(table, int(n_edges))
if st.button(f"Path-patch {len(candidates)} edge{'s' if len(candidates) != 1 else ''}", key="graph_patch_run",
             disabled=not candidates):
    with ui.user_errors():
        pairs = (ioi_prompts(loaded.model, int(n_prompts)) if prompt_set == "ioi"
                 else induction_prompt_pairs(loaded.model, int(n_prompts)))
        stored_patching = cached(PATH_PATCHING, loaded, path_patching_inputs(pairs, candidates, direction),
                                 lambda: path_patch(loaded.model, pairs, candidates, direction=direction,
                                                    progress=ui.progress_bar("Path patching")),
                                 refresh=recompute)
        outcome = stored_patching.value
    st.session_state[PATCH_STATE] = {"model": ui.model_key(loaded), "table": outcome.table, "outcome": outcome,
                                     "stored": stored_patching}
    st.rerun()
if candidates and not (patch_state and patch_state["model"] == ui.model_key(loaded)):
    # A check stored for these settings (an earlier session, a restarted app) shows at once.
    try:
        pairs = (ioi_prompts(loaded.model, int(n_prompts)) if prompt_set == "ioi"
                 else induction_prompt_pairs(loaded.model, int(n_prompts)))
        found = peek(PATH_PATCHING, loaded, path_patching_inputs(pairs, candidates, direction))
    except HeadVisError:  # prompts this model cannot make: the button says why
        found = None
    if found is not None:
        patch_state = {"model": ui.model_key(loaded), "table": found.value.table, "outcome": found.value,
                       "stored": found}
        st.session_state[PATCH_STATE] = patch_state
        st.rerun()  # the graph above lays the stored effects over its edges
if patch_state and patch_state["model"] == ui.model_key(loaded):
    outcome = patch_state["outcome"]
    ui.show_stored(patch_state["stored"], "Path patching")
    st.markdown(f"{outcome.description}, {outcome.direction}: clean logit difference **{outcome.clean_metric:.3f}**, "
                f"corrupted **{outcome.corrupted_metric:.3f}**. Patched edges carry the effect in their hover text.")
    merged = patched_edges_table(outcome.table, edges)
    st.dataframe(merged, hide_index=True, width="stretch")
    ui.download_table(merged, f"path_patching_{name}.csv", label="Download path patching (CSV)")

if published is not None:
    st.subheader("Published roles (teaching overlay)")
    st.caption(published.source)
    comparison = role_comparison(published, atlas)
    st.dataframe(comparison, hide_index=True, width="stretch")
    if atlas is None:
        st.caption("Run the head atlas to see where its roles agree with the paper's.")
