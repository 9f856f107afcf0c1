import pandas as pd
import torch

from headvis_core.atlas.calibration import baseline_maxima, shuffled_heads_copy
from headvis_core.atlas.classes import RULES


def test_the_baseline_shuffles_attention_weights_only_and_leaves_the_model_alone(tiny_llama):
    model = tiny_llama.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    baseline = shuffled_heads_copy(model, seed=1)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name  # the shared model is untouched
    attention = {id(p) for block in baseline.blocks for p in block.attn.parameters()}
    changed = 0
    for name, parameter in baseline.named_parameters():
        original = before[name]
        if id(parameter) in attention:
            # same values, other places
            assert torch.equal(parameter.detach().flatten().sort().values, original.flatten().sort().values), name
            changed += not torch.equal(parameter, original)
        else:
            assert torch.equal(parameter, original), name
    assert changed >= 4 * model.cfg.n_layers  # q, k, v, o weights of every layer moved


def test_baseline_maxima_say_whether_each_threshold_clears_the_baseline():
    rows = {"induction": [0.1, 0.5], "previous_token": [0.2, 0.1], "duplicate_token": [0.1, 0.1],
            "direct_copying": [0.0, 0.05], "retrieval": [0.1, 0.2], "local_attention": [0.5, 0.3],
            "attention_sink": [0.2, 0.3]}
    table = baseline_maxima(pd.DataFrame(rows))
    assert list(table.behaviour) == [r.behaviour for r in RULES]
    by = table.set_index("behaviour")
    assert by.loc["induction", "baseline max"] == 0.5 and not by.loc["induction", "clears baseline"]
    assert by.loc["local/positional", "baseline max"] == 0.3 and by.loc["previous-token", "clears baseline"]
