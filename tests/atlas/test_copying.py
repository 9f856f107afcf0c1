import numpy as np
import pytest
import torch

from headvis_core.atlas.copying import copying_scores, eigenvalue_ratio, ov_weights, vocab_sample
from headvis_core.models.loader import load_random_model
from headvis_core.models.random_models import RandomModelSpec
from headvis_core.weights import effective_embedding, effective_unembedding


def hf_ov_weights(model, layer, head):
    """``W_V [d_model, d_head]`` and ``W_O [d_head, d_model]`` of one query head, read from the HF module."""
    cfg = model.cfg
    d_head = cfg.d_head
    hf = model.original_model
    if hasattr(hf, "transformer"):  # GPT-2: c_attn is x @ W, columns [q | k | v]; c_proj rows per head
        block = hf.transformer.h[layer].attn
        W_V = block.c_attn.weight[:, 2 * cfg.d_model:][:, head * d_head:(head + 1) * d_head]
        W_O = block.c_proj.weight[head * d_head:(head + 1) * d_head]
    else:  # Llama: v_proj [n_kv * d_head, d_model]; query head h reads kv head h // group
        attn = hf.model.layers[layer].self_attn
        n_kv = attn.v_proj.weight.shape[0] // d_head
        kv = head // (cfg.n_heads // n_kv)
        W_V = attn.v_proj.weight[kv * d_head:(kv + 1) * d_head].T
        W_O = attn.o_proj.weight[:, head * d_head:(head + 1) * d_head].T
    return W_V.detach().double(), W_O.detach().double()


CHECKED_HEADS = [(0, 0), (0, 3), (1, 1), (1, 2)]  # the eigenvalues of 257 x 257 matrices are slow on 2 cores


def reference_scores(model, token_ids=None):
    """Build the vocabulary-sized circuit C E W_V W_O U C of some heads and take its eigenvalues (the slow way).

    Returns ``[layer, head]`` with NaN for heads not checked.
    """
    ids = torch.arange(model.cfg.d_vocab) if token_ids is None else token_ids
    W_E = model.W_E.detach()[ids]
    final = model.ln_final.original_component
    W_U = model.W_U.detach().double()[:, ids] * final.weight.detach().double()[:, None]
    if isinstance(final, torch.nn.LayerNorm):
        W_U = W_U - W_U.mean(0, keepdim=True)
    n = len(ids)
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    scores = np.full((model.cfg.n_layers, model.cfg.n_heads), np.nan)
    for layer, head in CHECKED_HEADS:
        ln1 = model.blocks[layer].ln1.original_component
        with torch.no_grad():
            E = (ln1(W_E) - ln1(torch.zeros_like(W_E))).double()  # the real module, bias removed
        W_V, W_O = hf_ov_weights(model, layer, head)
        full = centre @ E @ W_V @ W_O @ W_U @ centre
        eigenvalues = torch.linalg.eigvals(full)
        scores[layer, head] = float(eigenvalues.real.sum() / eigenvalues.abs().sum())
    return scores


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_copying_equals_eigenvalues_of_the_full_vocabulary_circuit(fixture, request):
    model = request.getfixturevalue(fixture).model
    fast = copying_scores(model)
    slow = reference_scores(model)
    checked = ~np.isnan(slow)
    np.testing.assert_allclose(fast[checked], slow[checked], atol=1e-6)
    assert np.all(np.abs(fast) <= 1 + 1e-12)


def test_a_sampled_vocabulary_scores_the_sampled_block(tiny_llama):
    model = tiny_llama.model
    ids = vocab_sample(model.cfg.d_vocab, 100, seed=4)
    assert ids is not None and len(ids) == 100 and len(set(ids.tolist())) == 100
    assert vocab_sample(model.cfg.d_vocab, 1000) is None  # small vocabularies are used whole
    slow = reference_scores(model, ids)
    checked = ~np.isnan(slow)
    np.testing.assert_allclose(copying_scores(model, max_vocab=100, seed=4)[checked], slow[checked], atol=1e-6)


def test_gqa_query_heads_read_their_kv_head(tiny_llama):
    model = tiny_llama.model  # 4 query heads, 2 KV heads
    W_V, W_O = ov_weights(model)
    assert W_V.shape == (2, 4, 64, 16) and W_O.shape == (2, 4, 16, 64)
    for head in range(4):
        hf_V, hf_O = hf_ov_weights(model, 1, head)
        torch.testing.assert_close(W_V[1, head].double(), hf_V)
        torch.testing.assert_close(W_O[1, head].double(), hf_O)
    assert torch.equal(W_V[0, 0], W_V[0, 1]) and not torch.equal(W_V[0, 1], W_V[0, 2])


def test_a_head_built_to_copy_scores_one_and_its_negation_minus_one():
    # One layer, two query heads sharing one KV head: set W_O so that the head's inner matrix
    # W_O (U C E) W_V is W_V^T G^T G W_V (positive semi-definite), i.e. a pure copying circuit.
    loaded = load_random_model(RandomModelSpec(arch="llama", n_layers=1, n_heads=2, n_kv_heads=1, d_model=32,
                                               seed=11))
    model = loaded.model
    W_V = ov_weights(model)[0].double()
    E = effective_embedding(model, 0)
    U = effective_unembedding(model)
    G = U @ (E - E.mean(0, keepdim=True))
    copy = (G @ W_V[0, 0]).T  # [d_head, d_model]
    o_proj = model.original_model.model.layers[0].self_attn.o_proj.weight
    with torch.no_grad():
        o_proj[:, 0:16] = copy.T.float()
        o_proj[:, 16:32] = -copy.T.float()
    scores = copying_scores(model)
    np.testing.assert_allclose(scores[0], [1.0, -1.0], atol=1e-6)


def test_eigenvalue_ratio_of_known_spectra():
    values = torch.tensor([[2.0, 1.0, 0.0], [2.0, -2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.complex128)
    values[1, 0] = complex(1, 1)
    values[1, 1] = complex(1, -1)
    ratio = eigenvalue_ratio(values)
    np.testing.assert_allclose(ratio.numpy(), [1.0, 2 / (2 * np.sqrt(2)), 0.0])
