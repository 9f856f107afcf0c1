"""Retrieval heads: attention from the answer position to the entity span of a factual prompt.

NEO's fourth behaviour. On a factual prompt such as "The Eiffel Tower is located in the city
of", the model predicts the answer at the last token; a retrieval head moves information about
the entity there by attending to its tokens. The score of a head is the attention from the last
position to the tokens that overlap the marked entity span, beyond what the same attention spread
evenly over the prompt would give there, averaged over prompts::

    retrieval = mean over prompts of ( sum_{k in span} A[last, k]  -  sum_{k >= 1} A[last, k] * |span| / (n - 1) )

with ``n`` the prompt's length in tokens (BOS included; BOS never belongs to a span). The second
term removes the share an evenly attending head puts on the span, which is large in a short
prompt with a long entity name; a head that parks its attention on BOS scores about 0.

Prompts come from ``prompts/retrieval.json`` (a prompt set with ``entity_spans``, one per prompt)
or a user file: the same JSON shape, or a text file with one prompt per line and the span in
square brackets, ``The [Eiffel Tower] is located in the city of``.
"""

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from headvis_core.atlas.metrics import for_each_layer_pattern, length_batches
from headvis_core.data.corpus import encode
from headvis_core.data.prompt_library import PROMPTS_DIR
from headvis_core.errors import CorruptFileError, InputError
from headvis_core.progress import ProgressCallback, report
from headvis_core.tokens import bos_token_id

RETRIEVAL_PROMPTS = PROMPTS_DIR / "retrieval.json"
_MARKED = re.compile(r"\[([^\[\]]+)\]")


@dataclass(frozen=True)
class RetrievalPrompt:
    text: str
    span: str  # occurs in text; its first occurrence is the entity

    def span_chars(self) -> tuple[int, int]:
        start = self.text.find(self.span)
        return start, start + len(self.span)


def parse_marked_line(line: str, where: str = "") -> RetrievalPrompt:
    """``The [Eiffel Tower] is located in`` -> the prompt without brackets and its span."""
    marks = _MARKED.findall(line)
    if len(marks) != 1 or line.count("[") != 1 or line.count("]") != 1:
        raise InputError(f"{where}mark exactly one entity span in square brackets, e.g. "
                         f"'The [Eiffel Tower] is located in the city of' (got {line.strip()!r}).")
    start = line.index("[")
    text = line[:start] + marks[0] + line[line.index("]") + 1:]
    return RetrievalPrompt(text=text.strip(), span=marks[0].strip())


def _from_json(raw: Any, name: str) -> list[RetrievalPrompt]:
    try:
        texts = [p["text"] for p in raw["prompts"]]
        spans = raw["entity_spans"]
    except (KeyError, TypeError) as err:
        raise CorruptFileError(f"{name}: a retrieval prompt file needs 'prompts' (with 'text') and "
                               f"'entity_spans' (one span per prompt): missing {err}.") from err
    if not isinstance(spans, list) or len(spans) != len(texts):
        raise CorruptFileError(f"{name}: 'entity_spans' must list one span per prompt "
                               f"({len(texts)} prompts).")
    return [RetrievalPrompt(str(text), str(span)) for text, span in zip(texts, spans)]


def load_retrieval_prompts(path: Optional[str | Path] = None) -> list[RetrievalPrompt]:
    """The curated set (default) or a user file (JSON prompt set with ``entity_spans``, or marked text lines)."""
    path = Path(path).expanduser() if path is not None else RETRIEVAL_PROMPTS
    if not path.is_file():
        raise InputError(f"The retrieval prompt file {str(path)!r} does not exist.")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path.name} is not UTF-8 text: save it as UTF-8.") from err
    if path.suffix.lower() == ".json":
        try:
            prompts = _from_json(json.loads(content), path.name)
        except json.JSONDecodeError as err:
            raise CorruptFileError(f"{path.name} is not valid JSON: {err}") from err
    else:
        prompts = [parse_marked_line(line, f"{path.name} line {number}: ")
                   for number, line in enumerate(content.splitlines(), 1) if line.strip()]
    if not prompts:
        raise InputError(f"{path.name} holds no prompts.")
    for prompt in prompts:
        if not prompt.span.strip() or prompt.span not in prompt.text:
            raise InputError(f"The entity span {prompt.span!r} does not occur in the prompt {prompt.text!r}.")
    return prompts


