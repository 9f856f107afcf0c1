"""Prompt lab: chosen heads' attention on any prompt, heads ranked on a query/key pair, predictions."""

import streamlit as st

import headvis_ui as ui
from headvis_core.attribution.edge import EdgeSpec, attribution_link
from headvis_core.data.prompt_library import load_all_prompt_sets
from headvis_core.heads import HeadRef, all_heads
from headvis_core.lab.positions import induction_key
from headvis_core.lab.prompt_lab import analyse_prompt
from headvis_core.limits import check_prompt_memory
from headvis_core.tokens import token_labels, tokenize_prompt
from headvis_core.viz.patterns import attention_heatmap
from headvis_core.viz.prompt_lab import head_grid_picker, pair_figure
from headvis_core.viz.token_view import token_view_html

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy"
OWN_PROMPT = "(your own prompt)"
LONG_PROMPT = 160  # tokens; longer prompts get a window slider

loaded = ui.page_setup("Prompt lab")
info, model = loaded.info, loaded.model
state = st.session_state
ui.repair_url(lists=("heads",))  # old links: ?heads=1.2,0.3


@st.cache_data(show_spinner=False)
def library() -> dict[str, str]:
    return {f"{s.name}: {p.text[:70]}": p.text for s in load_all_prompt_sets() for p in s.prompts}


@st.cache_data(max_entries=32, show_spinner="Running the model...")
def analyse(model_key: str, tokens: tuple, heads: tuple, query: int, key: int, window: tuple, _model):
    import torch

    return analyse_prompt(_model, torch.tensor([tokens]), list(heads), query, key, n_predictions=10, top_k=8,
                          window=window)


# -- prompt --------------------------------------------------------------------------------------------
# Keys of widgets bound with bind="query-params" are the URL's parameter names (?prompt=, ?heads=).
# The Ablation page binds ?prompt= too: each page keeps its own prompt across visits.
ui.claim_shared_keys({"prompt": DEFAULT_PROMPT})
prompts = library()


def use_library_prompt() -> None:
    choice = state.lab_library
    if choice != OWN_PROMPT:
        state.prompt = prompts[choice]


st.selectbox("Prompt library", [OWN_PROMPT] + list(prompts), key="lab_library", on_change=use_library_prompt,
             help="Curated prompts from prompts/ (IOI, induction, years, lists, multilingual, code).")
text = st.text_area("Prompt", DEFAULT_PROMPT, key="prompt", height=100, bind="query-params")
ui.mark_shared_keys(("prompt",))
cut = st.checkbox(f"Cut a prompt longer than the context ({info.n_ctx} tokens) instead of refusing it",
                  key="lab_cut")
with ui.user_errors():
    prompt = tokenize_prompt(model, text, truncate=cut)
    check_prompt_memory(model, prompt.n_tokens)  # every pattern of a long prompt may not fit: refuse first
if prompt.truncated_from:
    st.warning(f"The prompt was {prompt.truncated_from} tokens long; only its first {prompt.n_tokens} are used.")
labels = token_labels(prompt.str_tokens)
n = prompt.n_tokens

# -- heads -------------------------------------------------------------------------------------------------
names = [str(h) for h in all_heads(info.n_layers, info.n_heads)]
atlas = ui.selected_head(loaded)
# ?heads= is also a text on other pages; a URL's own heads (the valid ones) win over this default.
ui.claim_shared_keys({"heads": [str(atlas)] if atlas else names[:1]})
grid_state = state.get("lab_grid")
clicked = [p.get("customdata") for p in (grid_state or {}).get("selection", {}).get("points", [])]
if clicked and clicked != state.get("lab_grid_seen"):
    state.lab_grid_seen = clicked
    state.heads = list(dict.fromkeys(state.heads + [c for c in clicked if c in names]))


def add_atlas_head() -> None:
    state.heads = list(dict.fromkeys(state.heads + [str(atlas)]))


left, right = st.columns([3, 1])
chosen = left.multiselect("Heads (layer.head)", names, key="heads", bind="query-params",
                          help="Several heads at once; or click cells in the grid below.")
