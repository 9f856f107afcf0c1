"""Prompt sweeps: a template with named slots run over ranges; attention and answers across the slot."""

import pandas as pd
import streamlit as st

import headvis_ui as ui
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef, parse_heads
from headvis_core.limits import check_sweep_memory
from headvis_core.store import cached, peek
from headvis_core.store.fingerprint import inputs_digest
from headvis_core.store.kinds import SWEEP, sweep_inputs
from headvis_core.sweeps.plan import SweepSpec, build_plan, tokenization_report
from headvis_core.sweeps.presets import load_presets, usable_heads
from headvis_core.sweeps.ranges import curve_range_reports, level_bounds, ranges_table
from headvis_core.sweeps.run import DEFAULT_BATCH_TOKENS, MAX_BATCH, run_sweep
from headvis_core.viz.sweeps import sweep_figure

loaded = ui.page_setup("Prompt sweeps", icon=":material/ssid_chart:")
info = loaded.info
state = st.session_state
# Widgets bound with bind="query-params" take the URL parameter's name as their key (?template=...&level=0.5):
# a link reopens the same sweep, and a value a widget cannot hold gives its default.
URL = "query-params"
ui.repair_url(integers=("sample", "min_values", "max_gap"))

st.markdown(
    "Fill a template's `{slots}` with every value of a range, run all prompts in batches, and follow a head's "
    "attention (query → key) and the model's answers across the values. Ranges where a curve reaches the level "
    "are found for you: the HeadVis year test asks for which years a head links the two halves of a year.")

with ui.user_errors():
    presets = load_presets()
by_id = {p.id: p for p in presets}

FIELDS = ("preset", "template", "slots", "query", "key", "answers", "gt", "heads")


def preset_fields(preset_id: str) -> dict[str, str]:
    chosen = by_id[preset_id]
    heads, _ = usable_heads(chosen.heads_for(info.name), info.n_layers, info.n_heads)
    return {"template": chosen.spec.template, "slots": "\n".join(chosen.spec.slots), "query": chosen.spec.query,
            "key": chosen.spec.key or "", "answers": "\n".join(chosen.spec.answers),
            "gt": chosen.spec.greater_than or "", "heads": ",".join(map(str, heads))}


def apply_preset() -> None:
    for field, value in preset_fields(state.preset).items():
        state[field] = value
    state.pop("sweep_result", None)


def add_heads(extra) -> None:
    extra = state.get("sweep_atlas_heads", []) if extra is None else extra
    current = [h.strip() for h in state.heads.split(",") if h.strip()]
    state.heads = ",".join(dict.fromkeys(current + list(extra)))


if "template" not in state:
    if "saved_sweep_form" in state:  # back from another page, which dropped the widgets' state
        for field, value in state.saved_sweep_form.items():
            state[field] = value
    else:  # first visit: the preset fills the form, then the URL's own values win (bound widgets)
        start = ui.query_param("preset", presets[0].id)
        state.preset = start if start in by_id else presets[0].id
        fields = preset_fields(state.preset)
        if ui.query_param("template"):  # a URL with its own template: what it leaves out takes the plain default
            fields.update(template="", slots="", query="last", key="", answers="", gt="")
        for field, value in fields.items():
            state[field] = value

# ?heads= is also a list of heads on the Prompt lab: take this page's own back after a visit there.
ui.claim_shared_keys({"heads": state["heads"] if isinstance(state.get("heads"), str) else ""})
chosen = by_id[state.preset]

# ----------------------------------------------------------------------------- the form
left, right = st.columns([3, 2])
with left:
    st.selectbox("Preset", list(by_id), key="preset", bind=URL, on_change=apply_preset,
                 help="; ".join(f"{p.id}: {p.name}" for p in presets))
    st.caption(f"**{chosen.name}**: {chosen.note}")
    st.text_area("Template", key="template", bind=URL, height=80,
                 help="Text with {slot} references and optional [[marked]] words; {{ and }} are literal braces.")
    st.text_area("Slots, one per line", key="slots", bind=URL, height=110,
                 help="year=1000..1999 (ends included; :10 for a step; 02..98 pads), noun=war,feud (a list), "
                      "name=@sweeps:ioi_names (a list in prompts/), XX=year[:2], YY=year[2:], next=year+1 (derived).")
