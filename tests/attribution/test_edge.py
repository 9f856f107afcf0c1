"""Bad edges are refused with clear messages; the JSON has the issue's keys and component names."""

import json

import pytest

from headvis_core.attribution import EdgeSpec, attribute_edge, attribute_edges
from headvis_core.attribution.edge import attribution_link_for_window, save_json
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.models.loader import load_model

PROMPT = "The cat sat on the mat. The cat sat on"


@pytest.mark.parametrize("edge, message", [
    (EdgeSpec(HeadRef(1, 0), 3, 5), "comes after the query"),
    (EdgeSpec(HeadRef(1, 0), 99, 5), "query position 99 is out of range"),
    (EdgeSpec(HeadRef(1, 0), 5, -1), "key position -1 is out of range"),
    (EdgeSpec(HeadRef(2, 0), 5, 1), "Head 2.0 is out of range"),
    (EdgeSpec(HeadRef(1, 4), 5, 1), "Head 1.4 is out of range"),
])
def test_bad_edges_are_refused(tiny_llama, edge, message):
    tokens = tiny_llama.model.to_tokens(PROMPT)
    with pytest.raises(InputError, match=message):
        attribute_edges(tiny_llama.model, tokens, [edge])


def test_sliding_window_masked_keys_are_refused():
    model = load_model("tiny-gemma3", device="cpu").model
    tokens = model.to_tokens(PROMPT)
    with pytest.raises(InputError, match="sliding window"):
        attribute_edge(model, tokens, HeadRef(0, 1), 20, 5)
    attribute_edge(model, tokens, HeadRef(2, 1), 20, 5)  # layer 2 is global


def test_prompt_over_the_context_and_no_edges(tiny_llama):
    import torch

    model = tiny_llama.model
    with pytest.raises(InputError, match="context"):
        attribute_edge(model, torch.zeros(1, int(model.cfg.n_ctx) + 1, dtype=torch.long), HeadRef(0, 0), 1, 0)
    with pytest.raises(InputError, match="No edge"):
        attribute_edges(model, model.to_tokens(PROMPT), [])


def test_json_has_the_issue_keys(tiny_gpt2, tmp_path):
    model = tiny_gpt2.model
    tokens = model.to_tokens(PROMPT)
    result = attribute_edge(model, tokens, HeadRef(1, 3), 20, 4)
    data = json.loads(save_json(result, tmp_path / "edge.json").read_text(encoding="utf-8"))
    for key in ("tokens", "score", "qk_terms", "query_side", "key_side", "ov_value_side", "ov_top_tokens"):
        assert key in data
    assert data["tokens"][0] == "<|endoftext|>" and len(data["tokens"]) == tokens.shape[1]
    assert data["score"] == pytest.approx(sum(t["value"] for t in data["qk_terms"]), rel=1e-4, abs=1e-6)
    names = {row["component"] for row in data["key_side"]}
    assert {"embed", "pos_embed", "L0H0", "L0H1", "L0H2", "L0H3", "L0MLP", "bias"} == names
    assert len(data["qk_terms"]) == len(names) ** 2
    assert sum(r["value"] for r in data["ov_value_side"]) == pytest.approx(data["ov_norm"], rel=1e-6)
    assert set(data["ov_top_tokens"][0]) == {"token", "token_id", "logit"}
    kinds = {row["kind"]: row["value"] for row in data["key_by_kind"]}
    assert set(kinds) == {"token embedding", "position embedding", "attention heads", "MLPs", "biases"}
    assert sum(kinds.values()) == pytest.approx(data["score"], rel=1e-4, abs=1e-6)
    heads = sum(row["value"] for row in data["key_side"] if row["component"].startswith("L0H"))
    assert kinds["attention heads"] == pytest.approx(heads, abs=1e-9)


def test_a_window_links_to_its_edge_only_where_its_text_tokenizes_back_to_the_same_ids(tiny_llama):
    model = tiny_llama.model
    ids = model.to_tokens("abc abd")[0].tolist()
    edge = EdgeSpec(HeadRef(1, 2), 5, 2)
    link = attribution_link_for_window(model, ids, edge)
    assert link["query"] == {"prompt": "abc abd", "layer": 1, "head": 2, "q": 5, "k": 2}
    assert attribution_link_for_window(model, [ids[1]] + ids[1:], edge) is None  # no BOS at position 0
