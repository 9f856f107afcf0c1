"""Ablation: rank every head by what ablating it does (KL ranking), or find the heads that flip a prediction."""

import streamlit as st

import headvis_ui as ui
from headvis_core.ablation.estimate import estimate_heads, refine_estimate
from headvis_core.ablation.experiments import (
    AblationExperiment,
    default_filename,
    experiment_from_json_bytes,
    experiments_dir,
    list_experiments,
    load_experiment,
    save_experiment,
)
from headvis_core.ablation.metrics import ABLATION_METRIC_LABELS
from headvis_core.ablation.ranking import check_metric, rank_heads_by_ablation
from headvis_core.ablation.targeted import targeted_search
from headvis_core.ablation.values import ABLATION_KINDS, make_ablation
from headvis_core.data.ioi import load_templates
from headvis_core.data.prompt_library import prompt_set_keys
from headvis_core.data.prompt_pairs import induction_prompts, ioi_prompts, library_prompts, prompts_from_texts
from headvis_core.errors import HeadVisError, InputError
from headvis_core.heads import HeadRef
from headvis_core.lab.prompt_lab import top_predictions
from headvis_core.limits import check_ablation_memory
from headvis_core.store import cached, peek
from headvis_core.store.fingerprint import inputs_digest
from headvis_core.store.kinds import (
    ESTIMATE,
    KL_RANKING,
    TARGETED,
    estimate_inputs,
    ranking_inputs,
    targeted_inputs,
)
from headvis_core.tokens import single_token_id, tokenize_prompt
from headvis_core.viz.ablation import estimate_agreement_figure, importance_heatmap, trajectory_figure

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
SOURCES = {"prompt": "One prompt", "set": "Prompt set (library)", "ioi": "IOI preset", "induction": "Induction preset"}
MODES = {"kl": "KL ranking of every head",
         "estimate": "Estimate every head at once (attribution patching), then refine the top N exactly",
         "targeted": "Targeted: make another token the top prediction"}
STORE_KINDS = {"kl": KL_RANKING, "estimate": ESTIMATE, "targeted": TARGETED}
KIND_HELP = ("zero: replace the head's output (hook_z) with 0. mean: with its mean over the prompt set, per "
             "position (prompts of one length). resample: with its output on the corrupted prompt "
             "(IOI: a third name instead of the repeated one), position by position.")
ALL_TEMPLATES = "All templates (zero ablation only: lengths differ)"
TYPED = "Type a token..."
RESULT_KEY = "ablation_experiment"
STORED_KEY = "ablation_stored"  # the Stored the shown result came from (when it came from the store)
PEEKED = "abl_peeked"  # the store key last looked up for the form as it stands

loaded = ui.page_setup("Ablation", icon=":material/content_cut:")
model, info = loaded.model, loaded.info
state = st.session_state


st.caption("Ablate attention heads at hook_z (each head's own output, before W_O) and measure how the "
           "prediction at the last token moves. KL ranking ablates every head alone; the targeted search "
           "looks for a small set of heads whose ablation makes a chosen token the top prediction.")

# Widgets bound with bind="query-params" take the URL parameter's name as their key (?source=ioi&n=4):
# a shared link reopens the same setup, and a value the widget cannot hold gives its default.
# Widgets drawn only for some choices are read with state.get, since a hidden widget has no state.
URL = "query-params"
ui.repair_url(integers=("n", "budget", "refine"))
ui.claim_shared_keys({"prompt": DEFAULT_PROMPT})  # the Prompt lab binds ?prompt= too
left, right = st.columns([3, 2])
with left:
    source = st.radio("Prompts", list(SOURCES), captions=list(SOURCES.values()), key="source", bind=URL,
                      horizontal=True)
    templates = load_templates()["templates"]
    answer = alternative_ld = corrupted = ""
    if source == "prompt":
        st.text_area("Prompt", DEFAULT_PROMPT, key="prompt", height=80, bind=URL)
        c1, c2, c3 = st.columns(3)
        answer = c1.text_input("Answer token (optional)", key="abl_answer", placeholder=" Mary",
                               help="For the logit difference: answer minus alternative.")
        alternative_ld = c2.text_input("Alternative token (optional)", key="abl_alt_ld", placeholder=" John")
        corrupted = c3.text_input("Corrupted prompt (resample)", key="abl_corrupted",
                                  placeholder="When Mary and John went to the store, Anna gave a drink to")
    elif source == "set":
        sets = prompt_set_keys()
        st.selectbox("Prompt set", sets, index=sets.index("ioi") if "ioi" in sets else 0, key="set", bind=URL)
    elif source == "ioi":
        c1, c2, c3 = st.columns([1, 3, 1])
        c1.number_input("Prompts", 1, 64, 8, key="n", bind=URL)
        c2.selectbox("Template", [ALL_TEMPLATES] + templates, index=1, key="abl_template")
        c3.number_input("Seed", 0, 10_000, 0, key="abl_seed")
    else:
        c1, c2, c3 = st.columns(3)
        c1.number_input("Sequences", 1, 64, 8, key="n", bind=URL)
        c2.number_input("Half length", 2, 200, 20, key="abl_half")
        c3.number_input("Seed", 0, 10_000, 0, key="abl_seed")
