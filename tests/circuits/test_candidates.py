"""Edges chosen for path patching (page and CLI) and their results beside the composition scores."""

import pandas as pd
import pytest

from headvis_core.circuits.candidates import patch_candidates, patched_edges_table
from headvis_core.circuits.graph import EMBED, LOGITS
from headvis_core.circuits.path_patching import Edge
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef

GRAPH_EDGES = pd.DataFrame({  # edges_frame order: strongest first
    "sender": ["0.1", EMBED, "0.2", "1.0", "0.3"],
    "receiver": ["1.2", "1.1", "1.3", LOGITS, "1.1"],
    "kinds": ["k,q", "q", "v,out", "out", "q"],
})


def test_head_to_head_kinds_in_order_without_embedding_logits_or_out():
    assert patch_candidates(GRAPH_EDGES, 10) == [
        Edge(HeadRef(0, 1), HeadRef(1, 2), "k"), Edge(HeadRef(0, 1), HeadRef(1, 2), "q"),
        Edge(HeadRef(0, 2), HeadRef(1, 3), "v"), Edge(HeadRef(0, 3), HeadRef(1, 1), "q")]
    assert patch_candidates(GRAPH_EDGES, 3)[-1] == Edge(HeadRef(0, 2), HeadRef(1, 3), "v")
    assert patch_candidates(GRAPH_EDGES.iloc[:0], 5) == []
    with pytest.raises(InputError, match="at least one edge"):
        patch_candidates(GRAPH_EDGES, 0)


def test_patched_edges_get_their_scores_largest_effect_first():
    patching = pd.DataFrame({"sender": ["0.1", "0.2"], "receiver": ["1.2", "1.3"], "kind": ["k", "v"],
                             "patched": [1.0, 2.0], "effect": [0.1, -0.5], "normalized": [0.2, -1.0]})
    composition = pd.DataFrame({"sender": ["0.1", "0.1", "0.2"], "receiver": ["1.2", "1.2", "1.3"],
                                "kind": ["k", "q", "v"], "score": [0.3, 0.2, 0.1], "ratio": [3.0, 2.0, 1.0],
                                "z": [9.0, 8.0, 7.0], "sender_layer": [0, 0, 0]})
    merged = patched_edges_table(patching, composition)
    assert merged.columns.tolist() == ["sender", "receiver", "kind", "patched", "effect", "normalized",
                                       "score", "ratio", "z"]
    assert merged[["sender", "kind", "effect", "ratio"]].values.tolist() == [["0.2", "v", -0.5, 1.0],
                                                                            ["0.1", "k", 0.1, 3.0]]
