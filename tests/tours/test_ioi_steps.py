"""The IOI tour's own computations against slow references: the direct effect of every head equals patching
its write into the final residual stream in a full hooked run, and the attribution estimate of edges into a
head's queries equals a per-edge autograd slope."""

import numpy as np
import pytest
import torch

from headvis_core import hooks
from headvis_core.ablation.estimate import estimate_query_edges
from headvis_core.atlas.copying import copying_scores
from headvis_core.atlas.run import compute_atlas
from headvis_core.data.prompt_pairs import prompts_from_texts
from headvis_core.heads import HeadRef
from headvis_core.tours.ioi import atlas_role_metrics, direct_effects

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When Anna and Fred went to the store, Fred gave a drink to"]
CORRUPT = ["When Mary and John went to the store, Kate gave a drink to",
           "When Anna and Fred went to the store, Mike gave a drink to"]


def _pairs(model):
    return prompts_from_texts(model, CLEAN, targets=["M", "A"], alternatives=["J", "F"], corrupted=CORRUPT)


def _mean_ld(logits, pairs):
    padded = pairs.padded()
    rows = torch.arange(padded.n_prompts)
    final = logits[rows, padded.last].float()
    return float((final[rows, padded.answer] - final[rows, padded.alternative]).mean())


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_direct_effect_equals_patching_the_final_residual_stream(name, request):
    model = request.getfixturevalue(name.replace("-", "_")).model
    pairs = _pairs(model)
    padded = pairs.padded()
    effects = direct_effects(model, pairs)
    n_layers = model.cfg.n_layers
    _, corrupted = hooks.capture(model, padded.corrupted, [hooks.z_hook(l) for l in range(n_layers)])
    _, clean = hooks.capture(model, padded.clean, [hooks.z_hook(l) for l in range(n_layers)])
    base = _mean_ld(hooks.forward(model, padded.clean), pairs)
    for head in (HeadRef(0, 1), HeadRef(n_layers - 1, 0)):
        name_z = hooks.z_hook(head.layer)
        write = (corrupted[name_z] - clean[name_z])[:, :, head.head] @ model.blocks[head.layer].attn.W_O[head.head]

        def add_write(resid, hook, write=write):
            resid = resid.clone()
            resid[torch.arange(padded.n_prompts), padded.last] += write[torch.arange(padded.n_prompts),
                                                                       padded.last]
            return resid

        logits = hooks.run_with_hooks(model, padded.clean, [(f"blocks.{n_layers - 1}.hook_resid_post", add_write)])
        assert effects[head.layer, head.head] == pytest.approx(_mean_ld(logits, pairs) - base, rel=1e-4, abs=1e-5)


def _edge_slope(model, pairs, corrupted_z, sender, receiver):
    """d LD / d eps with eps times the sender's corrupted-minus-clean write added to the receiver's query
    input only (the slow reference: one autograd pass per edge)."""
    padded = pairs.padded()
    epsilon = torch.zeros((), requires_grad=True)
    clean_z = {}

    def keep(z, hook):
        clean_z["z"] = z.detach()

    def add(fork, hook):
        dz = corrupted_z[:, :, sender.head] - clean_z["z"][:, :, sender.head]
        write = dz @ model.blocks[sender.layer].attn.W_O[sender.head]
        fork = fork.clone()
        fork[:, :, receiver.head] = fork[:, :, receiver.head] + epsilon * write
        return fork

    saved = model.cfg.use_split_qkv_input
    with hooks.model_lock(model), torch.enable_grad():
        try:
            model.set_use_split_qkv_input(True)
            logits = model.run_with_hooks(padded.clean, fwd_hooks=[
                (hooks.z_hook(sender.layer), keep), (f"blocks.{receiver.layer}.attn.hook_q_input", add)])
            (slope,) = torch.autograd.grad(_ld_tensor(logits, padded), epsilon)
        finally:
            model.reset_hooks(including_permanent=False)
            model.set_use_split_qkv_input(saved)
    return float(slope)


def _ld_tensor(logits, padded):
    rows = torch.arange(padded.n_prompts)
    final = logits[rows, padded.last].float()
    return (final[rows, padded.answer] - final[rows, padded.alternative]).mean()


def test_query_edge_estimate_equals_a_per_edge_slope(tiny_llama):
    model = tiny_llama.model
    pairs = _pairs(model)
    padded = pairs.padded()
    receiver = HeadRef(1, 2)
    table = estimate_query_edges(model, pairs, [receiver])
    assert len(table) == model.cfg.n_heads  # every head of layer 0 sends into layer 1
    _, corrupted = hooks.capture(model, padded.corrupted, [hooks.z_hook(0)])
    for sender in (HeadRef(0, 0), HeadRef(0, 3)):
        slope = _edge_slope(model, pairs, corrupted[hooks.z_hook(0)], sender, receiver)
        row = table[(table.sender == str(sender)) & (table.receiver == str(receiver))]
        assert float(row.estimate.iloc[0]) == pytest.approx(slope, rel=1e-4, abs=1e-6)
    assert np.isfinite(table.estimate).all()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_role_metrics_equal_the_whole_atlas(name, request):
    """Step 4's induction and duplicate-token scores, computed alone on the lower layers, are exactly the
    full atlas's (the same probe, batches and sums); step 2's copying score is the atlas's too."""
    model = request.getfixturevalue(name.replace("-", "_")).model
    n_seqs, seq_len = 6, 24
    atlas = compute_atlas(model, n_seqs=n_seqs, seq_len=seq_len).table
    below = int(model.cfg.n_layers) - 1
    fast = atlas_role_metrics(model, n_seqs, seq_len, below)
    reference = atlas[atlas.layer < below].reset_index(drop=True)
    assert len(fast) == below * int(model.cfg.n_heads)
    assert fast[["layer", "head"]].values.tolist() == reference[["layer", "head"]].values.tolist()
    for metric in ("induction", "duplicate_token"):
        assert reference[metric].notna().any()
        np.testing.assert_array_equal(fast[metric].to_numpy(), reference[metric].to_numpy())
    np.testing.assert_array_equal(copying_scores(model).ravel(), atlas["copying"].to_numpy())