if state.setdefault("abl_previous_source", source) != source:
    # Each preset has its natural metric: IOI's logit(IO) - logit(S), induction's loss on the second copy.
    state.metric = {"ioi": "logit_diff", "induction": "loss"}.get(source, "kl")
    state.abl_previous_source = source
with right:
    kind = st.selectbox("Ablation", ABLATION_KINDS, key="kind", bind=URL, help=KIND_HELP)
    mode = st.radio("Mode", list(MODES), captions=list(MODES.values()), key="mode", bind=URL)
    if mode in ("kl", "estimate"):
        st.selectbox("Metric", list(ABLATION_METRIC_LABELS), key="metric", bind=URL,
                     help="; ".join(f"{code}: {label}" for code, label in ABLATION_METRIC_LABELS.items())
                     + ". KL(clean || ablated) at the answer position; the drop in logit(answer) - "
                       "logit(alternative) (IOI: IO minus S); or the rise in loss on the answer tokens "
                       "(induction: the second copy).")
    if mode == "estimate":
        st.number_input("Refine the top N exactly", min_value=1, max_value=info.n_layers * info.n_heads,
                        value=min(20, info.n_layers * info.n_heads), key="refine", bind=URL,
                        help="The estimate's N most important heads are then ablated one by one, exactly, and "
                             "compared with it (Spearman correlation, top-10 overlap).")
    elif mode == "targeted":
        st.number_input("Budget (most heads)", min_value=0, max_value=200, value=10, key="budget", bind=URL)
ui.mark_shared_keys(("prompt",))
prompt_text = state.get("prompt", DEFAULT_PROMPT)
metric = state.get("metric", "kl")
budget = int(state.get("budget", 10))
refine = int(state.get("refine", 20))
n_prompts = int(state.get("n", 8))
prompt_set = state.get("set")


def build_prompts():
    """The chosen prompts as AblationPrompts (raises InputError on bad input)."""
    if source == "prompt":
        return prompts_from_texts(model, [prompt_text], targets=[answer] if answer else None,
                                  alternatives=[alternative_ld] if alternative_ld else None,
                                  corrupted=[corrupted] if corrupted else None)
    if source == "set":
        return library_prompts(model, prompt_set)
    if source == "ioi":
        template = None if state.abl_template == ALL_TEMPLATES else state.abl_template
        return ioi_prompts(model, n_prompts, seed=int(state.abl_seed), template=template)
    return induction_prompts(model, n_prompts, half_len=int(state.abl_half), seed=int(state.abl_seed))


def page_link() -> dict:
    """This page's URL for the current form (its bound widgets), kept with a stored result for the Home page."""
    keys = {"source": source, "kind": kind, "mode": mode}
    if source == "prompt":
        keys["prompt"] = prompt_text
    elif source == "set":
        keys["set"] = prompt_set
    else:
        keys["n"] = n_prompts
    if mode in ("kl", "estimate"):
        keys["metric"] = metric
    if mode == "estimate":
        keys["refine"] = refine
    elif mode == "targeted":
        keys["budget"] = budget
        if alternative:
            keys["alt"] = alternative
    return {"page": "pages/4_Ablation.py", "query": keys}


@st.cache_data(show_spinner=False, max_entries=32)
def clean_top_tokens(model_key: str, text: str, k: int, _model) -> list[str]:
    return top_predictions(_model, tokenize_prompt(_model, text).tokens, k)["token"].tolist()