ui.mark_shared_keys(("heads",))
if atlas is not None:
    right.button(f"Add atlas head {atlas}", disabled=str(atlas) in chosen, on_click=add_atlas_head)
heads = [HeadRef.from_label(c) for c in chosen]
with st.expander("Pick heads on the layer x head grid"):
    st.plotly_chart(head_grid_picker(info.n_layers, info.n_heads, heads), key="lab_grid", on_select="rerun",
                    selection_mode="points", width="stretch")

# -- query / key pair and window ----------------------------------------------------------------------------
# Positions index this prompt's tokens, so they are not bound widgets: ?q= and ?k= are read once per
# prompt (out of range: the defaults) and written back below.
token_ids = prompt.tokens[0].tolist()


def url_position(name: str) -> int | None:
    position = ui.query_int(name, -1, -1, n)  # unreadable: -1; past the end: n
    return position if 0 <= position < n else None


if state.get("lab_n") != n:  # first run, or a new prompt: positions from the URL once, else defaults
    first = "lab_n" not in state
    url_query = url_position("q") if first else None
    state.lab_query = n - 1 if url_query is None else url_query
    url_key = url_position("k") if first else None
    state.lab_key = induction_key(token_ids, state.lab_query) if url_key is None else url_key
    state.lab_n = n


def reset_key() -> None:
    state.lab_key = induction_key(token_ids, state.lab_query)


c1, c2 = st.columns(2)
query = c1.selectbox("Query token (attends from)", range(n), format_func=lambda i: labels[i], key="lab_query",
                     on_change=reset_key)
key = c2.selectbox("Key token (attended to)", range(n), format_func=lambda i: labels[i], key="lab_key",
                   help="Defaults to the token after the previous occurrence of the query token (induction).")
window = (0, n)
if n > LONG_PROMPT:
    start = st.slider("Window of positions shown (long prompt)", 0, n - 1, max(0, n - LONG_PROMPT), key="lab_window")
    window = (start, min(n, start + LONG_PROMPT))

ui.set_query_params(q=query, k=key)

with ui.user_errors():
    result = analyse(ui.model_key(loaded), tuple(prompt.tokens[0].tolist()), tuple(heads), query, key, window,
                     _model=model)

# -- ranking and predictions ----------------------------------------------------------------------------------------
rank_col, pred_col = st.columns([3, 2])
with rank_col:
    st.subheader(f"Heads ranked on {labels[query]} \u2190 {labels[key]}")
    fig = pair_figure(result.pair_ranking, info.n_layers, info.n_heads,
                      title=f"attention from {labels[query]} to {labels[key]}")
    st.plotly_chart(fig, width="stretch")
    st.dataframe(result.pair_ranking.head(15), hide_index=True, width="stretch")
    ui.download_table(result.pair_ranking, "pair_ranking.csv")
with pred_col:
    st.subheader("Top next-token predictions")
    st.dataframe(result.predictions.style.format({"probability": "{:.3f}", "logit": "{:.2f}"}), hide_index=True,
                 width="stretch")
    ui.download_table(result.predictions, "predictions.csv", label="Download predictions (CSV)")

# -- per head ------------------------------------------------------------------------------------------------------
if not heads:
    st.info("Choose one or more heads above to see their attention patterns.")
start, stop = result.window_start, result.window_stop
for i, head in enumerate(heads):
    st.subheader(f"Head {head}")
    edge = attribution_link(text, EdgeSpec(head, query, key))
    ui.link_to_page(edge["page"], f"Why does {head} attend from {labels[query]} to {labels[key]}? Edge attribution",
                    {"model": info.name, **edge["query"]})
    heat_col, view_col = st.columns(2)
    with heat_col:
        fig = attention_heatmap(result.windows[i], prompt.str_tokens[start:stop], title=f"head {head}")
        fig.update_traces(x=labels[start:stop], y=labels[start:stop])  # positions of the window, not from 0
        st.plotly_chart(fig, width="stretch", key=f"heatmap_{head}")
        ui.download_figure(fig, f"attention_{head}.html")
    with view_col:
        html = token_view_html(prompt.str_tokens, result.sparse[i], title=f"head {head}", start=start, stop=stop,
                               selected=query)
        ui.show_html(html)
