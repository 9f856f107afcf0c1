"""Tokenizing prompts with the checks and labels the pages need."""

from dataclasses import dataclass
from typing import Any, Optional

import torch

from headvis_core.errors import InputError

VISIBLE_WHITESPACE = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


@dataclass(frozen=True)
class TokenizedPrompt:
    tokens: torch.Tensor  # [1, pos]
    str_tokens: list[str]
    truncated_from: int | None  # original token count if the prompt was cut to the context length

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[-1])


def tokenize_prompt(model: Any, text: str, max_tokens: int | None = None, truncate: bool = False,
                    prepend_bos: bool | None = None) -> TokenizedPrompt:
    """Tokenize one prompt, refusing an empty one and checking the length.

    ``max_tokens`` defaults to the model's context length. A longer prompt
    raises :class:`InputError`, or with ``truncate=True`` is cut and the
    original length recorded in ``truncated_from``.
    """
    if text is None or not text.strip():
        raise InputError("The prompt is empty: type some text or pick one from the prompt library.")
    limit = int(max_tokens or model.cfg.n_ctx)
    tokens = model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)
    original = int(tokens.shape[-1])
    truncated_from = None
    if original > limit:
        if not truncate:
            raise InputError(f"The prompt is {original} tokens long, but the limit here is {limit} tokens "
                             f"(the model's context is {model.cfg.n_ctx}). Shorten it.")
        tokens, truncated_from = tokens[:, :limit], original
    return TokenizedPrompt(tokens=tokens, str_tokens=model.to_str_tokens(tokens[0]), truncated_from=truncated_from)


def single_token_id(model: Any, text: str) -> int:
    """The id of ``text`` if it is exactly one token (no BOS), else a clear :class:`InputError`.

    Write the leading space the model expects (`` Mary``, not ``Mary``).
    """
    if not text:
        raise InputError("The target token is empty.")
    ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        pieces = [model.to_single_str_token(i) for i in ids]
        hint = "" if text.startswith(" ") else " Most words need a leading space, as in ' Mary'."
        raise InputError(f"{text!r} is not a single token for this model: it tokenizes into {len(ids)} "
                         f"tokens {pieces}.{hint}")
    return ids[0]


def visible(token: str) -> str:
    """Token text with spaces, newlines and tabs made visible."""
    return "".join(VISIBLE_WHITESPACE.get(ch, ch) for ch in token)


def token_labels(str_tokens: list[str]) -> list[str]:
    """Axis labels ``"position:token"``: whitespace visible, repeated tokens distinct."""
    return [f"{i}:{visible(tok)}" for i, tok in enumerate(str_tokens)]


def bos_token_id(model: Any) -> Optional[int]:
    """The BOS id the model prepends, or ``None`` where it prepends none."""
    tokenizer = getattr(model, "tokenizer", None)
    if not getattr(model.cfg, "default_prepend_bos", True) or tokenizer is None:
        return None
    return tokenizer.bos_token_id
