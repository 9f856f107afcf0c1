"""Per-head metric changes between two checkpoints of one architecture (same layers x heads).

For every head and metric, ``delta = B - A``. A head has *changed* when its
main behaviour differs between the two, or when any metric of
:data:`CHANGE_METRICS` moved by at least :data:`CHANGE_THRESHOLD` (metrics
in [0, 1]: 0.2 is a fifth of the whole range).
"""

import numpy as np
import pandas as pd

from headvis_core.atlas.run import MAIN_METRICS, METRIC_COLUMNS
from headvis_core.errors import InputError

CHANGE_THRESHOLD = 0.2
CHANGE_METRICS = MAIN_METRICS


def same_shape(table_a: pd.DataFrame, table_b: pd.DataFrame) -> bool:
    """Whether both atlases hold exactly the same (layer, head) grid."""
    return table_a[["layer", "head"]].sort_values(["layer", "head"]).to_numpy().tolist() == \
        table_b[["layer", "head"]].sort_values(["layer", "head"]).to_numpy().tolist()


def head_deltas(table_a: pd.DataFrame, table_b: pd.DataFrame,
                threshold: float = CHANGE_THRESHOLD) -> pd.DataFrame:
    """One row per head: ``layer, head, behaviour_a, behaviour_b, <metric>_delta..., largest_change,
    largest_delta, changed``."""
    if not same_shape(table_a, table_b):
        raise InputError("Per-head deltas need two models of the same shape (same layers x heads).")
    merged = table_a.merge(table_b, on=["layer", "head"], suffixes=("_a", "_b")).sort_values(["layer", "head"])
    out = merged[["layer", "head", "behaviour_a", "behaviour_b"]].reset_index(drop=True)
    for metric in METRIC_COLUMNS:
        out[f"{metric}_delta"] = (merged[f"{metric}_b"] - merged[f"{metric}_a"]).to_numpy()
    moves = out[[f"{m}_delta" for m in CHANGE_METRICS]].abs().fillna(0.0).to_numpy()
    largest = moves.argmax(axis=1)
    out["largest_change"] = [CHANGE_METRICS[i] for i in largest]
    out["largest_delta"] = out[[f"{m}_delta" for m in CHANGE_METRICS]].to_numpy()[np.arange(len(out)), largest]
    out["changed"] = (out.behaviour_a != out.behaviour_b) | (moves.max(axis=1) >= threshold)
    return out


def delta_grid(deltas: pd.DataFrame, metric: str, n_layers: int, n_heads: int) -> np.ndarray:
    """``[layer, head]`` array of one metric's delta."""
    if f"{metric}_delta" not in deltas.columns:
        raise InputError(f"No metric called {metric!r}; there are: {', '.join(METRIC_COLUMNS)}.")
    grid = np.full((n_layers, n_heads), np.nan)
    grid[deltas.layer.to_numpy(), deltas["head"].to_numpy()] = deltas[f"{metric}_delta"].to_numpy()
    return grid
