"""Calibrating the behaviour thresholds against a baseline: the same model with its heads' weights shuffled.

A head "has" a behaviour only if its score is beyond what an attention layer with the same
weight statistics but no learned structure produces. The baseline keeps everything of the model
(embeddings, norms, MLPs, the values of every attention weight) and destroys what the attention
heads learned: each attention parameter tensor of every layer (Q, K, V, O projections, biases,
QK-norm gains) has its entries permuted at random. Running the atlas on that model gives, per
behaviour score, the distribution "no learned structure" produces; the calibrated threshold is

    threshold = max(floor, max over the baseline's heads of the score)

so no head of the baseline holds any behaviour, and the ``floor`` (the rule's former absolute
threshold, see :data:`headvis_core.atlas.classes.RULES`) keeps the threshold meaningful where
the baseline is flat. ``python -m headvis_core.atlas.calibration MODEL`` prints the baseline's
maxima and the class counts; the thresholds in :mod:`headvis_core.atlas.classes` were set from
that run on SmolLM2-135M (recorded in the rules' docstring).
"""

import copy
import sys
from typing import Any, Optional

import pandas as pd
import torch

from headvis_core.atlas.classes import classify_heads, rules_for
from headvis_core.atlas.run import AtlasResult, ProbeSet, run_atlas
from headvis_core.progress import ProgressCallback


def shuffled_heads_copy(model: Any, seed: int = 0) -> Any:
    """A deep copy of ``model`` whose attention parameters each have their entries randomly permuted."""
    baseline = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in baseline.blocks:
            for _, parameter in block.attn.named_parameters():
                flat = parameter.view(-1)
                flat.copy_(flat[torch.randperm(flat.numel(), generator=generator)])
    return baseline


def baseline_atlas(model: Any, probe: ProbeSet, seed: int = 0,
                   progress: Optional[ProgressCallback] = None, **kwargs: Any) -> AtlasResult:
    """The atlas of :func:`shuffled_heads_copy` of ``model`` on the same probe set."""
    return run_atlas(shuffled_heads_copy(model, seed), probe, seed=seed, progress=progress, **kwargs)


def baseline_maxima(baseline: pd.DataFrame, model_name: str = "") -> pd.DataFrame:
    """Per rule: the baseline's largest score, and the current threshold (is it above every baseline head?)."""
    rows = []
    for rule in rules_for(model_name):
        score = rule.score(baseline)
        rows.append({"behaviour": rule.behaviour, "score": rule.score_label, "baseline max": float(score.max()),
                     "baseline 99th pct": float(score.quantile(0.99)), "threshold": rule.threshold,
                     "clears baseline": bool(rule.threshold > score.max())})
    return pd.DataFrame(rows)


def main(argv: list[str]) -> int:
    from headvis_core.atlas.run import build_probe_set
    from headvis_core.models.loader import load_model

    name = argv[0] if argv else "smollm2-135m"
    folder = argv[1] if len(argv) > 1 else None
    model = load_model(name).model
    probe = build_probe_set(model, folder)
    real = run_atlas(model, probe, model_name=name)
    baseline = baseline_atlas(model, probe)
    print(baseline_maxima(baseline.table, name).to_string(index=False))
    print("classes, model:   ", classify_heads(real.table, name).behaviour.value_counts().to_dict())
    print("classes, baseline:", classify_heads(baseline.table, name).behaviour.value_counts().to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
