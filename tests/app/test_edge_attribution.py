"""The Edge attribution page: an edge from the URL, its tables and downloads, and its error paths."""

import pytest

from tests.app import bound_params
from tests.conftest import app_test

PAGE = "pages/7_Edge_attribution.py"


@pytest.fixture(autouse=True)
def private_store(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADVIS_STORE_DIR", str(tmp_path / "store"))


def test_an_edge_from_the_url_is_explained():
    at = app_test(PAGE, prompt="abcabcab", layer=1, head=2, q=7, k=3).run()
    assert not at.exception and not at.error
    assert at.number_input(key="layer").value == 1 and at.number_input(key="q").value == 7
    assert bound_params(at) >= {"prompt", "layer", "head", "q", "k"}
    score, total, _ = (float(m.value) for m in at.metric)
    assert abs(score - total) <= 1e-3 * max(1.0, abs(score))
    query_side = at.dataframe[0].value
    assert list(query_side.columns) == ["component", "label", "value"]
    assert {"embed", "L0H0", "L0MLP", "bias"} <= set(query_side.component)
    labels = {b.label for b in at.get("download_button")}
    assert {"Download query side (CSV)", "Download all QK terms (CSV)", "Download the attribution (JSON)",
            "Download diagram (HTML)"} <= labels
    assert len(at.get("iframe")) == 1  # the path diagram
    assert not any("result store" in c.value for c in at.caption)
    # a restart (a new session, same URL) shows the stored result
    again = app_test(PAGE, prompt="abcabcab", layer=1, head=2, q=7, k=3).run()
    assert not again.exception and not again.error
    assert any("From the result store" in c.value for c in again.caption)
    assert float(again.metric[0].value) == score


def test_changing_the_key_recomputes():
    at = app_test(PAGE, prompt="abcabcab", layer=1, head=0, q=7, k=3).run()
    first = float(at.metric[0].value)
    at.number_input(key="k").set_value(7).run()
    assert not at.exception and not at.error
    assert at.number_input(key="k").value == 7
    second = float(at.metric[0].value)
    assert first != second
    assert at.subheader[0].value == "Head 1.0: 7:a \u2192 7:a"  # the new edge: the query to itself


def test_bad_edges_show_errors_not_tracebacks():
    at = app_test(PAGE, prompt="abcabcab", layer=1, head=2, q=3, k=5).run()
    assert not at.exception and "comes after the query" in at.error[0].value
    at.number_input(key="q").set_value(40).run()
    assert not at.exception and "out of range" in at.error[0].value
    at.number_input(key="q").set_value(7).run()
    at.number_input(key="layer").set_value(9).run()
    assert not at.exception and "Head 9.2 is out of range" in at.error[0].value
    at.number_input(key="layer").set_value(1).run()
    at.text_area(key="prompt").set_value("   ").run()
    assert not at.exception and "empty" in at.error[0].value
    at.text_area(key="prompt").set_value("x" * 300).run()
    assert not at.exception and "301 tokens long" in at.error[0].value


def test_a_bad_sae_folder_is_an_error(tmp_path):
    at = app_test(PAGE, prompt="abcabcab", layer=1, head=2, q=7, k=3, sae=str(tmp_path / "nothing")).run()
    assert not at.exception and "No SAE folder" in at.error[0].value


def test_script_in_the_prompt_is_escaped_in_the_diagram():
    at = app_test(PAGE, prompt="<script>alert(1)</script>", layer=1, head=1, q=3, k=2).run()
    assert not at.exception and not at.error
    diagram = at.get("iframe")[0].proto.srcdoc
    assert "<script" not in diagram and "&lt;" in diagram


def test_induction_edge_on_smollm2(smollm2):
    """The default prompt repeats "Mr and Mrs Dursley": head 18.6 from the second " D" (24) to the token
    after the first " D", "urs" (5)."""
    at = app_test(PAGE, model="smollm2-135m", layer=18, head=6, q=24, k=5, timeout=300).run()
    assert not at.exception and not at.error
    score, total, attention = (float(m.value) for m in at.metric)
    assert abs(score - total) <= 1e-3 * abs(score) and attention > 0.9
    key_side = at.dataframe[1].value
    assert key_side.component.iloc[0].startswith("L16H")  # previous-token heads of layer 16 lead the key side


def test_dictionary_features_replace_the_key_side(tmp_path, tiny_llama):
    from headvis_core.attribution.sae import random_sae, save_sae

    folder = save_sae(tmp_path / "sae", **random_sae(tiny_llama.model, layer=1, d_sae=48))
    at = app_test(PAGE, prompt="abcabcab", layer=1, head=2, q=7, k=3, sae=str(folder), sae_side="key").run()
    assert not at.exception and not at.error
    score, total, _ = (float(m.value) for m in at.metric)
    assert abs(score - total) <= 1e-3 * max(1.0, abs(score))
    query_side, key_side = at.dataframe[0].value, at.dataframe[1].value
    assert key_side.component.str.startswith("F").any() and "error" in set(key_side.component)
    assert not query_side.component.str.startswith("F").any()


def test_with_no_head_chosen_the_page_opens_on_the_strongest_head_of_the_default_edge(tiny_llama):
    from headvis_core.lab.positions import induction_key
    from headvis_core.lab.prompt_lab import rank_heads_by_attention

    text = "abcd abcd"
    at = app_test(PAGE, prompt=text).run()
    assert not at.exception and not at.error
    tokens = tiny_llama.model.to_tokens(text)
    query = tokens.shape[1] - 1
    key = induction_key(tokens[0].tolist(), query)
    best = rank_heads_by_attention(tiny_llama.model, tokens, query, key).iloc[0]
    assert (at.number_input(key="layer").value, at.number_input(key="head").value) == (best.layer, best["head"])
    assert (at.number_input(key="q").value, at.number_input(key="k").value) == (query, key)
