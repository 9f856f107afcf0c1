"""Circuit tours: steps run on a tiny model and say when they find nothing; results come back from the store;
the exported notebook's code cells run; the HTML page escapes; on SmolLM2 the tours find the known heads."""

import math

import nbformat
import pandas as pd
import pytest

from headvis_core.atlas.run import compute_atlas
from headvis_core.errors import InputError
from headvis_core.store.results import default_store
from headvis_core.tours.base import StepResult, run_step, run_tour
from headvis_core.tours.catalog import TOURS, get_tour
from headvis_core.tours.export import html_text, notebook_text, write_export


@pytest.fixture(autouse=True)
def private_store(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADVIS_STORE_DIR", str(tmp_path / "store"))


def test_the_three_tours_and_their_steps():
    assert [len(TOURS[k].steps) for k in ("induction", "ioi", "greater-than")] == [7, 6, 3]
    for tour in TOURS.values():
        for step in tour.steps:
            assert callable(step.resolve()) and step.paper and step.explanation
    assert get_tour("ioi").step_index("3") == 2 and get_tour("ioi").step_index("faithfulness") == 5
    with pytest.raises(InputError, match="steps 1-6"):
        get_tour("ioi").step_index("7")
    with pytest.raises(InputError, match="No tour called"):
        get_tour("nope")


def test_induction_tour_on_a_random_model_says_it_finds_nothing(tiny_llama):
    tour = get_tour("induction")
    results = run_tour(tiny_llama.model, tour, model_name="tiny-llama", loaded=tiny_llama)
    assert len(results) == 7
    # A randomly initialised model has no in-context copying and no induction heads: every step says so.
    assert not results[0].convincing and "no clear sign" in results[0].sentence
    assert not results[2].convincing and "No head of this model passes the induction threshold" in results[2].sentence
    assert all(r.sentence for r in results)
    assert results[1].link.startswith("Head_atlas?model=tiny-llama")
    # A second visit reads every step from the store, with the same findings.
    again = run_tour(tiny_llama.model, tour, model_name="tiny-llama", loaded=tiny_llama)
    assert all(r.from_store for r in again)
    links = [e.link for e in default_store().entries(kind="tour_step")]
    assert {"page": "pages/9_Tours.py", "query": {"tour": "induction", "step": "3"}} in links
    assert [r.sentence for r in again] == [r.sentence for r in results]
    found: dict = {}
    fresh = run_step(tiny_llama.model, tour, 0, found, model_name="tiny-llama", refresh=True)
    assert not fresh.from_store and "first_copy_loss" in found


def test_greater_than_tour_on_a_random_model_finds_nothing(tiny_llama):
    results = run_tour(tiny_llama.model, get_tour("greater-than"), model_name="tiny-llama")
    assert len(results) == 3 and not any(r.convincing for r in results)
    assert "hardly predicts a two-digit ending" in results[0].sentence
    assert "no clear greater-than behaviour" in results[1].sentence
    assert "nothing convincing reads the year" in results[2].sentence
    assert len(results[2].table) == min(15, tiny_llama.model.cfg.n_layers * tiny_llama.model.cfg.n_heads)
    assert results[2].link.startswith("Prompt_sweeps?model=tiny-llama")


def test_ioi_tour_refuses_a_model_without_single_token_names(tiny_llama):
    with pytest.raises(InputError, match="single tokens"):
        run_step(tiny_llama.model, get_tour("ioi"), 0, {}, model_name="tiny-llama")


def test_exported_notebook_cells_run(tiny_llama, monkeypatch):
    text = notebook_text(get_tour("induction"), "tiny-llama")
    notebook = nbformat.reads(text, as_version=4)
    nbformat.validate(notebook)
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) == 1 + 7 and all("headvis_core" in c for c in code)
    namespace: dict = {}
    for source in code:  # what Jupyter would run, cell by cell, in one namespace
        exec(compile(source, "<cell>", "exec"), namespace)
    assert isinstance(namespace["result"], StepResult)
    assert "first_copy_loss" in namespace["found"] and "induction_heads" in namespace["found"]


def test_html_export_escapes_and_holds_figures(tmp_path):
    tour = get_tour("greater-than")
    hostile = StepResult(sentence="<script>alert(1)</script> found", table=pd.DataFrame({"t": ["<b>x</b>"]}))
    page = html_text(tour, [hostile], "<img src=x>")
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "<b>x</b>" not in page and "<img src=x>" not in page
    path = write_export(tmp_path / "tour.ipynb", tour, "tiny-llama")
    assert nbformat.read(path, as_version=4).cells


@pytest.fixture(scope="module")
def smollm2_induction(smollm2, tmp_path_factory):
    import os

    os.environ["HEADVIS_STORE_DIR"] = str(tmp_path_factory.mktemp("store"))
    return run_tour(smollm2.model, get_tour("induction"), model_name="smollm2-135m", loaded=smollm2)


def test_smollm2_induction_tour_finds_an_atlas_top3_induction_head_whose_ablation_hurts(smollm2,
                                                                                       smollm2_induction):
    results = smollm2_induction
    assert results[0].convincing and results[0].found["first_copy_loss"] - results[0].found["second_copy_loss"] > 3
    head = results[2].found["induction_heads"][0]
    # The atlas run the way the Head atlas page runs it (its own defaults), independently of the tour's.
    atlas = compute_atlas(smollm2.model).table
    top3 = [f"{r.layer}.{r.head}" for r in atlas.nlargest(3, "induction").itertuples()]
    assert head in top3
    assert results[5].found["induction_loss_rise"][head] > 0.1  # nats of second-copy loss


@pytest.fixture(scope="module")
def smollm2_ioi(smollm2, tmp_path_factory):
    import os

    os.environ["HEADVIS_STORE_DIR"] = str(tmp_path_factory.mktemp("store"))
    return run_tour(smollm2.model, get_tour("ioi"), model_name="smollm2-135m", loaded=smollm2)


def test_smollm2_ioi_tour_finds_a_head_that_lowers_the_logit_difference_and_reports_faithfulness(smollm2_ioi):
    results = smollm2_ioi
    assert results[0].found["clean_logit_diff"] > 0
    # mean-ablating the best head found (over the ABC prompts) lowers the logit difference by at least 0.2
    assert results[1].found["top_drop"] >= 0.2, results[1].sentence
    assert results[1].found["top_drop_head"] in results[1].sentence
    faithfulness = results[5].found["faithfulness"]
    assert math.isfinite(faithfulness) and f"faithfulness {faithfulness:.2f}" in results[5].sentence
