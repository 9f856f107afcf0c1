"""Prompt sets for ablation and path patching: tokenized prompts, what is scored, their corruptions.

One type, :class:`PromptPairs`, serves both: ablation scores each prompt at
its answer positions (KL, loss on ``label_ids``, the logit difference
``target - alternative``); resample ablation and path patching also need
each prompt's corrupted twin, position-aligned (same token length). The
builders here make the sets the pages and the CLI offer: typed prompts,
IOI with its ABC corruptions (Wang et al. 2022), the induction probe of
repeated random tokens (Olsson et al. 2022), and the curated sets in
``prompts/``.
"""


from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Int

from headvis_core.data.ioi import generate_ioi
from headvis_core.data.probes import induction_probe
from headvis_core.data.prompt_library import load_prompt_set
from headvis_core.errors import InputError
from headvis_core.tokens import single_token_id, tokenize_prompt


@dataclass(frozen=True)
class PaddedPairs:
    """A :class:`PromptPairs` right-padded into one batch (path patching runs it in one pass).

    ``clean, corrupted``: ``[batch, pos]``; ``last``: ``[batch]`` the scored
    position of each prompt (its last answer position); ``answer,
    alternative``: ``[batch]`` token ids. Right padding is harmless under
    causal attention: real tokens never attend to later pads.
    """

    clean: Int[torch.Tensor, "batch pos"]
    corrupted: Int[torch.Tensor, "batch pos"]
    last: Int[torch.Tensor, " batch"]
    answer: Int[torch.Tensor, " batch"]
    alternative: Int[torch.Tensor, " batch"]

    @property
    def n_prompts(self) -> int:
        return int(self.clean.shape[0])


@dataclass(frozen=True)
class PromptPairs:
    """Prompts to ablate or patch on, tokenized, with what the metrics look at.

    ``answer_positions[i]`` are the positions of prompt ``i`` whose predictions
    are scored (default: the last token); ``label_ids[i]`` the true next token
    at each of them (for the loss). ``target_ids``/``alternative_ids`` give
    the logit difference ``target - alternative`` (IOI: IO minus S) at the
    last answer position. ``corrupted_tokens[i]`` is prompt ``i``'s corrupted
    twin, as long as the clean prompt (resample ablation, path patching).
    """

    texts: list[str]
    tokens: list[torch.Tensor]  # each [pos_i]
    answer_positions: list[tuple[int, ...]]
    target_ids: Optional[list[int]] = None
    alternative_ids: Optional[list[int]] = None
    label_ids: Optional[list[tuple[int, ...]]] = None
    corrupted_tokens: Optional[list[torch.Tensor]] = None  # each [pos_i], for resample ablation
    corrupted_texts: Optional[list[str]] = None
    name: str = "prompts"
    skipped_names: tuple[str, ...] = ()  # IOI names dropped because they are not one token
    notes: tuple[str, ...] = ()  # shown to the user beside the results
    description: str = ""  # one line saying what the set is (path-patching results carry it)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_prompts(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> list[int]:
        return [int(t.shape[-1]) for t in self.tokens]

    def subset(self, indices: Sequence[int]) -> "PromptPairs":
        def pick(values):
            return None if values is None else [values[i] for i in indices]

        return replace(self, texts=pick(self.texts), tokens=pick(self.tokens),
                       answer_positions=pick(self.answer_positions), target_ids=pick(self.target_ids),
                       alternative_ids=pick(self.alternative_ids), label_ids=pick(self.label_ids),
                       corrupted_tokens=pick(self.corrupted_tokens), corrupted_texts=pick(self.corrupted_texts))

    def with_alternatives(self, alternative_ids: Sequence[int]) -> "PromptPairs":
        return replace(self, alternative_ids=[int(i) for i in alternative_ids])

    def length_groups(self) -> list[list[int]]:
        """Indices of prompts that can share a batch: same length and answer positions."""
        groups: dict[tuple, list[int]] = {}
        for i, (tokens, positions) in enumerate(zip(self.tokens, self.answer_positions)):
            groups.setdefault((int(tokens.shape[-1]), positions), []).append(i)
        return list(groups.values())

    def require_one_length(self, why: str) -> int:
        lengths = sorted(set(self.lengths))
        if len(lengths) > 1:
            shown = ", ".join(str(n) for n in lengths[:8]) + (", ..." if len(lengths) > 8 else "")
            raise InputError(
                f"{why} needs prompts of one length, but these prompts have {shown} tokens. Use prompts "
                "that tokenize to the same length (for IOI, one template), or zero ablation.")
        return lengths[0]

    def padded(self, pad_id: Optional[int] = None) -> PaddedPairs:
        """Clean and corrupted prompts right-padded into one batch, with the answer and alternative ids.

        ``pad_id`` defaults to the first prompt's last token. Raises
        :class:`InputError` unless every prompt has a corrupted twin, a
        target and an alternative.
        """
        if not self.tokens:
            raise InputError("Path patching needs at least one prompt pair.")
        if self.corrupted_tokens is None or self.target_ids is None or self.alternative_ids is None:
            raise InputError("Path patching needs a corrupted prompt, an answer and an alternative token for "
                             "every prompt (for example the IOI or induction preset).")
        if pad_id is None:
            pad_id = int(self.tokens[0][-1])
        width = max(self.lengths)

        def pad(rows: Sequence[torch.Tensor]) -> torch.Tensor:
            out = torch.full((len(rows), width), pad_id, dtype=torch.long)
            for i, row in enumerate(rows):
                out[i, :row.shape[-1]] = row.reshape(-1)
            return out

        return PaddedPairs(clean=pad(self.tokens), corrupted=pad(self.corrupted_tokens),
                           last=torch.tensor([positions[-1] for positions in self.answer_positions]),
                           answer=torch.tensor(self.target_ids), alternative=torch.tensor(self.alternative_ids))