with right:
    st.text_input("Heads (layer.head, comma separated)", key="heads", bind=URL,
                  help="The heads whose attention from the query to the key is read for every value.")
    ui.mark_shared_keys(("heads",))
    picked = ui.selected_head(loaded)
    atlas = ui.recall(ui.ATLAS_METRICS, loaded)
    add_cols = st.columns(2)
    if picked is not None:
        add_cols[0].button(f"Add selected head {picked}", key="sweep_add_selected", on_click=add_heads,
                           args=([str(picked)],))
    if isinstance(atlas, pd.DataFrame) and {"layer", "head"} <= set(atlas.columns):
        labels = {f"{int(r.layer)}.{int(r.head)}": f"{int(r.layer)}.{int(r.head)}"
                  + (f" ({r.behaviour})" if "behaviour" in atlas.columns else "") for r in atlas.itertuples()}
        st.multiselect("Heads from the atlas", list(labels), format_func=labels.get, key="sweep_atlas_heads")
        add_cols[1].button("Add atlas heads", key="sweep_add_atlas", on_click=add_heads,
                           args=(None,), disabled=not state.get("sweep_atlas_heads"))
    q_col, k_col = st.columns(2)
    q_col.text_input("Query position", key="query", bind=URL,
                     help="last, first, bos, an index, SLOT:first, SLOT:last, SLOT#2:first, mark, mark#2; +N/-N "
                          "moves by tokens (year:last-1).")
    k_col.text_input("Key position", key="key", bind=URL, help="Empty: the first slot's first token.")
    st.text_area("Answer tokens, one per line", key="answers", bind=URL, height=68,
                 help="Read at the last position. Keep the leading space most words need (' Mary'); may hold "
                      "{slot} (' {country}').")
    st.text_input("Greater-than slot", key="gt", bind=URL,
                  help="A slot holding the number the answer should exceed (YY in the greater-than preset).")
with st.expander("Options"):
    o1, o2, o3 = st.columns(3)
    drop_odd = o1.checkbox("Leave out values with another token count", key="drop_odd", bind=URL)
    predictions = o2.checkbox("Read the model's answers (full pass)", value=True, key="predictions", bind=URL,
                              help="Off: attention only, the pass stops after the last chosen head's layer.")
    sample = o3.number_input("Sample this many values (0: all)", min_value=0, max_value=100_000, value=0, step=100,
                             key="sample", bind=URL)

state.saved_sweep_form = {field: state[field] for field in FIELDS}
spec = SweepSpec(template=state.template, slots=tuple(line for line in state.slots.splitlines() if line.strip()),
                 query=state.query.strip() or "last", key=state["key"].strip() or None,
                 answers=tuple(a for a in state.answers.splitlines() if a.strip()),
                 greater_than=state.gt.strip() or None)


@st.cache_data(max_entries=8, show_spinner="Tokenizing the sweep...")
def cached_plan(model_key: str, spec: SweepSpec, drop_odd: bool, sample: int, _model):
    return build_plan(_model, spec, drop_odd_lengths=drop_odd, sample=sample or None)


with ui.user_errors():
    heads: list[HeadRef] = parse_heads(state.heads, info.n_layers, info.n_heads) if state.heads.strip() else []
    if not spec.slots:
        raise InputError("Define at least one slot, for example year=1000..1999.")
    plan = cached_plan(ui.model_key(loaded), spec, drop_odd, int(sample), _model=loaded.model)

st.subheader("How sample values tokenize")
st.caption(f"{plan.n_values} values over {', '.join(plan.swept)}; most prompts are {plan.majority_length} tokens. "
           "Query and key are shown as position:token.")
st.dataframe(tokenization_report(loaded.model, plan), hide_index=True, width="stretch")
for warning in plan.warnings:
    st.warning(warning)

