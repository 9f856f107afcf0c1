"""Vectors of chosen pairs run again, and "project this prompt": a typed prompt's pairs in a head's saved rotation."""

from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.hooks import capture
from headvis_core.models.loader import LoadedModel
from headvis_core.projections.pairs import (
    KINDS,
    attention_hooks,
    head_weights,
    kv_head,
    pair_norms,
    top_pairs,
    vectors_at,
)
from headvis_core.projections.store import HeadProjection
from headvis_core.tokens import tokenize_prompt

CONTEXT_TOKENS = 6
MAX_PROMPT_TOKENS = 512


def _head_activations(loaded: LoadedModel, tokens: torch.Tensor, head: HeadRef) -> dict[str, torch.Tensor]:
    pattern_name, q_name, k_name, v_name = attention_hooks(head.layer)
    _, cache = capture(loaded.model, tokens.to(loaded.info.device), attention_hooks(head.layer),
                       stop_at_layer=head.layer + 1)
    kv = kv_head(loaded.model, head.head)
    return {"pattern": cache[pattern_name][:, head.head].cpu(), "q": cache[q_name][:, :, head.head].cpu(),
            "k": cache[k_name][:, :, kv].cpu(), "v": cache[v_name][:, :, kv].cpu()}


def pair_vectors(loaded: LoadedModel, tokens: torch.Tensor, head: HeadRef, rows: np.ndarray, queries: np.ndarray,
                 keys: np.ndarray) -> dict[str, np.ndarray]:
    """Q, K, V and O (``d_model`` values) of the given pairs of ``tokens [window, pos]``, run again."""
    acts = _head_activations(loaded, tokens, head)
    index = [torch.from_numpy(np.array(x, np.int64)) for x in (rows, queries, keys)]
    return vectors_at(acts["pattern"], acts["q"], acts["k"], acts["v"], head_weights(loaded.model, head), *index)


def context_label(str_tokens: list[str], query: int, key: int, width: int = CONTEXT_TOKENS) -> str:
    """``... [key] ... [query]``: the pair in its context (plain text; figures escape it)."""
    lo = max(1, key - width)
    parts = []
    for i in range(lo, query + 1):
        if i > key + width and i < query - width:
            if parts[-1] != "\u2026":
                parts.append("\u2026")
            continue
        token = str_tokens[i]
        parts.append(f"[{token}]" if i in (query, key) else token)
    return ("\u2026" if lo > 1 else "") + "".join(parts)


def pairs_table(projection_coords: dict[str, np.ndarray], str_tokens_of: Any, rows: np.ndarray,
                queries: np.ndarray, keys: np.ndarray, norms: np.ndarray,
                weights: Optional[np.ndarray] = None) -> pd.DataFrame:
    """One row per pair: positions, tokens, distance, per-pair metrics, context, ``{kind}{component}`` coordinates.

    The metrics: ``norm`` = ``||A[q, k] v_k W_O||`` (the ranking key), ``weight`` = ``A[q, k]``, and
    ``value_norm`` = ``||v_k W_O||`` = ``norm / weight`` (what the key would write at full attention);
    ``weight`` and ``value_norm`` are NaN where ``weights`` is not given (projections stored before
    weights were kept).
    """
    table = pd.DataFrame({"row": rows, "query": queries, "key": keys, "distance": queries - keys, "norm": norms})
    if weights is None:
        table["weight"] = np.nan
        table["value_norm"] = np.nan
    else:
        weights = np.asarray(weights, np.float64)
        table["weight"] = weights
        # kept pairs have norm > 0, hence weight > 0; the guard only keeps a stray zero from dividing
        table["value_norm"] = np.divide(np.asarray(norms, np.float64), weights, out=np.full(len(weights), np.nan),
                                        where=weights > 0)
    tokens = [str_tokens_of(int(r)) for r in rows]
    table["query_token"] = [t[q] for t, q in zip(tokens, queries)]
    table["key_token"] = [t[k] for t, k in zip(tokens, keys)]
    table["context"] = [context_label(t, int(q), int(k)) for t, q, k in zip(tokens, queries, keys)]
    for kind, coords in projection_coords.items():
        for c in range(coords.shape[1]):
            table[f"{kind}{c}"] = coords[:, c]
    return table


def project_prompt(loaded: LoadedModel, projection: HeadProjection, text: str, n_pairs: int = 50) -> pd.DataFrame:
    """The ``n_pairs`` largest pairs of ``text`` for the projection's head, drawn with its saved rotation."""
    if n_pairs < 1:
        raise InputError("The number of pairs to project must be at least 1.")
    head = projection.head
    prompt = tokenize_prompt(loaded.model, text, max_tokens=min(MAX_PROMPT_TOKENS, int(loaded.model.cfg.n_ctx)))
    acts = _head_activations(loaded, prompt.tokens, head)
    w_o = head_weights(loaded.model, head)
    rows, queries, keys, norms = top_pairs(pair_norms(acts["pattern"], acts["v"], w_o), n_pairs)
    if not len(rows):
        raise InputError("This prompt has no (query, key) pair after its first token: type a longer prompt.")
    index = [torch.from_numpy(x.astype(np.int64)) for x in (rows, queries, keys)]
    vectors = vectors_at(acts["pattern"], acts["q"], acts["k"], acts["v"], w_o, *index)
    coords = {kind: projection.fits[kind].transform(vectors[kind]) for kind in KINDS}
    weights = acts["pattern"][index[0], index[1], index[2]].float().numpy()
    return pairs_table(coords, lambda _row: prompt.str_tokens, rows, queries, keys, norms, weights)


def stored_pairs_table(projection: HeadProjection, window_tokens: np.ndarray, decode: Any) -> pd.DataFrame:
    """The stored pairs of a head as :func:`pairs_table` rows (``decode``: token ids -> strings).

    Where the projections hold UMAP, its coordinates are the columns ``umap_{kind}{component}``.
    """
    cache: dict[int, list[str]] = {}

    def tokens_of(row: int) -> list[str]:
        if row not in cache:
            cache[row] = decode(window_tokens[row])
        return cache[row]

    coords = {**projection.coords, **{f"umap_{kind}": layout for kind, layout in projection.umap.items()}}
    table = pairs_table(coords, tokens_of, projection.rows, projection.queries, projection.keys, projection.norms,
                        projection.weights)
    table.insert(0, "window", projection.windows)
    return table
