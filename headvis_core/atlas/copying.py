"""Copying score of each head's OV circuit (Elhage et al. 2021, "A Mathematical Framework").

The full OV circuit of query head ``h`` in layer ``l`` maps a token attended to
onto the logits it raises::

    M_h = C E_l  W_V^{kv(h)}  W_O^h  U C        [d_vocab, d_vocab]

A copying head raises the logit of the very token it attends to, so ``M_h``
has mostly positive eigenvalues. The score is Elhage et al.'s eigenvalue
ratio ``sum_i lambda_i / sum_i |lambda_i|`` in ``[-1, 1]`` (1: a pure copying
head, -1: it suppresses what it attends to, about 0 for random weights).

Exact and cheap: ``M_h`` has rank at most ``d_head``, and its non-zero
eigenvalues are those of the ``[d_head, d_head]`` matrix
``W_O^h U C E_l W_V^{kv(h)}`` (eig(AB) = eig(BA) away from 0, and C C = C),
so the vocabulary-sized matrix is never built. ``U C E_l`` is ``[d_model, d_model]``
and costs one pass over the vocabulary. Where the vocabulary is larger than
``max_vocab``, a fixed random sample ``S`` of token ids is used instead; the
score is then exactly that of the ``S x S`` block of ``M_h``.

Grouped-query attention: query head ``h`` reads key/value head
``h // (n_heads // n_kv_heads)`` (TransformerLens's ``_expand_kv_heads``).

Layer norm: ``E_l`` is the embedding as the head reads it when the residual
stream holds just that token: each row of ``W_E`` goes through layer ``l``'s
``ln1`` without its bias (centred for LayerNorm, divided by its RMS/standard
deviation, times the ln1 weight). On the output side the final norm's weight
is folded into ``W_U`` (and ``W_U`` centred over ``d_model`` for LayerNorm);
its division by the residual's scale is left out, since a positive factor
does not change the ratio. The logits are centred over the vocabulary
(``C = I - 11^T / n``): softmax ignores a shift shared by all tokens, and
this also removes the direction common to every token's embedding, which
would otherwise dominate the eigenvalues and say nothing about copying.
Biases (``b_V``, ``b_O``, norm biases) are left out: they do not depend on
the token attended to. Positional embeddings are not added.

On SmolLM2 the score agrees with the direct test: heads scoring about 1 rank
the attended token first among 3,000 sampled tokens about half the time, and
heads scoring about -1 rank it last (copy suppression).
"""


from functools import partial
from typing import Any, Optional

import numpy as np
import torch
from jaxtyping import Complex, Float

from headvis_core.progress import ProgressCallback, report
from headvis_core.weights import (
    effective_embedding,
    effective_unembedding,
    expand_kv_heads,
    is_layer_norm,
    norm_eps,
    norm_module,
    norm_weight,
    normalised_rows,
    post_attention_norm_gains,
)

DEFAULT_MAX_VOCAB = 65536
VOCAB_CHUNK = 2048  # tokens per step of the vocabulary pass (bounds its memory)


def vocab_sample(d_vocab: int, max_vocab: Optional[int], seed: int = 0) -> Optional[torch.Tensor]:
    """Sorted sample of ``max_vocab`` token ids, or ``None`` when the whole vocabulary is used."""
    if max_vocab is None or d_vocab <= max_vocab:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(d_vocab, generator=generator)[:max_vocab].sort().values


def _matches_formula(model: Any, layer: int, token_ids: torch.Tensor) -> bool:
    """Whether the real ln1 module agrees with :func:`effective_embedding` (Gemma-style norms do not)."""
    ln1 = norm_module(model.blocks[layer].ln1)
    W_E = model.W_E.detach()[token_ids[:8]]
    with torch.no_grad():
        real = (ln1(W_E) - ln1(torch.zeros_like(W_E))).double().cpu()
    tolerance = max(1e-3, 4 * torch.finfo(W_E.dtype).eps)  # bfloat16 weights round at about 1e-2
    return torch.allclose(real, effective_embedding(model, layer, token_ids[:8]), rtol=tolerance, atol=tolerance / 10)


