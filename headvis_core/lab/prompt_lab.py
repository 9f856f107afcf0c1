"""One prompt, one forward pass: chosen heads' patterns, all heads ranked on a query/key pair, predictions.

Ranking every head by the attention it pays from one query token to one key
token is how HeadVis traces composition: a head that moves information from
``key`` to ``query`` shows up at the top. The pass hooks every layer's
``hook_pattern`` but keeps only the one entry ``[head]`` of the chosen
(query, key) pair, sliced inside the hook, so memory does not grow with the
number of layers or the square of the prompt length. The chosen heads keep
their top keys per query (for the token view) and a window of the dense
pattern (for the heatmap), also cut inside the hook.
"""


from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int

from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.hooks import capture, pattern_hook
from headvis_core.sparse_attention import SparseAttention, top_attended_keys


@dataclass
class PromptAnalysis:
    heads: list[HeadRef]
    windows: torch.Tensor  # [len(heads), window, window] dense patterns of positions start:stop
    window_start: int
    window_stop: int
    sparse: list[SparseAttention]  # per head: top keys (positions >= 1) of every query, and attention to 0
    pair_ranking: Optional[pd.DataFrame]  # layer, head, name, attention, rank (1 = most attention)
    predictions: pd.DataFrame  # rank, token, token_id, probability, logit


def check_pair(query_pos: int, key_pos: int, n_tokens: int) -> None:
    """A (query, key) pair must lie in the prompt with the key at or before the query (causal attention)."""
    for name, pos in (("query", query_pos), ("key", key_pos)):
        if not 0 <= pos < n_tokens:
            raise InputError(f"The {name} position {pos} is outside the prompt, which has positions 0-{n_tokens - 1}.")
    if key_pos > query_pos:
        raise InputError(f"A query can only attend to earlier tokens: key position {key_pos} comes after query "
                         f"position {query_pos}.")


def _pair_hooks(query_pos: int, key_pos: int, n_layers: int, store: dict[int, torch.Tensor]) -> list:
    def make(layer: int):
        def keep_pair(pattern: torch.Tensor, hook: Any) -> None:
            store[layer] = pattern[0, :, query_pos, key_pos].detach().float().cpu()  # [head]
        return keep_pair

    return [(pattern_hook(layer), make(layer)) for layer in range(n_layers)]


def _ranking_table(store: dict[int, torch.Tensor], n_layers: int) -> pd.DataFrame:
    values = torch.stack([store[layer] for layer in range(n_layers)])  # [layer, head]
    layers, heads = np.meshgrid(np.arange(values.shape[0]), np.arange(values.shape[1]), indexing="ij")
    table = pd.DataFrame({"layer": layers.ravel(), "head": heads.ravel(), "attention": values.numpy().ravel()})
    table.insert(2, "name", [f"{l}.{h}" for l, h in zip(table["layer"], table["head"])])
    table = table.sort_values(["attention", "layer", "head"], ascending=[False, True, True], kind="stable")
    table["rank"] = np.arange(1, len(table) + 1)
    return table.reset_index(drop=True)


def _predictions_table(model: Any, logits: torch.Tensor, k: int) -> pd.DataFrame:
    last = logits[0, -1].float()
    probs = torch.softmax(last, dim=-1)
    top = torch.topk(probs, min(k, probs.shape[-1]))
    ids = top.indices.tolist()
    return pd.DataFrame({"rank": np.arange(1, len(ids) + 1), "token": [model.tokenizer.decode([i]) for i in ids],
                         "token_id": ids, "probability": top.values.numpy(), "logit": last[top.indices].numpy()})


def _selected_hooks(heads: Sequence[HeadRef], start: int, stop: int, top_k: int,
                    windows: dict[HeadRef, torch.Tensor], sparse: dict[HeadRef, SparseAttention]) -> list:
    by_layer: dict[int, list[HeadRef]] = {}
    for head in heads:
        by_layer.setdefault(head.layer, []).append(head)

    def make(layer_heads: list[HeadRef]):
        def keep_heads(pattern: torch.Tensor, hook: Any) -> None:
            for head in layer_heads:
                p = pattern[0, head.head].detach().float()  # [query, key]
                windows[head] = p[start:stop, start:stop].cpu()
                keys, values, first = top_attended_keys(p, top_k)
                sparse[head] = SparseAttention(keys=keys.cpu().numpy(), values=values.cpu().numpy(),
                                               first=first.cpu().numpy())
        return keep_heads

    return [(pattern_hook(layer), make(layer_heads)) for layer, layer_heads in by_layer.items()]


def analyse_prompt(model: Any, tokens: Int[torch.Tensor, "1 pos"], heads: Sequence[HeadRef],
                   query_pos: Optional[int] = None,
                   key_pos: Optional[int] = None, n_predictions: int = 10, top_k: int = 8,
                   window: Optional[tuple[int, int]] = None) -> PromptAnalysis:
    """Everything the prompt lab shows for ``tokens [1, pos]``, from one forward pass.

    Args:
        heads: heads whose patterns are shown.
        query_pos, key_pos: the pair to rank all heads on (both or neither).
        top_k: keys kept per query for the token view.
        window: ``(start, stop)`` positions of the dense pattern kept for the heatmap (default: all).
    """
    n_tokens = int(tokens.shape[-1])
    n_layers = int(model.cfg.n_layers)
    start, stop = window if window is not None else (0, n_tokens)
    start, stop = max(0, int(start)), min(n_tokens, int(stop))
    if stop <= start:
        raise InputError(f"The window {start}-{stop} holds no tokens.")
    pair_store: dict[int, torch.Tensor] = {}
    hooks = []
    if query_pos is not None and key_pos is not None:
        check_pair(query_pos, key_pos, n_tokens)
        hooks += _pair_hooks(query_pos, key_pos, n_layers, pair_store)
    windows: dict[HeadRef, torch.Tensor] = {}
    sparse: dict[HeadRef, SparseAttention] = {}
    hooks += _selected_hooks(heads, start, stop, top_k, windows, sparse)
    logits, _ = capture(model, tokens, [], fwd_hooks=hooks)
    stacked = torch.stack([windows[h] for h in heads]) if heads else torch.zeros(0, stop - start, stop - start)
    return PromptAnalysis(heads=list(heads), windows=stacked, window_start=start, window_stop=stop,
                          sparse=[sparse[h] for h in heads],
                          pair_ranking=_ranking_table(pair_store, n_layers) if pair_store else None,
                          predictions=_predictions_table(model, logits, n_predictions))


def rank_heads_by_attention(model: Any, tokens: Int[torch.Tensor, "1 pos"], query_pos: int,
                            key_pos: int) -> pd.DataFrame:
    """All heads ranked by the attention ``pattern[query_pos, key_pos]`` they pay on ``tokens [1, pos]``.

    One pass; every layer's hook keeps only the ``[head]`` entries of the pair.
    Columns: layer, head, name, attention, rank.
    """
    n_tokens = int(tokens.shape[-1])
    check_pair(query_pos, key_pos, n_tokens)
    n_layers = int(model.cfg.n_layers)
    store: dict[int, torch.Tensor] = {}
    capture(model, tokens, [], fwd_hooks=_pair_hooks(query_pos, key_pos, n_layers, store),
            stop_at_layer=n_layers)
    return _ranking_table(store, n_layers)


def top_predictions(model: Any, tokens: Int[torch.Tensor, "1 pos"], k: int = 10) -> pd.DataFrame:
    """The model's ``k`` most likely next tokens after ``tokens [1, pos]``, with probabilities."""
    logits, _ = capture(model, tokens, [])
    return _predictions_table(model, logits, k)
