"""Edge strength by path patching (Wang et al. 2022, "Interpretability in the Wild", section 3.1).

The edge ``A -> B (kind)`` is patched alone: the difference between head A's residual-stream write
(``z_A @ W_O^A``) on the source prompts and on the base prompts is added to the copy of the
residual stream that feeds head B's query, key or value input (before B's ``ln1``, so the layer
norm is recomputed), while every other reader, B's other inputs included, sees the base run. The
edge strength is how much that moves the logit difference ``logit(answer) - logit(alternative)`` at
each prompt's last position:

* ``direction="noising"`` (Wang et al.): base = clean, source = corrupted; a negative effect means
  the edge carries information the clean prompt needs.
* ``direction="denoising"``: base = corrupted, source = clean, as TransformerLens's
  ``transformer_lens.patching.get_act_patch_direct_path``.

``normalized`` divides the effect by ``clean - corrupted`` (-1: the edge alone accounts for the
whole gap when noising; +1: restores it when denoising).

Why not call ``get_act_patch_direct_path`` directly: it refuses K and V on grouped-query models
(SmolLM2's 9 query heads share 3 KV heads, so a KV input is shared by three query heads) and sweeps
every later head of one sender. Here each edge takes two passes of a batch that patches many
edges at once: (1) patch the shared Q/K/V fork of B's layer (TransformerLens's
``use_split_qkv_input`` fork) and read B's own output ``z_B``, stopping after B's layer; (2) put
that ``z_B`` into the base run at head B only. Step 2 confines the change to B even when its key
and value inputs are shared with other query heads, and for ordinary multi-head attention the
result equals ``get_act_patch_direct_path`` (``tests/test_path_patching.py``).
"""

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pandas as pd
import torch

from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.hooks import capture, exclusive, run_with_hooks
from headvis_core.progress import ProgressCallback, report

DIRECTIONS = ("noising", "denoising")
MAX_ROWS_PER_PASS = 256  # prompts x edges patched in one forward pass


@dataclass(frozen=True)
class Edge:
    sender: HeadRef
    receiver: HeadRef
    kind: str  # "q", "k" or "v": the receiver input patched

    def __str__(self) -> str:
        return f"{self.sender} -> {self.receiver} ({self.kind.upper()})"


@dataclass(frozen=True)
class PromptPairs:
    """Clean and corrupted prompts of equal token length, right-padded into one batch.

    ``clean, corrupted``: ``[batch, pos]``; ``last``: ``[batch]`` index of each prompt's last real
    token (where the answer is predicted); ``answer, alternative``: ``[batch]`` token ids. Right
    padding is harmless under causal attention: real tokens never attend to later pads.
    """

    clean: torch.Tensor
    corrupted: torch.Tensor
    last: torch.Tensor
    answer: torch.Tensor
    alternative: torch.Tensor
    description: str = ""

    @property
    def n_prompts(self) -> int:
        return int(self.clean.shape[0])


def pad_prompt_pairs(clean: Sequence[torch.Tensor], corrupted: Sequence[torch.Tensor], answer: Sequence[int],
                     alternative: Sequence[int], pad_id: int = 0, description: str = "") -> PromptPairs:
    """Build :class:`PromptPairs` from 1-D token tensors (a clean and its corrupted twin alike long)."""
    if not clean:
        raise InputError("Path patching needs at least one prompt pair.")
    if not (len(clean) == len(corrupted) == len(answer) == len(alternative)):
        raise InputError("Give as many corrupted prompts, answers and alternatives as clean prompts.")
    for i, (c, x) in enumerate(zip(clean, corrupted)):
        if c.shape[-1] != x.shape[-1]:
            raise InputError(f"Prompt pair {i + 1}: the clean prompt is {c.shape[-1]} tokens and the corrupted "
                             f"one {x.shape[-1]}; path patching needs them aligned token for token.")
    width = max(int(c.shape[-1]) for c in clean)

    def pad(rows: Sequence[torch.Tensor]) -> torch.Tensor:
        out = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :row.shape[-1]] = row.reshape(-1)
        return out

    return PromptPairs(clean=pad(clean), corrupted=pad(corrupted),
                       last=torch.tensor([int(c.shape[-1]) - 1 for c in clean]),
                       answer=torch.tensor(list(answer)), alternative=torch.tensor(list(alternative)),
                       description=description)