def ov_weights(model: Any) -> tuple[Float[torch.Tensor, "layer head d_model d_head"],
                                   Float[torch.Tensor, "layer head d_head d_model"]]:
    """``(W_V [layer, head, d_model, d_head], W_O [layer, head, d_head, d_model])`` per query head (GQA expanded).

    In the model's dtype, on the CPU (callers convert one layer at a time, to keep memory down). Where the
    attention output passes a norm before the residual stream (Gemma's ``ln1_post``), its gain is folded
    into ``W_O``; its per-token division is left out, like the final norm's (a positive factor).
    """
    W_O = model.W_O.detach().cpu()
    post_gains = post_attention_norm_gains(model)
    if post_gains is not None:
        W_O = W_O * post_gains.to(W_O.dtype)[:, None, None, :]
    return expand_kv_heads(model.W_V.detach().cpu(), W_O.shape[1]), W_O


def eigenvalue_ratio(eigenvalues: Complex[torch.Tensor, "... n"]) -> Float[torch.Tensor, "..."]:
    """``sum(lambda) / sum(|lambda|)`` over the last axis (0 where all eigenvalues vanish)."""
    total = eigenvalues.real.sum(-1)
    magnitude = eigenvalues.abs().sum(-1)
    return torch.where(magnitude > 0, total / magnitude.clamp(min=1e-300), torch.zeros_like(total))


def copying_scores(model: Any, max_vocab: Optional[int] = DEFAULT_MAX_VOCAB, seed: int = 0,
                   progress: Optional[ProgressCallback] = None) -> np.ndarray:
    """``[layer, head]`` eigenvalue copying scores of every head's full OV circuit (see module docstring)."""
    n_layers = int(model.cfg.n_layers)
    report(progress, 0.0, "copying scores: unembedding")
    d_vocab = int(model.W_E.shape[0])
    sample = vocab_sample(d_vocab, max_vocab, seed)
    ids = torch.arange(d_vocab) if sample is None else sample
    W_V, W_O = ov_weights(model)
    vocab_products: dict[tuple[bool, float], torch.Tensor] = {}
    scores = torch.zeros(n_layers, W_O.shape[1], dtype=torch.float64)
    for layer in range(n_layers):
        ln1 = norm_module(model.blocks[layer].ln1)
        if _matches_formula(model, layer, ids):
            # U E_l = (U N) diag(w_l) for a "normalise, then scale" ln1: one vocabulary pass serves all layers
            kind = (is_layer_norm(ln1), norm_eps(ln1))
            if kind not in vocab_products:
                vocab_products[kind] = _unembed_times_embed(model, ids, partial(_normalised_embedding, model, kind))
            UE = vocab_products[kind] * norm_weight(ln1, W_O.shape[-1])[None, :]
        else:
            UE = _unembed_times_embed(model, ids, partial(_exact_effective_embedding, model, layer))
        inner = W_O[layer].double() @ UE @ W_V[layer].double()  # [head, d_head, d_head]
        scores[layer] = eigenvalue_ratio(torch.linalg.eigvals(inner))
        report(progress, (layer + 1) / n_layers, f"copying scores: layer {layer + 1} of {n_layers}")
    return scores.numpy()


def _unembed_times_embed(model: Any, ids: torch.Tensor, embed_rows, chunk_size: int = VOCAB_CHUNK) -> torch.Tensor:
    """``U C E`` ``[d_model, d_model]`` over the tokens ``ids``, ``C`` centring over those tokens.

    Computed a chunk of the vocabulary at a time, so memory stays bounded:
    ``sum_t (u_t - mean u) e_t^T = sum_t u_t e_t^T - (sum_t u_t)(sum_t e_t)^T / n``.
    """
    products = sum_u = sum_e = None
    for start in range(0, len(ids), chunk_size):
        chunk = ids[start:start + chunk_size]
        U, E = effective_unembedding(model, chunk), embed_rows(chunk)
        parts = (U @ E, U.sum(1), E.sum(0))
        if products is None:
            products, sum_u, sum_e = parts
        else:
            products, sum_u, sum_e = products + parts[0], sum_u + parts[1], sum_e + parts[2]
    return products - torch.outer(sum_u, sum_e) / len(ids)


def _normalised_embedding(model: Any, kind: tuple[bool, float], token_ids: torch.Tensor) -> torch.Tensor:
    """Embedding rows of ``token_ids`` normalised as an ``(is LayerNorm, eps)`` norm would, before its gain."""
    return normalised_rows(model.W_E.detach()[token_ids].double().cpu(), *kind)


def _exact_effective_embedding(model: Any, layer: int, token_ids: torch.Tensor) -> torch.Tensor:
    ln1 = norm_module(model.blocks[layer].ln1)
    W_E = model.W_E.detach()[token_ids]
    with torch.no_grad():
        return (ln1(W_E) - ln1(torch.zeros_like(W_E[:1]))).double().cpu()