inputs = sweep_inputs(plan, heads, predictions)
run_key = (ui.model_key(loaded), inputs_digest(inputs))
link = {"page": "pages/6_Prompt_sweeps.py",
        "query": {**{field: state[field] for field in FIELDS}, "predictions": str(predictions).lower(),
                  "drop_odd": str(drop_odd).lower(), "sample": int(sample), "run": 1}}
shown = state.get("sweep_result")
b1, b2 = st.columns([1, 5])
clicked = b1.button("Run sweep", type="primary", key="sweep_run")
with b2:
    recompute = ui.recompute_button("sweep_recompute")
if not (clicked or recompute) and (shown is None or shown[0] != run_key):
    # A sweep stored for this form (a reopened URL, a restarted app) shows at once, with nothing run.
    found = peek(SWEEP, loaded, inputs)
    if found is not None:
        state.sweep_result = shown = (run_key, found)
if clicked or recompute or (shown is None and ui.query_param("run") == "1"):  # run=1: a shared URL's results
    with ui.user_errors():
        def compute():
            check_sweep_memory(loaded.model, plan, DEFAULT_BATCH_TOKENS, predictions=predictions, max_batch=MAX_BATCH)
            return run_sweep(loaded.model, plan, heads, predictions=predictions,
                             progress=ui.progress_bar(f"Sweeping {plan.n_values} values"))

        stored = cached(SWEEP, loaded, inputs, compute, refresh=recompute, link=link)
    state.sweep_result = (run_key, stored)
    ui.set_query_params(run=1)
    shown = state.sweep_result

if shown is None:
    st.info("Press **Run sweep** to measure every value.")
    st.stop()
if shown[0] != run_key:
    st.info("The form has changed since the last run: press **Run sweep** to update the results below.")
ui.show_stored(shown[1], "Sweep")
result = shown[1].value

# ----------------------------------------------------------------------------- results
st.subheader("Across the slot")
c1, c2, c3, c4 = st.columns([2, 2, 1, 1])
curve = c1.selectbox("Curve for the ranges", result.curves, key="curve", bind=URL,
                     index=result.curves.index(chosen.curve) if chosen.curve in result.curves else 0)
low, high = level_bounds(result.table[curve].to_numpy(float))
# The slider's range follows the curve; a URL level outside it (or not a number) gives the default.
level = c2.slider("Level", min_value=low, max_value=high, value=min(max(float(chosen.level), low), high), step=0.01,
                  key="level", bind=URL)
above = c3.radio("Ranges at or", ["above", "below"], key="side", bind=URL) == "above"
min_length = c4.number_input("Min values", min_value=1, value=1, step=1, key="min_values", bind=URL)
max_gap = c4.number_input("Bridge gaps of", min_value=0, value=0, step=1, key="max_gap", bind=URL)

with ui.user_errors():
    reports = curve_range_reports(result, curve, level, above=above, min_length=int(min_length),
                                  max_gap=int(max_gap))
for report in reports:
    st.text(report.description)  # plain text: slot values are not markdown

plotted = [curve]
if len(result.swept) == 1:
    others = [c for c in result.curves if c != curve]
    default_others = [c for c in others if c.startswith("attn ")][:4] if curve.startswith("attn ") else []
    plotted += st.multiselect("Also plot", others, default=default_others, key="sweep_also")
fig = sweep_figure(result, plotted, level, {report.row: report.ranges for report in reports}, title=spec.template)
st.plotly_chart(fig, width="stretch")
range_rows = ranges_table(reports, result.swept[1] if len(result.swept) > 1 else None)
d1, d2, d3 = st.columns(3)
with d1:
    ui.download_table(result.table, "sweep.csv")
with d2:
    ui.download_figure(fig, "sweep.html")
with d3:
    if len(range_rows):
        ui.download_table(range_rows, "sweep_ranges.csv", label="Download ranges CSV")
if curve.startswith("attn "):
    head = result.heads[[f"attn {h}" for h in result.heads].index(curve)]
    if st.button(f"Open head {head} on the other pages", key="sweep_select_head"):
        ui.set_selected_head(head)
with st.expander("Table"):
    st.dataframe(result.table, hide_index=True, width="stretch")
