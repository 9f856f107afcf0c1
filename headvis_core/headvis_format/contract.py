"""What a HeadVis ``data/`` tree must hold: file names, keys and limits shared by export, import and validation.

The facts come from reading the HeadVis frontend's source (anthropics/headvis:
``App.svelte``, ``lib/data.js``, ``lib/sparse.js``, ``lib/customSequences.js``,
``lib/attributions.js`` and the Sidebar, ScatterPlot, SequencesTab, Example,
MetricsTab, TokenRankTable, HelpTab and UmapView components). In static mode the frontend
fetches, relative to the page:

==================================  ===========================================  ==================================
file                                what it reads                                when it is missing or wrong
==================================  ===========================================  ==================================
``config.json``                     ``heads`` [[l, h]] (first head, navigation),  the page shows only an error
                                    ``n_intervals`` (first interval shown;
                                    sequences are filtered by
                                    ``interval === selected``), optional
                                    ``head_data_pattern`` (only the first
                                    ``{layer}``/``{head}`` is replaced),
                                    ``has_umap``/``umap_heads``, ``model_name``,
                                    ``metric_descriptions``, ``custom_tables``
                                    and ``custom_plots`` ([{key, label}], each
                                    list keyed: a repeated key crashes it),
                                    ``statistics_display``, ``scatter``
                                    ``{default_x, default_y, default_color,
                                    discrete_axes}`` (none: layer against
                                    head), ``dimensions`` (point labels)
``server_config.json``              ``{}`` (or no ``server_url``): static         missing: a failed fetch in the
                                                                                 console, static mode
``attributions/manifest.json``      ``{"L{l}H{h}S{sequence_id}": {qk: [[q, k]],   missing: ``{}`` and a failed
                                    ov: [[q, k]]}}``; ``entry.qk.length`` and     fetch; an entry without both
                                    ``entry.ov.length`` are read directly         lists crashes a sequence's view
``scatter_data.json``               rows ``{layer, head, <metric>...}``; the      missing: the page shows only an
                                    axis menus list the first row's keys whose    error; a default axis that is
                                    value is a number (a ``null`` there drops     no column: an empty plot
                                    the column); a clicked point and a head's
                                    metrics are found by ``layer`` and ``head``
``custom_sequences/L{l}H{h}.json``  ``{"sequences": [...]}`` (always this name)   missing: none, and a failed fetch
``heads/<head_data_pattern>``       ``{"sequences": [...]}`` (or a bare list),     missing: no sequences and an
                                    the ``custom_tables`` keys ([{token,          error in the console; a weight or
                                    weight}]), the ``custom_plots`` keys          ``max_activation`` that is not a
                                    ({bin_edges, bin_values}), optional           number crashes the view
                                    ``histogram`` and ``statistics``
``umap/L{l}H{h}.json``              on the UMAP tab: ``seq_idx``, ``top_q``,      the tab shows an error
                                    ``top_k``, ``norms`` (rank colouring),
                                    ``pca``/``embeddings`` ({R, O, V, Q, K: {d0,
                                    d1, d2}}), ``views`` (a list of {embeddings,
                                    n_neighbors, min_dist}), ``clusters``
                                    ([{name, points: [[seq_idx, q, k]]}])
``umap/sequences.json``             token lists indexed by ``seq_idx``            the tab shows an error
==================================  ===========================================  ==================================

A sequence is ``{sequence_id, interval, tokens, attention_indices,
attention_values, seq_len, max_activation}``: the attention is a flat COO list
(``q * seq_len + k``); ``max_activation`` is printed with ``toFixed`` and
normalises the colours of all the head's sequences. A custom sequence has the
same keys (``interval`` is optional); by convention its id is a string
starting with ``c``: a deep link ``?seq=`` whose id starts with ``c`` is looked
up among the custom sequences, any other among the dataset ones first. NaN and
Infinity are not JSON: ``JSON.parse`` refuses the whole file.
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
HEAD_DATA_PATTERN = "L{layer}H{head}.json"  # also the fixed name of custom_sequences/ and umap/ files

CONFIG_REQUIRED = ("heads", "n_intervals")  # what the frontend cannot do without
SEQUENCE_REQUIRED = ("sequence_id", "interval", "tokens", "attention_indices", "attention_values", "seq_len",
                     "max_activation")
CUSTOM_SEQUENCE_REQUIRED = tuple(key for key in SEQUENCE_REQUIRED if key != "interval")
MAX_INTERVALS = 100  # a tree's n_intervals is shown as one control option each and looped over: a sane bound
CUSTOM_INTERVAL = -1  # the interval of a custom sequence (and ``?interval=-1`` in a deep link)
CUSTOM_ID_PREFIX = "c"  # the frontend treats a sequence id starting with it as a custom sequence's
VALUE_DECIMALS = 4  # attention values are rounded to this many decimals
PROJECTION_KINDS = ("R", "O", "V", "Q", "K")  # the UMAP tab's panels, where present
TOKEN_TABLES = ("top_query_tokens", "top_key_tokens")  # head-file tables this project writes and names
DISTANCE_PLOT = "qk_distance_histogram"
ACTIVATION_HISTOGRAM = "histogram"  # the Metrics tab's "Max Activation Distribution" over all windows


def head_file_name(layer: int, head: int, pattern: str = HEAD_DATA_PATTERN) -> str:
    """The file of a head, as the frontend names it (only the first ``{layer}`` and ``{head}`` are replaced)."""
    return pattern.replace("{layer}", str(int(layer)), 1).replace("{head}", str(int(head)), 1)


def head_pattern_problem(pattern: Any) -> str | None:
    """Why ``pattern`` is no usable ``head_data_pattern`` (``None``: it is one).

    It must be a plain file name inside ``heads/`` holding ``{layer}`` and ``{head}``: a ``/``, ``\\``, ``..``
    or NUL would let a tree name files outside itself (a drive letter's ``:`` too, on Windows).
    """
    if not isinstance(pattern, str):
        return f"{pattern!r} must be a string containing {{layer}} and {{head}}"
    if "{layer}" not in pattern or "{head}" not in pattern:
        return f"{pattern!r} must contain {{layer}} and {{head}}"
    if any(part in pattern for part in ("/", "\\", "..", "\x00", ":")):
        return (f"{pattern!r} must be a plain file name inside {HEADS_DIR}/ (no '/', '\\', '..' or ':'): a tree "
                "names no files outside itself")
    return None


def custom_sequence_id(sequence_id: Any) -> str:
    """A custom sequence's id as the frontend expects it (``7`` -> ``"c7"``; ``"c7"`` stays)."""
    text = str(sequence_id)
    return text if text.startswith(CUSTOM_ID_PREFIX) else f"{CUSTOM_ID_PREFIX}{text}"


def dumps(obj: Any) -> str:
    """Compact JSON that refuses NaN and Infinity (``allow_nan=False``): the frontend's ``JSON.parse`` would fail."""
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def is_tree(path: Path) -> bool:
    """Whether ``path`` looks like a HeadVis ``data/`` tree (it has ``config.json`` and ``heads/``)."""
    path = Path(path)
    return (path / CONFIG).is_file() and (path / HEADS_DIR).is_dir()
