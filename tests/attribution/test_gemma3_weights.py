"""Gemma 3 with non-trivial norm weights and query_pre_attn_scalar != d_head, saved as an HF folder.

The ``tiny-gemma3`` preset keeps the initialiser's zero norm weights (gain 1 under Gemma's ``1 + w``)
and ``query_pre_attn_scalar = d_head``, so it cannot tell a wrong gain or a wrong scaling from the
right one. This model can: every norm (ln1, QK-norms, post-attention, final) gets random weights.
"""

import shutil

import pytest
import torch

from headvis_core.attribution import EdgeSpec, attribute_edges
from headvis_core.heads import HeadRef
from headvis_core.models.loader import load_model
from headvis_core.models.random_models import RANDOM_PRESETS, random_model_dir

PROMPT = "The cat sat on the mat. The cat sat on"


@pytest.fixture(scope="module")
def gemma3_weighted(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    preset = random_model_dir(RANDOM_PRESETS["tiny-gemma3"])
    folder = tmp_path_factory.mktemp("gemma3-weighted")
    config = AutoConfig.from_pretrained(preset)
    config.query_pre_attn_scalar = 7  # scaling 7**-0.5, not d_head**-0.5
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(folder)
    for file in preset.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, folder / file.name)
    return load_model(str(folder), device="cpu").model


def test_scores_are_exact_with_norm_weights_and_custom_scaling(gemma3_weighted):
    model = gemma3_weighted
    assert model.blocks[2].attn.original_component.scaling == pytest.approx(7 ** -0.5)
    tokens = model.to_tokens(PROMPT)
    edges = [EdgeSpec(HeadRef(layer, head), query, query - back) for layer in range(3) for head in range(4)
             for query in (12, 30) for back in (0, 3, 7)]
    results = attribute_edges(model, tokens, edges)
    scores = torch.tensor([r.score for r in results], dtype=torch.float64)
    sums = torch.tensor([r.qk.terms.sum().item() for r in results], dtype=torch.float64)
    torch.testing.assert_close(sums, scores, rtol=1e-4, atol=1e-6)
    assert scores.abs().max() > 0.1
    for r in results:
        assert r.qk.query.reconstruction_error < 1e-4
