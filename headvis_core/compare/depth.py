"""Behaviour counts by relative depth: where in the stack each kind of head sits.

A head in layer ``l`` of an ``L``-layer model sits at relative depth
``(l + 0.5) / L`` (the middle of its layer, in (0, 1)), so models of
different depths line up: 0 is the embedding end, 1 the unembedding end.
Depths are cut into :data:`N_DEPTH_BINS` equal bins; each bin reports how
many heads hold each main behaviour and what share of the model's heads in
that bin that is (models differ in heads per layer).
"""

import numpy as np
import pandas as pd

from headvis_core.atlas.classes import BEHAVIOURS, UNCLASSIFIED

N_DEPTH_BINS = 5
ALL_BEHAVIOURS = BEHAVIOURS + (UNCLASSIFIED,)


def relative_depth(layers: np.ndarray | pd.Series, n_layers: int) -> np.ndarray:
    """``(layer + 0.5) / n_layers`` for each layer index."""
    return (np.asarray(layers, dtype=float) + 0.5) / float(n_layers)


def depth_bin_labels(n_bins: int = N_DEPTH_BINS) -> list[str]:
    edges = np.linspace(0, 100, n_bins + 1)
    return [f"{edges[i]:.0f}-{edges[i + 1]:.0f}%" for i in range(n_bins)]


def depth_bins(layers: np.ndarray | pd.Series, n_layers: int, n_bins: int = N_DEPTH_BINS) -> np.ndarray:
    """The bin index (0 = shallowest) of each layer's relative depth."""
    return np.minimum((relative_depth(layers, n_layers) * n_bins).astype(int), n_bins - 1)


def behaviour_by_depth(table: pd.DataFrame, n_layers: int, model: str,
                       n_bins: int = N_DEPTH_BINS) -> pd.DataFrame:
    """One row per (depth bin, behaviour): ``model, depth, behaviour, heads, share``.

    ``share`` is ``heads`` over the number of the model's heads in that bin (0 where the bin is empty,
    which happens when a model has fewer layers than bins).
    """
    labels = depth_bin_labels(n_bins)
    bins = depth_bins(table["layer"].to_numpy(), n_layers, n_bins)
    rows = []
    for index, label in enumerate(labels):
        in_bin = table[bins == index]
        counts = in_bin["behaviour"].value_counts()
        for behaviour in ALL_BEHAVIOURS:
            heads = int(counts.get(behaviour, 0))
            rows.append({"model": model, "depth": label, "behaviour": behaviour, "heads": heads,
                         "share": heads / len(in_bin) if len(in_bin) else 0.0})
    return pd.DataFrame(rows)
