"""Projections of a scan: each head's top pairs over the scan's stored windows, PCA per kind, stored with the scan.

Only the windows the scan kept (its decile sample and top windows, at most
``max_windows`` of them) are run again, in batches, capturing the pattern, Q,
K and V of the layers needed; each head keeps a running top ``max_pairs`` of
its pairs by ``||A[q, k] v_k W_O||`` (:mod:`.pairs`), holding ``A v`` (d_head
values) rather than O (d_model values). Memory therefore depends on the
parameters and the model, never on the corpus.

With ``umap=True`` each kind also gets a UMAP layout (:mod:`.umap_fit`, seeded
by ``seed``), stored beside the PCA coordinates as ``umap_{kind}``.
"""

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch

from headvis_core.errors import InputError
from headvis_core.heads import HeadRef, all_heads
from headvis_core.hooks import capture
from headvis_core.models.loader import LoadedModel
from headvis_core.progress import ProgressCallback, report
from headvis_core.projections.pairs import (
    KINDS,
    PairVectors,
    attention_hooks,
    head_weights,
    kv_head,
    merge_top,
    pair_norms,
    top_pairs_per_head,
    weighted_values,
)
from headvis_core.projections.pca import N_COMPONENTS, fit_pca
from headvis_core.projections.store import ProjectionSet, save_projections
from headvis_core.projections.umap_fit import fit_umap, require_umap
from headvis_core.scan.result import ScanResult


