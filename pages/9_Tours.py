"""Tours: the induction, IOI and greater-than circuits found live on the loaded model, step by step."""

import streamlit as st

import headvis_ui as ui
from headvis_core.tours.base import run_step
from headvis_core.tours.catalog import TOURS
from headvis_core.tours.export import html_text, notebook_text

loaded = ui.page_setup("Tours", icon=":material/school:")
model, info = loaded.model, loaded.info
st.caption("Each tour walks through a classic circuit on the model in the sidebar: every step computes on this "
           "model, draws its figure, says in a sentence what it found (or that it found nothing convincing) and "
           "links to the full page. Results are kept in the result store, so a second visit is instant.")

# Widget keys are the URL's parameter names (bind="query-params"): a link reopens the same tour and step.
# No format_func: a bound selectbox's URL value is the option as displayed, so the options stay plain keys.
left, right = st.columns([1, 3])
tour_key = left.selectbox("Tour", list(TOURS), key="tour", bind="query-params")
tour = TOURS[tour_key]
right.markdown(f"**{tour.title}.** {tour.summary}")
numbers = [str(n) for n in range(1, len(tour.steps) + 1)]
number = left.selectbox("Step", numbers, key="step", bind="query-params")
right.markdown("  \n".join(f"{n}. {s.title}" for n, s in enumerate(tour.steps, start=1)))
index = int(number) - 1
recompute = st.button("Recompute this step", help="Run the step again instead of reading the result store.")

results = []
found: dict = {}
with ui.user_errors():
    progress = ui.progress_bar(tour.title)
    for i in range(index + 1):
        progress(i / (index + 1), f"step {i + 1}: {tour.steps[i].title}")
        results.append(run_step(model, tour, i, found, model_name=info.name, refresh=recompute and i == index,
                                loaded=loaded))
    progress(1.0, "done")

step, result = tour.steps[index], results[-1]
if index:
    with st.expander("What the earlier steps found"):
        for n, (earlier, earlier_result) in enumerate(zip(tour.steps, results[:-1]), start=1):
            st.markdown(f"**{n}. {earlier.title}**")
            st.text(earlier_result.sentence)

st.subheader(f"{number}. {step.title}")
st.markdown(step.explanation)
st.caption(step.paper)
(st.success if result.convincing else st.warning)(result.sentence)
for note in result.notes:
    st.info(note)
if result.figure is not None:
    st.plotly_chart(result.figure, width="stretch")
    ui.download_figure(result.figure, f"tour_{tour.key}_step{number}.html")
if result.table is not None and not result.table.empty:
    st.dataframe(result.table, hide_index=True, width="stretch")
    ui.download_table(result.table, f"tour_{tour.key}_step{number}.csv")
if result.link:
    st.markdown(f"[Open this view in the full page]({result.link})")
where = "from the result store, " if result.from_store else ""
st.caption(f"Step computed {where}in {result.seconds:.1f} s.")

st.divider()
left, right = st.columns(2)
left.download_button("Download the tour as a notebook (.ipynb)", notebook_text(tour, info.name),
                     file_name=f"tour_{tour.key}.ipynb", mime="application/x-ipynb+json")
right.download_button(f"Download steps 1-{number} as HTML", html_text(tour, results, info.name),
                      file_name=f"tour_{tour.key}_{info.name}.html", mime="text/html")