if source == "ioi":
    with ui.user_errors():
        preview = build_prompts()
    skipped = preview.skipped_names
    st.caption(f"{len(preview)} IOI prompts, e.g. {preview.texts[0]!r} (corrupted: {preview.corrupted_texts[0]!r}). "
               f"Metric logit(IO) - logit(S). Skipped {len(skipped)} names that are not one token for this model"
               + (f": {', '.join(skipped)}." if skipped else "."))

alternative = None
if mode == "targeted":
    first_text = prompt_text if source == "prompt" else None
    suggestions: list[str] = []
    if first_text and first_text.strip():
        try:
            suggestions = clean_top_tokens(ui.model_key(loaded), first_text, 10, _model=model)[1:]
        except InputError:
            suggestions = []
    options = suggestions + [TYPED]
    if "abl_alt_pick" not in state:  # a token typed into a shared link (?alt=) opens the text box
        state.abl_alt_pick = TYPED if st.query_params.get("alt") or not suggestions else options[0]
    if state.abl_alt_pick not in options:
        state.abl_alt_pick = options[0]
    c1, c2 = st.columns(2)
    pick = c1.selectbox("Token to make the top prediction", options, key="abl_alt_pick",
                        format_func=lambda t: t if t == TYPED else repr(t),
                        help="The clean run's next most likely tokens, or type one (with its leading space).")
    if pick == TYPED:
        typed = c2.text_input("Token", key="alt", bind=URL, placeholder=" John")
        alternative = typed or None
    else:
        alternative = pick
    if source not in ("prompt",) and alternative is None:
        st.caption("Leave the token empty to use each prompt's own alternative (IOI: the subject S).")


def request():
    """The prompts, the store's inputs for the chosen mode, and the settings kept with the result."""
    prompts = build_prompts()
    if mode == "kl":
        inputs = ranking_inputs(prompts, kind, metric, 10)
    elif mode == "estimate":
        inputs = estimate_inputs(prompts, kind, metric, refine)
    else:
        inputs = targeted_inputs(prompts, kind, alternative, budget, True)
    settings = {"source": source, "set": prompt_set if source == "set" else None, "alternative": alternative,
                "budget": budget, "refine": refine, "skipped_names": list(prompts.skipped_names),
                "notes": list(prompts.notes)}
    return prompts, inputs, settings


def show_stored_result(stored, prompts, settings) -> None:
    """Keep a result (just computed or from the store) as this session's experiment."""
    ui.remember(RESULT_KEY, loaded, AblationExperiment(
        model=info.name, mode=mode, kind=kind, metric="margin" if mode == "targeted" else metric,
        prompts=prompts.texts, result=stored.value, settings=settings))
    ui.remember(STORED_KEY, loaded, stored)


def compute_estimate(prompts, ablation, slot):
    """The estimate of every head, shown at once in ``slot``, then its top heads ablated exactly."""
    estimate = estimate_heads(model, prompts, ablation, metric=metric,
                              progress=ui.progress_bar("Attribution patching: every head at once"))
    with slot.container():
        st.markdown(f"**Estimate of every head** ({estimate.passes}, {estimate.seconds:.1f} s; {estimate.note}). "
                    f"Now ablating its top {refine} heads exactly...")
        st.plotly_chart(importance_heatmap(estimate, title="Estimated importance (attribution patching)"),
                        width="stretch", key="abl_estimate_preview")
        bar = ui.progress_bar(f"Refining the top {refine} exactly")
    return refine_estimate(model, prompts, estimate, refine, ablation=ablation, progress=bar)


c1, c2 = st.columns([1, 5])
run = c1.button("Run ablation", type="primary", key="abl_run")
with c2:
    recompute = ui.recompute_button("abl_recompute")
if run or recompute:
    with ui.user_errors():
        if mode == "targeted" and alternative:
            single_token_id(model, alternative)  # a clear message naming how it tokenizes
        prompts, inputs, settings = request()
        if mode in ("kl", "estimate"):
            check_metric(metric, prompts)

        def compute():
            check_ablation_memory(model, prompts, mode)  # refuse before running what cannot fit
            ablation = make_ablation(model, kind, prompts)
            if mode == "estimate":
                return compute_estimate(prompts, ablation, estimate_slot)
            bar = ui.progress_bar("Ablating heads")
            if mode == "kl":
                return rank_heads_by_ablation(model, prompts, ablation, metric=metric, top_n=10, progress=bar)
            return targeted_search(model, prompts, alternative, ablation, budget=budget, progress=bar)

        estimate_slot = st.empty()  # the estimate shows here while its top heads are refined
        stored = cached(STORE_KINDS[mode], loaded, inputs, compute, refresh=recompute, link=page_link())
        estimate_slot.empty()
        show_stored_result(stored, prompts, settings)
        state[PEEKED] = (STORE_KINDS[mode], inputs_digest(inputs))