def _ids(model: Any, tokens: Optional[Sequence[Optional[str]]], n: int, what: str) -> Optional[list[int]]:
    if tokens is None or all(t is None or t == "" for t in tokens):
        return None
    if len(tokens) != n or any(t is None or t == "" for t in tokens):
        raise InputError(f"Give a {what} token for every prompt, or for none.")
    return [single_token_id(model, t) for t in tokens]


def _tokenize_all(model: Any, texts: list[str], max_tokens: Optional[int]) -> list[torch.Tensor]:
    tokens = []
    for i, text in enumerate(texts):
        try:
            tokens.append(tokenize_prompt(model, text, max_tokens=max_tokens).tokens[0])
        except InputError as err:
            raise InputError(f"Prompt {i + 1}: {err}" if len(texts) > 1 else str(err)) from err
    return tokens


def _tokenize_corrupted(model: Any, corrupted: list[str], clean: list[torch.Tensor],
                        max_tokens: Optional[int]) -> list[torch.Tensor]:
    """Corrupted prompts (one for all, or one per prompt), each as long as its clean prompt."""
    if len(corrupted) == 1 and len(clean) > 1:
        corrupted = corrupted * len(clean)
    if len(corrupted) != len(clean):
        raise InputError(f"Give one corrupted prompt per prompt ({len(clean)}), not {len(corrupted)}.")
    out = []
    for i, (text, clean_tokens) in enumerate(zip(corrupted, clean)):
        tok = tokenize_prompt(model, text, max_tokens=max_tokens).tokens[0]
        if tok.shape[-1] != clean_tokens.shape[-1]:
            raise InputError(
                f"Corrupted prompt {i + 1} has {tok.shape[-1]} tokens but its clean prompt has "
                f"{clean_tokens.shape[-1]}: resample ablation replaces activations position by position, "
                "so both must tokenize to the same length.")
        out.append(tok)
    return out


def pairs_from_tokens(clean: Sequence[torch.Tensor], corrupted: Sequence[torch.Tensor], answer: Sequence[int],
                      alternative: Sequence[int], description: str = "") -> PromptPairs:
    """Prompt pairs from 1-D token tensors (a clean prompt and its corrupted twin alike long).

    Each prompt is scored at its last token, with the logit difference
    ``answer - alternative``.
    """
    if not clean:
        raise InputError("Path patching needs at least one prompt pair.")
    if not (len(clean) == len(corrupted) == len(answer) == len(alternative)):
        raise InputError("Give as many corrupted prompts, answers and alternatives as clean prompts.")
    for i, (c, x) in enumerate(zip(clean, corrupted)):
        if c.shape[-1] != x.shape[-1]:
            raise InputError(f"Prompt pair {i + 1}: the clean prompt is {c.shape[-1]} tokens and the corrupted "
                             f"one {x.shape[-1]}; path patching needs them aligned token for token.")
    tokens = [c.reshape(-1) for c in clean]
    return PromptPairs(texts=[f"prompt {i + 1}" for i in range(len(tokens))], tokens=tokens,
                       answer_positions=[(int(t.shape[-1]) - 1,) for t in tokens],
                       target_ids=[int(a) for a in answer], alternative_ids=[int(a) for a in alternative],
                       corrupted_tokens=[x.reshape(-1) for x in corrupted], description=description)


def prompts_from_texts(model: Any, texts: Sequence[str], targets: Optional[Sequence[Optional[str]]] = None,
                       alternatives: Optional[Sequence[Optional[str]]] = None,
                       corrupted: Optional[Sequence[str]] = None, name: str = "prompts",
                       max_tokens: Optional[int] = None) -> PromptPairs:
    """Tokenize prompts scored at their last token (empty or too-long prompts raise :class:`InputError`)."""
    texts = list(texts)
    if not texts:
        raise InputError("No prompts given: type a prompt or choose a prompt set.")
    tokens = _tokenize_all(model, texts, max_tokens)
    corrupted_texts = None if corrupted is None else list(corrupted)
    corrupted_tokens = None
    if corrupted_texts is not None:
        corrupted_tokens = _tokenize_corrupted(model, corrupted_texts, tokens, max_tokens)
        if len(corrupted_texts) == 1 and len(texts) > 1:
            corrupted_texts = corrupted_texts * len(texts)
    return PromptPairs(
        texts=texts, tokens=tokens, answer_positions=[(int(t.shape[-1]) - 1,) for t in tokens],
        target_ids=_ids(model, targets, len(texts), "target"),
        alternative_ids=_ids(model, alternatives, len(texts), "alternative"),
        corrupted_tokens=corrupted_tokens, corrupted_texts=corrupted_texts, name=name)