def ioi_prompt_pairs(model: Any, n_prompts: int = 8, seed: int = 0) -> PromptPairs:
    """IOI prompts (clean) and their ABC corruptions; answer = IO, alternative = S."""
    from headvis_core.data.ioi import generate_ioi, ioi_token_ids

    dataset = generate_ioi(model, n_prompts, seed=seed)
    clean = [model.to_tokens(p.clean)[0].cpu() for p in dataset.prompts]
    corrupted = [model.to_tokens(p.corrupted)[0].cpu() for p in dataset.prompts]
    io, s = ioi_token_ids(model, dataset)
    return pad_prompt_pairs(clean, corrupted, io.tolist(), s.tolist(), pad_id=int(clean[0][-1]),
                            description=f"{n_prompts} IOI prompts vs ABC corruptions (seed {seed})")


def induction_prompt_pairs(model: Any, n_prompts: int = 8, half_len: int = 20, seed: int = 0) -> PromptPairs:
    """Repeated random tokens (Olsson et al. 2022) against the same with a fresh first half.

    Clean: ``BOS r_1..r_n r_1..r_{n-1}``, predicting ``r_n`` by induction. Corrupted:
    ``BOS s_1..s_n r_1..r_{n-1}``: nothing repeats, so induction has nothing to copy. Answer
    ``r_n``, alternative ``s_n``.
    """
    from headvis_core.data.probes import random_token_range, repeated_random_tokens
    from headvis_core.tokens import bos_token_id

    if n_prompts < 1 or half_len < 2:
        raise InputError("Ask for at least one induction prompt of at least two tokens per half.")
    bos = bos_token_id(model)
    low, high = random_token_range(model)
    clean = repeated_random_tokens(n_prompts, half_len, high, bos, seed=seed, low=low)
    fresh = repeated_random_tokens(n_prompts, half_len, high, bos, seed=seed + 1, low=low)
    start = 0 if bos is None else 1
    corrupted = clean.clone()
    corrupted[:, start:start + half_len] = fresh[:, start:start + half_len]
    answer = clean[:, start + half_len - 1]
    alternative = corrupted[:, start + half_len - 1]
    clean, corrupted = clean[:, :-1], corrupted[:, :-1]
    return PromptPairs(clean=clean, corrupted=corrupted, last=torch.full((n_prompts,), clean.shape[1] - 1),
                       answer=answer, alternative=alternative,
                       description=f"{n_prompts} repeated random sequences ({half_len} tokens) vs a fresh first half")


def logit_difference(logits: torch.Tensor, pairs: PromptPairs, repeats: int = 1) -> torch.Tensor:
    """``[repeats]``: mean over prompts of ``logit(answer) - logit(alternative)`` at the last token.

    ``logits``: ``[repeats * batch, pos, vocab]``, copy ``r`` of the batch in rows ``r*batch..``.
    """
    batch = pairs.n_prompts
    rows = torch.arange(repeats * batch)
    last = pairs.last.repeat(repeats).to(logits.device)
    final = logits[rows, last].float()
    diff = (final[rows, pairs.answer.repeat(repeats).to(logits.device)]
            - final[rows, pairs.alternative.repeat(repeats).to(logits.device)])
    return diff.reshape(repeats, batch).mean(dim=1).cpu()


@dataclass
class PathPatchingResult:
    """``table``: one row per edge with ``sender, receiver, kind, patched, effect, normalized``."""

    table: pd.DataFrame
    clean_metric: float
    corrupted_metric: float
    direction: str
    description: str

    @property
    def base_metric(self) -> float:
        return self.clean_metric if self.direction == "noising" else self.corrupted_metric


def _z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _check_edges(model: Any, edges: Sequence[Edge]) -> None:
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if not edges:
        raise InputError("No edges to path-patch: choose at least one sender -> receiver pair.")
    for edge in edges:
        edge.sender.check(n_layers, n_heads)
        edge.receiver.check(n_layers, n_heads)
        if edge.kind not in ("q", "k", "v"):
            raise InputError(f"Edge {edge}: the receiver input must be q, k or v.")
        if edge.receiver.layer <= edge.sender.layer:
            raise InputError(f"Edge {edge}: the receiver must be in a later layer than the sender.")


class _SplitQKVInput:
    """Turn on TransformerLens's per-head Q/K/V input forks for the duration (flags restored)."""

    def __init__(self, model: Any):
        self.model = model

    def __enter__(self) -> None:
        cfg = self.model.cfg
        self.saved_split = bool(getattr(cfg, "use_split_qkv_input", False))
        self.saved_attn_in = bool(getattr(cfg, "use_attn_in", False))
        if self.saved_attn_in:
            self.model.set_use_attn_in(False)
        try:
            self.model.set_use_split_qkv_input(True)
        except (NotImplementedError, ValueError) as err:
            self.__exit__(None, None, None)
            raise InputError(f"This model's attention has no separate Q/K/V inputs that TransformerLens "
                             f"can patch, so path patching is not available here ({err}).") from err

    def __exit__(self, *exc: Any) -> None:
        self.model.set_use_split_qkv_input(self.saved_split)
        if self.saved_attn_in:
            self.model.set_use_attn_in(True)


