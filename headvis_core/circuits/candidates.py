"""Which graph edges to check by path patching, and their results next to the composition scores.

The circuit graph ranks head-to-head edges by a weights-only composition score
(Elhage et al. 2021); path patching (Wang et al. 2022) then measures whether an
edge is used on prompts. Both the Circuit graph page and ``headvis graph
--patch-ioi`` patch the graph's strongest edges, chosen here.
"""

import pandas as pd

from headvis_core.circuits.composition import KINDS
from headvis_core.circuits.graph import EMBED, LOGITS
from headvis_core.circuits.path_patching import Edge
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef

# Columns of the composition edge table kept beside each patched edge.
SCORE_COLUMNS = ["score", "ratio", "z"]
EDGE_KEY = ["sender", "receiver", "kind"]


def patch_candidates(graph_edges: pd.DataFrame, limit: int) -> list[Edge]:
    """The first ``limit`` head-to-head edges of ``graph_edges``, one :class:`Edge` per Q/K/V kind.

    ``graph_edges`` is :func:`headvis_core.circuits.graph.edges_frame` of a graph (strongest
    first), whose ``kinds`` column holds ``"q,k"``-style lists. Edges from the embedding or to the
    logits, and the direct ``out`` kind, have no receiver input to patch and are skipped.
    """
    if limit < 1:
        raise InputError(f"Path-patch at least one edge (got {limit}).")
    if graph_edges.empty:
        return []
    candidates = []
    for sender, receiver, kinds in zip(graph_edges["sender"], graph_edges["receiver"], graph_edges["kinds"]):
        if sender == EMBED or receiver == LOGITS:
            continue
        for kind in str(kinds).split(","):
            if kind in KINDS:
                candidates.append(Edge(HeadRef.from_label(sender), HeadRef.from_label(receiver), kind))
    return candidates[:limit]


def patched_edges_table(patching: pd.DataFrame, composition_edges: pd.DataFrame) -> pd.DataFrame:
    """Path-patching results (``sender, receiver, kind, effect, ...``) with each edge's
    composition ``score, ratio, z`` beside them, largest absolute effect first."""
    scores = composition_edges[EDGE_KEY + SCORE_COLUMNS]
    merged = patching.merge(scores, on=EDGE_KEY, how="left")
    return merged.sort_values("effect", key=abs, ascending=False, kind="stable").reset_index(drop=True)
