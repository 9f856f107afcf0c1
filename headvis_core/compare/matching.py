"""Matching heads across two models by their metric profiles.

Each head is a vector of atlas metrics (:data:`MATCH_METRICS`: the metrics
whose values are comparable across models and share one scale: fractions of
attention in [0, 1], normalised entropy, and the OV copying score in [-1, 1].
Left out: distances counted in tokens (two tokenizers cut the same text into
different numbers of tokens), pre-softmax score statistics (in logit units,
which differ between models) and token entropies in bits; on one scale with
the fractions they would decide the matching alone). The distance between two heads is the
Euclidean distance between their vectors; an undefined metric (NaN, e.g.
duplicate-token on text with no repeats) counts as 0 in both models.

Heads are paired one to one by the assignment that minimises the summed
distance (the Hungarian method, ``scipy.optimize.linear_sum_assignment``;
Kuhn 1955), so ``min(n_a, n_b)`` pairs are made. Outliers are:

* pairs whose distance is past Tukey's fence ``Q3 + 1.5 IQR`` of all pair
  distances (the best partner available is still far: a poor match);
* heads of the larger model left without a partner whose distance to the
  nearest head of the other model is past the same fence (no head of the
  other model behaves like them). The other unpaired heads have a close
  counterpart that was used by a better pair.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from headvis_core.atlas.run import COMPARABLE_METRICS
from headvis_core.compare.depth import relative_depth

MATCH_METRICS = COMPARABLE_METRICS


@dataclass
class HeadMatching:
    pairs: pd.DataFrame  # layer_a, head_a, layer_b, head_b, depths, behaviours, distance, outlier, metric columns
    unmatched: pd.DataFrame  # model, layer, head, depth, behaviour, nearest (head of the other model), distance
    fence: float  # the outlier distance threshold

    @property
    def outliers(self) -> pd.DataFrame:
        """The poorly matched pairs, then the unpaired heads with nothing close in the other model."""
        return pd.concat([self.pairs[self.pairs.outlier].assign(kind="poor match"),
                          self.unmatched[self.unmatched.outlier].assign(kind="no counterpart")],
                         ignore_index=True)


def profiles(table: pd.DataFrame, metrics: tuple[str, ...] = MATCH_METRICS) -> np.ndarray:
    """``[head, metric]`` profile matrix, NaN as 0, rows in the table's order."""
    return np.nan_to_num(table[list(metrics)].to_numpy(dtype=float), nan=0.0)


def tukey_fence(distances: np.ndarray) -> float:
    """``Q3 + 1.5 IQR`` (Tukey 1977); +inf with no distances."""
    if len(distances) == 0:
        return float("inf")
    q1, q3 = np.percentile(distances, [25, 75])
    return float(q3 + 1.5 * (q3 - q1))


def _label(table: pd.DataFrame, index: int) -> str:
    row = table.iloc[index]
    return f"{int(row['layer'])}.{int(row['head'])}"


def match_heads(table_a: pd.DataFrame, table_b: pd.DataFrame, n_layers_a: int, n_layers_b: int,
                metrics: tuple[str, ...] = MATCH_METRICS) -> HeadMatching:
    """Pair the heads of two atlases one to one by the minimum-total-distance assignment."""
    table_a, table_b = table_a.reset_index(drop=True), table_b.reset_index(drop=True)
    distance = cdist(profiles(table_a, metrics), profiles(table_b, metrics))
    rows, cols = linear_sum_assignment(distance)
    pair_distance = distance[rows, cols]
    fence = tukey_fence(pair_distance)
    depth_a = relative_depth(table_a["layer"], n_layers_a)
    depth_b = relative_depth(table_b["layer"], n_layers_b)
    pairs = pd.DataFrame({
        "layer_a": table_a["layer"].to_numpy()[rows], "head_a": table_a["head"].to_numpy()[rows],
        "layer_b": table_b["layer"].to_numpy()[cols], "head_b": table_b["head"].to_numpy()[cols],
        "depth_a": depth_a[rows], "depth_b": depth_b[cols],
        "behaviour_a": table_a["behaviour"].to_numpy()[rows], "behaviour_b": table_b["behaviour"].to_numpy()[cols],
        "distance": pair_distance, "outlier": pair_distance > fence,
    })
    for metric in metrics:
        pairs[f"{metric}_a"] = table_a[metric].to_numpy()[rows]
        pairs[f"{metric}_b"] = table_b[metric].to_numpy()[cols]
    pairs = pairs.sort_values("distance").reset_index(drop=True)

    unmatched_rows = []
    for model, table, depth, used, axis in (("A", table_a, depth_a, set(rows), 1),
                                            ("B", table_b, depth_b, set(cols), 0)):
        other = table_b if model == "A" else table_a
        for index in range(len(table)):
            if index in used:
                continue
            to_other = distance[index] if axis == 1 else distance[:, index]
            nearest = int(np.argmin(to_other))
            unmatched_rows.append({"model": model, "layer": int(table.at[index, "layer"]),
                                   "head": int(table.at[index, "head"]), "depth": float(depth[index]),
                                   "behaviour": table.at[index, "behaviour"], "nearest": _label(other, nearest),
                                   "distance": float(to_other[nearest]),
                                   "outlier": bool(to_other[nearest] > fence)})
    columns = ["model", "layer", "head", "depth", "behaviour", "nearest", "distance", "outlier"]
    unmatched = pd.DataFrame(unmatched_rows, columns=columns).sort_values("distance", ascending=False)
    return HeadMatching(pairs=pairs, unmatched=unmatched.reset_index(drop=True), fence=fence)