def path_patch(model: Any, pairs: PromptPairs, edges: Sequence[Edge], direction: str = "noising",
               max_rows: int = MAX_ROWS_PER_PASS, progress: Optional[ProgressCallback] = None) -> PathPatchingResult:
    """Path-patch each edge alone and return its effect on the mean logit difference."""
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}.")
    edges = list(dict.fromkeys(edges))
    _check_edges(model, edges)
    n_heads = int(model.cfg.n_heads)
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
    group = n_heads // n_kv
    batch = pairs.n_prompts
    device = next(iter(model.parameters())).device
    clean, corrupted = pairs.clean.to(device), pairs.corrupted.to(device)
    base_tokens, source_tokens = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    sender_layers = sorted({e.sender.layer for e in edges})
    per_pass = max(1, max_rows // batch)
    chunks = [edges[i:i + per_pass] for i in range(0, len(edges), per_pass)]
    results: list[dict] = []
    with exclusive(model):
        report(progress, 0.0, "clean and corrupted runs")
        sender_z = [_z_hook(l) for l in sender_layers]
        base_logits, base_z = capture(model, base_tokens, sender_z)
        source_logits, source_z = capture(model, source_tokens, sender_z)
        base_metric = float(logit_difference(base_logits, pairs)[0])
        source_metric = float(logit_difference(source_logits, pairs)[0])
        clean_metric, corrupted_metric = ((base_metric, source_metric) if direction == "noising"
                                          else (source_metric, base_metric))
        del base_logits, source_logits
        W_O = {l: model.blocks[l].attn.W_O.detach() for l in sender_layers}  # [head, d_head, d_model]

        def write_delta(sender: HeadRef) -> torch.Tensor:  # [batch, pos, d_model]
            name, h = _z_hook(sender.layer), sender.head
            return (source_z[name][:, :, h] - base_z[name][:, :, h]) @ W_O[sender.layer][h].to(base_z[name].dtype)

        for chunk_index, chunk in enumerate(chunks):
            n = len(chunk)
            tokens = base_tokens.repeat(n, 1)
            deltas = [write_delta(e.sender) for e in chunk]
            receiver_layers = sorted({e.receiver.layer for e in chunk})

            def fork_hook(layer: int, kind: str):
                def hook(fork: torch.Tensor, hook: Any) -> torch.Tensor:
                    # fork: [rows, pos, heads (q) or kv heads (k, v), d_model], pre-ln1 residual copies
                    fork = fork.clone()
                    for i, edge in enumerate(chunk):
                        if edge.receiver.layer == layer and edge.kind == kind:
                            index = edge.receiver.head if kind == "q" else edge.receiver.head // group
                            fork[i * batch:(i + 1) * batch, :, index] += deltas[i].to(fork.dtype)
                    return fork
                return hook

            fork_hooks = [(f"blocks.{l}.attn.hook_{kind}_input", fork_hook(l, kind))
                          for l in receiver_layers for kind in sorted({e.kind for e in chunk if e.receiver.layer == l})]
            with _SplitQKVInput(model):
                _, patched_z = capture(model, tokens, [_z_hook(l) for l in receiver_layers], fwd_hooks=fork_hooks,
                                       stop_at_layer=receiver_layers[-1] + 1)

            def z_hook(layer: int):
                def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
                    z = z.clone()  # [rows, pos, head, d_head]
                    for i, edge in enumerate(chunk):
                        if edge.receiver.layer == layer:
                            rows, h = slice(i * batch, (i + 1) * batch), edge.receiver.head
                            z[rows, :, h] = patched_z[_z_hook(layer)][rows, :, h]
                    return z
                return hook

            logits = run_with_hooks(model, tokens, [(_z_hook(l), z_hook(l)) for l in receiver_layers])
            metrics = logit_difference(logits, pairs, repeats=n)
            del logits
            for edge, metric in zip(chunk, metrics.tolist()):
                results.append({"sender": str(edge.sender), "receiver": str(edge.receiver), "kind": edge.kind,
                                "patched": metric, "effect": metric - base_metric})
            report(progress, (chunk_index + 1) / len(chunks), f"{len(results)} of {len(edges)} edges patched")
    table = pd.DataFrame(results, columns=["sender", "receiver", "kind", "patched", "effect"])
    gap = clean_metric - corrupted_metric
    table["normalized"] = table["effect"] / gap if abs(gap) > 1e-9 else float("nan")
    return PathPatchingResult(table=table, clean_metric=clean_metric, corrupted_metric=corrupted_metric,
                              direction=direction, description=pairs.description)