def ioi_prompts(model: Any, n_prompts: int = 8, seed: int = 0, template: Optional[str] = None) -> PromptPairs:
    """IOI prompts (Wang et al. 2022) with their ABC corruptions; metric ``logit(IO) - logit(S)``."""
    dataset = generate_ioi(model, n_prompts, seed=seed, templates=[template] if template else None)
    prompts = prompts_from_texts(model, dataset.clean_texts, targets=[p.io for p in dataset.prompts],
                                 alternatives=[p.s for p in dataset.prompts], name="IOI",
                                 corrupted=dataset.corrupted_texts)
    return replace(prompts, skipped_names=tuple(dataset.skipped_names),
                   description=f"{n_prompts} IOI prompts vs ABC corruptions (seed {seed})")


def induction_prompts(model: Any, n_seqs: int = 8, half_len: int = 20, seed: int = 0,
                      contrast: bool = False) -> PromptPairs:
    """Repeated random tokens ``BOS r_1..r_n r_1..r_n`` (Olsson et al. 2022), scored on the second copy.

    Answer positions are those predicting the second copy's tokens 2..n (its
    first token cannot be inferred from the first copy), with the loss against
    them. With ``contrast`` each sequence also gets a corrupted twin with a
    fresh first half, ``BOS s_1..s_n r_1..r_n`` (nothing repeats, so induction
    has nothing to copy), and the logit difference ``r_n - s_n`` at the last
    answer position: the path-patching preset.
    """
    if n_seqs < 1 or half_len < 2:
        raise InputError("The induction preset needs at least one sequence and a half length of at least 2.")
    probe = induction_probe(model, n_seqs, half_len, seed=seed)
    tokens = probe.tokens
    start = probe.second_copy_start
    positions = tuple(range(start, start + half_len - 1))
    labels = [tuple(int(x) for x in row[start + 1:start + half_len]) for row in tokens]
    texts = [f"repeated random tokens #{i + 1} ({half_len} x 2)" for i in range(n_seqs)]
    prompts = PromptPairs(texts=texts, tokens=list(tokens), answer_positions=[positions] * n_seqs,
                          label_ids=labels, name="induction",
                          description=f"{n_seqs} repeated random sequences ({half_len} tokens)")
    if not contrast:
        return prompts
    return _with_fresh_first_half(model, prompts, probe.prefix_len, half_len, seed)


def _with_fresh_first_half(model: Any, prompts: PromptPairs, prefix_len: int, half_len: int,
                           seed: int) -> PromptPairs:
    """The induction prompts' corrupted twins: the first copy replaced by fresh random tokens."""
    fresh = induction_probe(model, len(prompts), half_len, seed=seed + 1).tokens
    first_half = slice(prefix_len, prefix_len + half_len)
    corrupted = []
    for clean, other in zip(prompts.tokens, fresh):
        twin = clean.clone()
        twin[first_half] = other[first_half]
        corrupted.append(twin)
    answer = [int(t[prefix_len + half_len - 1]) for t in prompts.tokens]
    alternative = [int(t[prefix_len + half_len - 1]) for t in corrupted]
    return replace(prompts, corrupted_tokens=corrupted, target_ids=answer, alternative_ids=alternative,
                   description=f"{len(prompts)} repeated random sequences ({half_len} tokens) vs a fresh "
                               "first half")


def library_prompts(model: Any, key: str) -> PromptPairs:
    """A prompt set from ``prompts/`` with its answer/alternative tokens where every prompt has them."""
    prompt_set = load_prompt_set(key)
    answers = [p.answer for p in prompt_set.prompts]
    alternatives = [p.alternative for p in prompt_set.prompts]
    prompts = prompts_from_texts(model, prompt_set.texts, name=prompt_set.name)
    if not (all(answers) and all(alternatives)):
        return prompts
    try:
        return replace(prompts, target_ids=_ids(model, answers, len(answers), "target"),
                       alternative_ids=_ids(model, alternatives, len(alternatives), "alternative"))
    except InputError as err:
        # Still usable for KL and targeted ablation; only the logit difference needs the tokens.
        return replace(prompts, notes=(f"The set's answer tokens are not usable with this model ({err}), "
                                       "so the logit difference is not available.",))


def induction_prompt_pairs(model: Any, n_prompts: int = 8, half_len: int = 20, seed: int = 0) -> PromptPairs:
    """The path-patching induction preset: :func:`induction_prompts` with ``contrast=True``."""
    return induction_prompts(model, n_prompts, half_len=half_len, seed=seed, contrast=True)
