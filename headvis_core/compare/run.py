"""Comparing two models (or two checkpoints) head by head, from their atlases on the same probe text.

:func:`compare_atlases` takes two :class:`~headvis_core.atlas.run.AtlasResult`
computed on the same probe source (the built-in prompts, or one folder of
text: each model reads the same text through its own tokenizer) and returns a
:class:`Comparison`: both tables, behaviour counts by relative depth
(:mod:`headvis_core.compare.depth`), the optimal one-to-one matching of heads
by metric profile with its outliers (:mod:`headvis_core.compare.matching`)
and, when both models have the same shape, per-head metric deltas and the
heads whose behaviour changed (:mod:`headvis_core.compare.deltas`).

:func:`compare_models` loads the two models one after the other, so only one
is in memory at a time (a comparison of two 1 GB models peaks at one).
"""

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from headvis_core.atlas.run import AtlasResult, compute_atlas
from headvis_core.compare.deltas import head_deltas, same_shape
from headvis_core.compare.depth import behaviour_by_depth
from headvis_core.compare.matching import HeadMatching, match_heads
from headvis_core.errors import InputError
from headvis_core.progress import ProgressCallback, report, scaled


@dataclass
class Comparison:
    name_a: str
    name_b: str
    atlas_a: AtlasResult
    atlas_b: AtlasResult
    depth: pd.DataFrame  # model, depth, behaviour, heads, share
    matching: HeadMatching
    deltas: Optional[pd.DataFrame]  # same shape only: one row per head

    @property
    def same_shape(self) -> bool:
        return self.deltas is not None

    @property
    def changed(self) -> pd.DataFrame:
        """Heads whose behaviour changed (same-shape comparisons; empty otherwise)."""
        if self.deltas is None:
            return pd.DataFrame()
        return self.deltas[self.deltas.changed].reset_index(drop=True)

    def heads_table(self) -> pd.DataFrame:
        """Both atlases stacked, with a ``model`` column (``A: name`` / ``B: name``)."""
        return pd.concat([self.atlas_a.table.assign(model=f"A: {self.name_a}"),
                          self.atlas_b.table.assign(model=f"B: {self.name_b}")], ignore_index=True)

    def summary(self) -> list[str]:
        """A few plain sentences on what the comparison shows."""
        lines = []
        for label, name, atlas in (("A", self.name_a, self.atlas_a), ("B", self.name_b, self.atlas_b)):
            counts = atlas.table.behaviour.value_counts()
            held = ", ".join(f"{behaviour} {count}" for behaviour, count in counts.items())
            lines.append(f"{label} = {name}: {atlas.n_layers} layers x {atlas.n_heads} heads; {held}.")
        pairs = self.matching.pairs
        same = int((pairs.behaviour_a == pairs.behaviour_b).sum())
        lines.append(f"{len(pairs)} heads paired by metric profile (median distance "
                     f"{pairs.distance.median():.3f}); {same} pairs share their main behaviour; "
                     f"{int(pairs.outlier.sum())} pairs are poor matches (distance > {self.matching.fence:.3f}).")
        if len(self.matching.unmatched):
            alone = self.matching.unmatched
            lines.append(f"{len(alone)} heads of the larger model are left unpaired, "
                         f"{int(alone.outlier.sum())} of them with no close counterpart in the other model.")
        if self.deltas is not None:
            lines.append(f"Same shape: {len(self.changed)} of {len(self.deltas)} heads changed behaviour or moved "
                         "a main metric by 0.2 or more.")
        return lines


def compare_atlases(atlas_a: AtlasResult, atlas_b: AtlasResult, name_a: str = "A",
                    name_b: str = "B") -> Comparison:
    """Compare two atlases computed on the same probe source."""
    if atlas_a.table.empty or atlas_b.table.empty:
        raise InputError("Both atlases need at least one head to compare.")
    depth = pd.concat([behaviour_by_depth(atlas_a.table, atlas_a.n_layers, f"A: {name_a}"),
                       behaviour_by_depth(atlas_b.table, atlas_b.n_layers, f"B: {name_b}")], ignore_index=True)
    matching = match_heads(atlas_a.table, atlas_b.table, atlas_a.n_layers, atlas_b.n_layers)
    deltas = head_deltas(atlas_a.table, atlas_b.table) if same_shape(atlas_a.table, atlas_b.table) else None
    return Comparison(name_a=name_a, name_b=name_b, atlas_a=atlas_a, atlas_b=atlas_b, depth=depth,
                      matching=matching, deltas=deltas)


def compare_models(load_a: Callable[[], object], load_b: Callable[[], object], name_a: str, name_b: str,
                   folder: Optional[str | Path] = None, n_seqs: int = 64, seq_len: int = 128, seed: int = 0,
                   progress: Optional[ProgressCallback] = None) -> Comparison:
    """Load A, measure its atlas, free it; then the same for B; then compare.

    ``load_a``/``load_b`` return a :class:`~headvis_core.models.loader.LoadedModel`
    (called one after the other, so the two models are never in memory together).
    """
    atlases = []
    for index, (load, name) in enumerate(((load_a, name_a), (load_b, name_b))):
        report(progress, 0.5 * index, f"loading {name}")
        loaded = load()
        atlases.append(compute_atlas(loaded.model, folder=folder, n_seqs=n_seqs, seq_len=seq_len, seed=seed,
                                     model_name=name, progress=scaled(progress, 0.5 * index + 0.05,
                                                                      0.5 * index + 0.5)))
        del loaded
        gc.collect()
    report(progress, 1.0, "comparing")
    return compare_atlases(atlases[0], atlases[1], name_a, name_b)
