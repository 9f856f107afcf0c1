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
result equals ``get_act_patch_direct_path`` (``tests/circuits/test_path_patching.py``).
"""


from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import pandas as pd
import torch
from jaxtyping import Float

from headvis_core.ablation.metrics import logit_difference
from headvis_core.data.prompt_pairs import PaddedPairs, PromptPairs
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.hooks import capture, exclusive, qkv_input_hook, run_with_hooks, z_hook
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


def mean_logit_difference(logits: Float[torch.Tensor, "rows pos vocab"], pairs: PaddedPairs,
                          repeats: int = 1) -> Float[torch.Tensor, " repeats"]:
    """``[repeats]``: mean over prompts of ``logit(answer) - logit(alternative)`` at each prompt's last position.

    ``logits``: ``[repeats * batch, pos, vocab]``, copy ``r`` of the batch in rows ``r*batch..``.
    """
    batch = pairs.n_prompts
    rows = torch.arange(repeats * batch)
    last = pairs.last.repeat(repeats).to(logits.device)
    diff = logit_difference(logits[rows, last], pairs.answer.repeat(repeats), pairs.alternative.repeat(repeats))
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


def _fork_hook(chunk: Sequence[Edge], deltas: list[torch.Tensor], layer: int, kind: str, batch: int,
               group: int) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """Add edge ``i``'s sender delta to the ``kind`` input fork of its receiver, in rows of copy ``i``."""
    def hook(fork: torch.Tensor, hook: Any) -> torch.Tensor:
        # fork: [rows, pos, heads (q) or kv heads (k, v), d_model], pre-ln1 residual copies
        fork = fork.clone()
        for i, edge in enumerate(chunk):
            if edge.receiver.layer == layer and edge.kind == kind:
                index = edge.receiver.head if kind == "q" else edge.receiver.head // group
                fork[i * batch:(i + 1) * batch, :, index] += deltas[i].to(fork.dtype)
        return fork
    return hook


def _receiver_z_hook(chunk: Sequence[Edge], patched_z: dict[str, torch.Tensor], layer: int,
                     batch: int) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """Put each receiver's patched output ``z_B`` into the base run, at head B of its copy's rows only."""
    def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()  # [rows, pos, head, d_head]
        for i, edge in enumerate(chunk):
            if edge.receiver.layer == layer:
                rows, h = slice(i * batch, (i + 1) * batch), edge.receiver.head
                z[rows, :, h] = patched_z[z_hook(layer)][rows, :, h]
        return z
    return hook


def _patch_chunk(model: Any, chunk: Sequence[Edge], deltas: list[torch.Tensor], base_tokens: torch.Tensor,
                 padded: PaddedPairs, group: int) -> torch.Tensor:
    """``[len(chunk)]`` mean logit difference with each edge of ``chunk`` patched alone (two passes)."""
    batch = padded.n_prompts
    tokens = base_tokens.repeat(len(chunk), 1)
    receiver_layers = sorted({e.receiver.layer for e in chunk})
    fork_hooks = []
    for layer in receiver_layers:
        for kind in sorted({e.kind for e in chunk if e.receiver.layer == layer}):
            fork_hooks.append((qkv_input_hook(layer, kind),
                               _fork_hook(chunk, deltas, layer, kind, batch, group)))
    with _SplitQKVInput(model):
        _, patched_z = capture(model, tokens, [z_hook(l) for l in receiver_layers], fwd_hooks=fork_hooks,
                               stop_at_layer=receiver_layers[-1] + 1)
    z_hooks = [(z_hook(l), _receiver_z_hook(chunk, patched_z, l, batch)) for l in receiver_layers]
    logits = run_with_hooks(model, tokens, z_hooks)
    return mean_logit_difference(logits, padded, repeats=len(chunk))


def path_patch(model: Any, pairs: PromptPairs, edges: Sequence[Edge], direction: str = "noising",
               max_rows: int = MAX_ROWS_PER_PASS, progress: Optional[ProgressCallback] = None) -> PathPatchingResult:
    """Path-patch each edge alone and return its effect on the mean logit difference.

    ``pairs`` needs a corrupted twin, an answer and an alternative for every
    prompt; each prompt is scored at its last answer position.
    """
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}.")
    edges = list(dict.fromkeys(edges))
    _check_edges(model, edges)
    padded = pairs.padded()
    n_heads = int(model.cfg.n_heads)
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
    group = n_heads // n_kv
    device = next(iter(model.parameters())).device
    clean, corrupted = padded.clean.to(device), padded.corrupted.to(device)
    base_tokens, source_tokens = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    sender_layers = sorted({e.sender.layer for e in edges})
    per_pass = max(1, max_rows // padded.n_prompts)
    chunks = [edges[i:i + per_pass] for i in range(0, len(edges), per_pass)]
    results: list[dict] = []
    with exclusive(model):
        report(progress, 0.0, "clean and corrupted runs")
        sender_z = [z_hook(l) for l in sender_layers]
        base_logits, base_z = capture(model, base_tokens, sender_z)
        source_logits, source_z = capture(model, source_tokens, sender_z)
        base_metric = float(mean_logit_difference(base_logits, padded)[0])
        source_metric = float(mean_logit_difference(source_logits, padded)[0])
        clean_metric, corrupted_metric = ((base_metric, source_metric) if direction == "noising"
                                          else (source_metric, base_metric))
        del base_logits, source_logits
        W_O = {l: model.blocks[l].attn.W_O.detach() for l in sender_layers}  # [head, d_head, d_model]

        def write_delta(sender: HeadRef) -> torch.Tensor:  # [batch, pos, d_model]
            name, h = z_hook(sender.layer), sender.head
            return (source_z[name][:, :, h] - base_z[name][:, :, h]) @ W_O[sender.layer][h].to(base_z[name].dtype)

        for chunk_index, chunk in enumerate(chunks):
            deltas = [write_delta(e.sender) for e in chunk]
            metrics = _patch_chunk(model, chunk, deltas, base_tokens, padded, group)
            for edge, metric in zip(chunk, metrics.tolist()):
                results.append({"sender": str(edge.sender), "receiver": str(edge.receiver), "kind": edge.kind,
                                "patched": metric, "effect": metric - base_metric})
            report(progress, (chunk_index + 1) / len(chunks), f"{len(results)} of {len(edges)} edges patched")
    table = pd.DataFrame(results, columns=["sender", "receiver", "kind", "patched", "effect"])
    gap = clean_metric - corrupted_metric
    table["normalized"] = table["effect"] / gap if abs(gap) > 1e-9 else float("nan")
    return PathPatchingResult(table=table, clean_metric=clean_metric, corrupted_metric=corrupted_metric,
                              direction=direction, description=pairs.description)
