"""Stored projections in HeadVis's ``umap/`` shape (the PCA view of its frontend).

``umap/sequences.json`` lists the windows' tokens (one list of strings per
window); ``umap/L{l}H{h}.json`` holds, per pair, ``seq_idx`` (index into that
list), ``top_q``/``top_k`` (positions), ``norms`` (``||A[q,k] v_k W_O||``) and
``pca: {Q, K, O, V: {d0, d1, d2}}``, with ``clusters: []``. Only where the
projections hold UMAP too is there a ``views`` key, one entry per method in
the same shape: ``views: {pca: {Q, K, O, V: ...}, umap: {Q, K, O, V: ...}}``
(issue #11: omit ``views`` when there is only PCA).
"""

from typing import Any

import numpy as np

from headvis_core.heads import HeadRef
from headvis_core.projections.pairs import KINDS
from headvis_core.projections.store import ProjectionSet


def _coords(values: np.ndarray) -> dict[str, list[float]]:
    padded = np.zeros((len(values), 3), np.float64)
    padded[:, :values.shape[1]] = values
    return {f"d{c}": np.round(padded[:, c], 5).tolist() for c in range(3)}


def umap_records(projections: ProjectionSet, scan: Any, clusters_of: Any = None,
                 ) -> tuple[list[list[str]], dict[HeadRef, dict[str, Any]]]:
    """``(sequences, {head: record})`` for ``umap/`` (``scan`` decodes token ids: ``scan.token_strings``).

    ``clusters_of(head)`` gives the head's named clusters (``{"name", "indices"}``); none by default.
    """
    sequences = [scan.token_strings(row) for row in projections.arrays["window_tokens"]]
    records = {}
    for head in projections.heads:
        p = projections.head(head)
        records[head] = {"seq_idx": p.rows.astype(int).tolist(), "top_q": p.queries.astype(int).tolist(),
                         "top_k": p.keys.astype(int).tolist(),
                         "norms": np.round(p.norms.astype(np.float64), 5).tolist(),
                         "pca": {kind: _coords(p.coords[kind]) for kind in ("Q", "K", "O", "V") if kind in KINDS},
                         "clusters": list(clusters_of(head)) if clusters_of else []}
        if p.umap:
            records[head]["views"] = {"pca": records[head]["pca"],
                                      "umap": {kind: _coords(p.umap[kind]) for kind in ("Q", "K", "O", "V")
                                               if kind in KINDS}}
    return sequences, records