@dataclass(frozen=True)
class ProjectionParams:
    max_pairs: int = 1000  # pairs kept per head
    max_windows: int = 128  # scan windows run again
    n_components: int = N_COMPONENTS
    batch_size: int = 8
    umap: bool = False  # also a UMAP layout per kind (needs umap-learn)
    seed: int = 0  # UMAP's random_state

    def check(self) -> None:
        if self.umap:
            require_umap()
        for name in ("max_pairs", "max_windows", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be at least 1.")
        if not 2 <= self.n_components <= 3:
            raise InputError("The projections have 2 or 3 components.")
        if self.max_pairs <= self.n_components:
            raise InputError(f"PCA needs more pairs than components: keep at least {self.n_components + 1} pairs.")


def scan_windows(scan: ScanResult, max_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(window ids [W], token ids [W, seq_len])``: the decile sample first, then top windows rank by rank."""
    a = scan.arrays
    tokens_of: dict[int, np.ndarray] = {}
    valid = np.argwhere(a["ex_window"] >= 0)
    for index in valid[np.argsort(a["ex_window"][tuple(valid.T)], kind="stable")]:
        tokens_of.setdefault(int(a["ex_window"][tuple(index)]), a["ex_tokens"][tuple(index)])
    for rank in range(a["top_window"].shape[1]):
        for slot in range(a["top_window"].shape[0]):
            window = int(a["top_window"][slot, rank])
            if window >= 0:
                tokens_of.setdefault(window, a["top_tokens"][slot, rank])
    chosen = list(tokens_of)[:max_windows]
    if not chosen:
        raise InputError("The scan keeps no windows to project.")
    return np.array(chosen, np.int64), np.stack([tokens_of[w] for w in chosen]).astype(np.int64)


def _layer_pairs(model: Any, cache: dict[str, torch.Tensor], layer: int, heads: list[int], max_pairs: int,
                 row_offset: int) -> dict[int, PairVectors]:
    """The top pairs of the given heads of one layer in one batch, all heads at once."""
    pattern_name, q_name, k_name, v_name = attention_hooks(layer)
    index = torch.tensor(heads)
    kv_index = torch.tensor([kv_head(model, h) for h in heads])
    pattern = cache[pattern_name][:, index].cpu().float()  # [batch, head, query, key]
    q = cache[q_name][:, :, index].cpu().float()  # [batch, pos, head, d_head]
    k = cache[k_name][:, :, kv_index].cpu().float()
    v = cache[v_name][:, :, kv_index].cpu().float()
    w_o = model.blocks[layer].attn.W_O[index].detach().cpu().float()  # [head, d_head, d_model]
    found = top_pairs_per_head(pair_norms(pattern, v.transpose(1, 2), w_o), max_pairs)
    out = {}
    for i, head in enumerate(heads):
        rows, queries, keys, norms = found[i]
        r, qi, ki = (torch.from_numpy(x) for x in (rows, queries, keys))
        vectors = {"Q": q[r, qi, i].numpy(), "K": k[r, ki, i].numpy(), "V": v[r, ki, i].numpy(),
                   "O": weighted_values(pattern[:, i], v[:, :, i], r, qi, ki).numpy()}
        weights = pattern[r, i, qi, ki].numpy()
        out[head] = PairVectors(rows + row_offset, queries, keys, norms, weights, vectors)
    return out


def collect_pairs(loaded: LoadedModel, tokens: torch.Tensor, heads: list[HeadRef], max_pairs: int,
                  batch_size: int = 8, progress: Optional[ProgressCallback] = None) -> dict[HeadRef, PairVectors]:
    """Each head's top ``max_pairs`` pairs over ``tokens [window, pos]``; O is held as ``A v`` (see the docstring)."""
    model = loaded.model
    by_layer: dict[int, list[int]] = {}
    for head in heads:
        by_layer.setdefault(head.layer, []).append(head.head)
    layers = sorted(by_layer)
    names = [name for layer in layers for name in attention_hooks(layer)]
    kept: dict[HeadRef, Optional[PairVectors]] = {h: None for h in heads}
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size]
        _, cache = capture(model, batch.to(loaded.info.device), names, stop_at_layer=layers[-1] + 1)
        for layer in layers:
            for head, found in _layer_pairs(model, cache, layer, by_layer[layer], max_pairs, start).items():
                ref = HeadRef(layer, head)
                kept[ref] = merge_top(kept[ref], found, max_pairs)
        del cache
        report(progress, 0.8 * min(1.0, (start + len(batch)) / len(tokens)),
               f"{start + len(batch)}/{len(tokens)} windows")
    return {h: v for h, v in kept.items() if v is not None}


def _fit_heads(loaded: LoadedModel, pairs: dict[HeadRef, PairVectors], params: ProjectionParams,
               progress: Optional[ProgressCallback] = None) -> tuple[dict[str, list], dict[str, str]]:
    n_components = params.n_components
    columns: dict[str, list] = {name: [] for name in ("heads", "counts", "pair_row", "pair_query", "pair_key",
                                                      "pair_norm", "pair_weight")}
    for kind in KINDS:
        for prefix in ("coords", "mean", "components", "explained") + (("umap",) if params.umap else ()):
            columns[f"{prefix}_{kind}"] = []
    skipped: dict[str, str] = {}
    what = "PCA and UMAP" if params.umap else "PCA"
    for i, (head, found) in enumerate(pairs.items()):
        report(progress, 0.85 + 0.14 * i / len(pairs), f"{what} of head {head} ({i + 1}/{len(pairs)})")
        w_o = head_weights(loaded.model, head).double().numpy()
        vectors = {**found.vectors, "O": found.vectors["O"].astype(np.float64) @ w_o}
        try:
            fits = {kind: fit_pca(vectors[kind], n_components, f"head {head}'s {kind}") for kind in KINDS}
            layouts = {kind: fit_umap(vectors[kind], n_components, params.seed, f"head {head}'s {kind}")
                       for kind in KINDS} if params.umap else {}
        except InputError as err:
            skipped[str(head)] = str(err)
            continue
        columns["heads"].append([head.layer, head.head])
        columns["counts"].append(len(found.norms))
        for name, values in (("pair_row", found.rows), ("pair_query", found.queries), ("pair_key", found.keys),
                             ("pair_norm", found.norms), ("pair_weight", found.weights)):
            columns[name].append(values)
        for kind, fit in fits.items():
            columns[f"coords_{kind}"].append(fit.transform(vectors[kind]).astype(np.float32))
            columns[f"mean_{kind}"].append(fit.mean)
            columns[f"components_{kind}"].append(fit.components)
            columns[f"explained_{kind}"].append(fit.explained)
        for kind, layout in layouts.items():
            columns[f"umap_{kind}"].append(layout)
    return columns, skipped


def project_scan(loaded: LoadedModel, scan: ScanResult, params: ProjectionParams = ProjectionParams(),
                 heads: Optional[list[HeadRef]] = None, progress: Optional[ProgressCallback] = None,
                 save: bool = True) -> ProjectionSet:
    """Compute (and store with the scan) the PCA of every head's Q, K, V and O at its top pairs."""
    params.check()
    if (loaded.info.n_layers, loaded.info.n_heads) != (scan.n_layers, scan.n_heads):
        raise InputError(f"The scan was made with {scan.meta['model']['name']}, not {loaded.info.name}: "
                         "load that model to project it.")
    heads = heads or all_heads(scan.n_layers, scan.n_heads)
    for head in heads:
        head.check(scan.n_layers, scan.n_heads)
    windows, tokens = scan_windows(scan, params.max_windows)
    pairs = collect_pairs(loaded, torch.from_numpy(tokens), heads, params.max_pairs, params.batch_size, progress)
    skipped = {str(h): "the stored windows hold no (query, key) pair after position 0." for h in heads
               if h not in pairs}
    report(progress, 0.85, "fitting PCA" + (" and UMAP" if params.umap else "") + " per head and kind")
    columns, fit_skipped = _fit_heads(loaded, pairs, params, progress)
    skipped.update(fit_skipped)
    if not columns["heads"]:
        raise InputError("No head could be projected: " + "; ".join(f"{h}: {r}" for h, r in skipped.items()))
    arrays: dict[str, np.ndarray] = {
        "heads": np.array(columns.pop("heads"), np.int64),
        "offsets": np.concatenate([[0], np.cumsum(columns.pop("counts"))]).astype(np.int64),
        "window_ids": windows, "window_tokens": tokens,
    }
    for name, values in columns.items():
        joined = np.concatenate(values) if name.startswith(("pair_", "coords_", "umap_")) else np.stack(values)
        arrays[name] = joined
    meta: dict[str, Any] = {"model": loaded.info.name, "params": asdict(params), "skipped": skipped,
                            "hooks": "Q, K at hook_q/hook_k (before rotary), V at hook_v, O = A[q,k] v_k W_O"}
    projections = ProjectionSet(arrays, meta)
    if save and scan.path is not None:
        save_projections(scan.path, projections)
    report(progress, 1.0, f"{len(arrays['heads'])} heads projected")
    return projections