else:
    # A stored result for the form as it stands shows at once (a reopened URL, a restarted app). Only when
    # the form changed since the last look, so that an experiment opened from a file stays shown.
    try:
        prompts, inputs, settings = request()
        key_now = (STORE_KINDS[mode], inputs_digest(inputs))
        if state.get(PEEKED) != key_now:
            state[PEEKED] = key_now
            found = peek(STORE_KINDS[mode], loaded, inputs)
            if found is not None:
                show_stored_result(found, prompts, settings)
    except HeadVisError:
        pass  # the form is incomplete; Run shows why

with st.expander("Reopen a saved experiment"):
    saved = list_experiments()
    c1, c2 = st.columns([3, 1])
    chosen = c1.selectbox("Saved experiments", saved, format_func=lambda p: p.name, key="abl_saved",
                          placeholder="none saved yet")
    upload = st.file_uploader("...or open an experiment file", type=["json"], key="abl_upload")
    if c2.button("Open", key="abl_open", disabled=not saved):
        with ui.user_errors():
            ui.remember(RESULT_KEY, loaded, load_experiment(chosen))
            ui.remember(STORED_KEY, loaded, None)
    if upload is not None and st.button("Open uploaded file", key="abl_open_upload"):
        with ui.user_errors():
            ui.remember(RESULT_KEY, loaded, experiment_from_json_bytes(upload.getvalue(), upload.name))
            ui.remember(STORED_KEY, loaded, None)

experiment: AblationExperiment | None = ui.recall(RESULT_KEY, loaded)
if experiment is None:
    st.info("Choose prompts, an ablation and a mode, then press **Run ablation**.")
    st.stop()

result = experiment.result
n_prompts = len(experiment.prompts)
st.subheader(f"{MODES[experiment.mode]}: {experiment.kind} ablation, {n_prompts} prompt(s)")
if experiment.model != info.name:
    st.warning(f"This experiment was run on {experiment.model}; the loaded model is {info.name}.")
shown_from = ui.recall(STORED_KEY, loaded)
if shown_from is not None and shown_from.value is result:
    ui.show_stored(shown_from, "This result")
skipped = experiment.settings.get("skipped_names") or []
if experiment.settings.get("source") == "ioi":
    st.caption(f"IOI names skipped (not one token): {len(skipped)}.")
for note in experiment.settings.get("notes") or []:
    st.caption(note)


def send_heads(heads: list[HeadRef]) -> None:
    ui.remember(ui.GRAPH_HEADS, loaded, heads)
    st.success(f"Sent {len(heads)} heads to the circuit graph: {', '.join(str(h) for h in heads)}.")


if experiment.mode == "kl":
    ranking = result
    if experiment.model == info.name:  # never file another model's numbers under the loaded one
        ui.remember(ui.ABLATION_IMPORTANCE, loaded, ranking.importance_table())
    if ranking.engine_note:
        st.caption(ranking.engine_note)
    fig = importance_heatmap(ranking)
    st.plotly_chart(fig, width="stretch")
    ui.download_figure(fig, "ablation_heatmap.html")
    st.markdown(f"**Ranked heads** ({ABLATION_METRIC_LABELS[ranking.metric]}; computed in {ranking.seconds:.1f} s)")
    st.dataframe(ranking.table, hide_index=True, height=320)
    ui.download_table(ranking.table, "ablation_ranking.csv")
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Clean prediction** (first prompt)")
        st.dataframe(ranking.clean_top, hide_index=True)
    with c2:
        if ranking.shifts:
            if state.get("abl_shift_head") not in ranking.shifts:
                state.abl_shift_head = next(iter(ranking.shifts))
            head_label = st.selectbox(
                "Prediction after ablating", list(ranking.shifts), key="abl_shift_head",
                on_change=lambda: ui.set_selected_head(HeadRef.from_label(state.abl_shift_head)),
                help="Choosing a head also makes it the selected head on the other pages.")
            st.dataframe(ranking.shifts[head_label], hide_index=True)
    n_send = st.number_input("Top heads to send", 1, len(ranking.table), min(10, len(ranking.table)), key="abl_n_send")
    if st.button("Send heads to the circuit graph", key="abl_send"):
        send_heads(ranking.top_heads(int(n_send)))
