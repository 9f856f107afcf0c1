"""What a HeadVis ``data/`` tree must hold: file names, keys and limits shared by export, import and validation.

The facts come from the HeadVis frontend (anthropics/headvis) as issue #11 records them:
``config.json`` needs ``n_intervals`` or the page renders nothing; the scatter's
default axes must name columns of ``scatter_data.json``; ``custom_tables`` and
``custom_plots`` must name keys of the head files and may not repeat a key; a
sequence's ``interval`` is a JSON integer in ``1..n_intervals`` (``n`` highest)
and its attention is a flat COO list (``q * seq_len + k``); the frontend always
requests ``server_config.json``, ``attributions/manifest.json`` and
``custom_sequences/L{l}H{h}.json``; NaN and Infinity are not JSON.
"""

import json
from pathlib import Path
from typing import Any

CONFIG = "config.json"
SCATTER = "scatter_data.json"
SERVER_CONFIG = "server_config.json"
HEADS_DIR = "heads"
UMAP_DIR = "umap"
UMAP_SEQUENCES = "sequences.json"
CUSTOM_DIR = "custom_sequences"
ATTRIBUTIONS_MANIFEST = "attributions/manifest.json"
HEAD_DATA_PATTERN = "L{layer}H{head}.json"

CONFIG_REQUIRED = ("model_name", "heads", "n_layers", "n_heads", "n_intervals", "metrics", "metric_descriptions",
                   "head_data_pattern", "has_umap", "umap_heads", "scatter", "custom_tables", "custom_plots")
SEQUENCE_REQUIRED = ("sequence_id", "interval", "tokens", "attention_indices", "attention_values", "seq_len",
                     "max_activation")
CUSTOM_INTERVAL = -1  # the interval of a custom sequence (and ``?interval=-1`` in a deep link)
VALUE_DECIMALS = 4  # attention values are rounded to this many decimals


def head_file_name(layer: int, head: int, pattern: str = HEAD_DATA_PATTERN) -> str:
    return pattern.replace("{layer}", str(int(layer))).replace("{head}", str(int(head)))


def dumps(obj: Any) -> str:
    """Compact JSON that refuses NaN and Infinity (``allow_nan=False``): the frontend's ``JSON.parse`` would fail."""
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def is_tree(path: Path) -> bool:
    """Whether ``path`` looks like a HeadVis ``data/`` tree (it has ``config.json`` and ``heads/``)."""
    path = Path(path)
    return (path / CONFIG).is_file() and (path / HEADS_DIR).is_dir()