def span_token_positions(model: Any, prompt: RetrievalPrompt) -> tuple[torch.Tensor, list[int]]:
    """``(tokens [1, pos] with BOS where the model uses one, positions of the tokens overlapping the span)``.

    A token overlaps the span when the characters it decodes to (found by decoding growing
    prefixes of the prompt's tokens) intersect the span's characters, its leading space aside.
    """
    ids = encode(model.tokenizer, prompt.text)
    if len(ids) < 2:
        raise InputError(f"The prompt {prompt.text!r} is too short: it needs at least two tokens.")
    start, end = prompt.span_chars()
    bos = bos_token_id(model)
    offset = 1 if bos is not None else 0
    positions, previous_end = [], 0
    for i in range(len(ids)):
        token_end = len(model.tokenizer.decode(ids[:i + 1]))
        token_text = model.tokenizer.decode(ids[:i + 1])[previous_end:token_end]
        token_start = previous_end + (len(token_text) - len(token_text.lstrip()))
        if token_start < end and token_end > start:
            positions.append(i + offset)
        previous_end = token_end
    if not positions:
        raise InputError(f"The entity span {prompt.span!r} covers no token of {prompt.text!r}.")
    if positions[-1] == len(ids) - 1 + offset:
        raise InputError(f"The entity span {prompt.span!r} ends the prompt {prompt.text!r}: the answer "
                         "position (the last token) must come after the entity.")
    tokens = torch.tensor(([bos] if bos is not None else []) + ids, dtype=torch.long)[None]
    return tokens, positions


def prompts_that_fit(model: Any, prompts: Sequence[RetrievalPrompt]) -> tuple[list[RetrievalPrompt], int]:
    """The prompts whose tokens (BOS included) fit the model's context, and how many do not."""
    room = int(model.cfg.n_ctx) - (bos_token_id(model) is not None)
    fit = [p for p in prompts if len(encode(model.tokenizer, p.text)) <= room]
    return fit, len(prompts) - len(fit)


def _add_span_attention(layer: int, pattern: torch.Tensor, total: torch.Tensor, span: torch.Tensor) -> None:
    last = pattern[:, :, -1, :].float().cpu()  # [batch, head, key]: the answer position's attention
    on_span = (last * span[:, None, :]).sum(-1)
    even_share = span.sum(-1) / (span.shape[-1] - 1)  # [batch]: |span| / (n - 1)
    total[layer] += (on_span - last[..., 1:].sum(-1) * even_share[:, None]).sum(0).double()


def retrieval_scores(model: Any, prompts: Sequence[RetrievalPrompt], batch_size: int = 16,
                     progress: Optional[ProgressCallback] = None) -> np.ndarray:
    """``[layer, head]``: mean over prompts of the attention from the last token to the entity span, beyond
    the evenly spread share (see the module docstring)."""
    if not prompts:
        raise InputError("No retrieval prompts given.")
    _, too_long = prompts_that_fit(model, prompts)
    if too_long:
        raise InputError(f"{too_long} retrieval prompt{'s are' if too_long > 1 else ' is'} longer than the model's "
                         f"context of {int(model.cfg.n_ctx)} tokens.")
    encoded = [span_token_positions(model, prompt) for prompt in prompts]
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    # one [1, pos] row per prompt, with a 0/1 span mask alongside: prompts of one length share a pass
    rows = [torch.cat([tokens, torch.zeros_like(tokens)]) for tokens, _ in encoded]
    for row, (_, positions) in zip(rows, encoded):
        row[1, positions] = 1
    total = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    # [batch, 2, pos] -> [batch, 2 * pos] so length_batches groups prompts of one length together
    batches = length_batches([row.reshape(1, -1) for row in rows], batch_size)
    for done, batch in enumerate(batches):
        report(progress, done / len(batches), f"retrieval prompts: batch {done + 1} of {len(batches)}")
        pairs = batch.reshape(batch.shape[0], 2, -1)
        tokens, span = pairs[:, 0], pairs[:, 1].float()

        for_each_layer_pattern(model, tokens, partial(_add_span_attention, total=total, span=span))
    report(progress, 1.0, "retrieval prompts done")
    return (total / len(prompts)).numpy()