elif experiment.mode == "estimate":
    refined = result
    estimate = refined.estimate
    st.markdown(f"**Estimate of every head** ({estimate.passes}, {estimate.seconds:.1f} s; {estimate.note}), "
                f"then the top {experiment.settings.get('refine', len(refined.exact.table))} heads ablated "
                f"exactly ({refined.exact.seconds:.1f} s).")
    a = refined.agreement
    m1, m2, m3 = st.columns(3)
    m1.metric("Spearman (estimate vs exact)", "undefined" if a.to_dict()["spearman"] is None else f"{a.spearman:.2f}",
              help="Rank correlation over the heads ablated exactly; undefined for fewer than 3 heads or a "
                   "constant column.")
    m2.metric(f"Top-{a.top_k} overlap", f"{a.top_k_overlap} of {a.top_k}",
              help="Heads in both the estimate's and the exact top k, among the heads ablated exactly.")
    m3.metric("Heads compared", a.n_heads)
    if a.n_heads <= a.top_k:
        st.caption(f"With {a.n_heads} heads refined, the top-{a.top_k} overlap compares the refined heads with "
                   "themselves; refine more heads than that for an overlap that can tell the rankings apart.")
    left, right = st.columns(2)
    with left:
        fig = importance_heatmap(estimate, title="Estimated importance of every head (attribution patching)")
        st.plotly_chart(fig, width="stretch", key="abl_estimate_heatmap")
        ui.download_figure(fig, "estimate_heatmap.html")
    with right:
        fig = estimate_agreement_figure(refined)
        st.plotly_chart(fig, width="stretch", key="abl_agreement")
        ui.download_figure(fig, "estimate_vs_exact.html", label="Download estimate vs exact (HTML)")
    table = refined.table
    st.dataframe(table, hide_index=True, height=320)
    ui.download_table(table, "ablation_estimate.csv")
    if experiment.model == info.name:
        ui.remember(ui.ABLATION_IMPORTANCE, loaded,
                    table.rename(columns={"estimate": "importance"})[["layer", "head", "importance"]])
    n_send = st.number_input("Top heads to send", 1, len(table), min(10, len(table)), key="abl_n_send")
    if st.button("Send heads to the circuit graph", key="abl_send"):
        send_heads(estimate.top_heads(int(n_send)))
else:
    search = result
    (st.success if search.found else st.info)(search.summary)
    st.markdown(f"Heads: **{', '.join(str(h) for h in search.heads) or 'none'}**"
                + (f" (greedy order before pruning: {', '.join(str(h) for h in search.greedy_heads)})"
                   if search.greedy_heads != search.heads else "") + f"; {search.passes} batched passes, "
                f"{search.seconds:.1f} s.")
    fig = trajectory_figure(search)
    st.plotly_chart(fig, width="stretch")
    ui.download_figure(fig, "targeted_trajectory.html")
    st.dataframe(search.trajectory, hide_index=True)
    ui.download_table(search.trajectory, "targeted_trajectory.csv")
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Clean prediction** (first prompt)")
        st.dataframe(search.clean_top, hide_index=True)
    with c2:
        st.markdown("**After ablating the set** (first prompt)")
        st.dataframe(search.final_shift, hide_index=True)
    if search.heads and st.button("Send heads to the circuit graph", key="abl_send"):
        send_heads(search.heads)

if experiment.mode == "estimate":
    st.stop()  # an estimate is kept in the result store and downloads above, not as an experiment file
c1, c2 = st.columns([3, 1])
filename = c1.text_input("File name", value=default_filename(experiment), key="abl_filename")
if c2.button("Save experiment", key="abl_save"):
    with ui.user_errors():
        name = filename if filename.endswith(".json") else filename + ".json"
        if "/" in name or "\\" in name or name.startswith("."):
            raise InputError("Give a plain file name, without folders.")
        path = save_experiment(experiment, experiments_dir() / name)
    st.success(f"Saved {path}")
