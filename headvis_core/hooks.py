"""Running a shared model with hooks, safely across browser sessions.

TransformerLens hooks are registered on the model's modules, so a hook added
by one Streamlit session would fire in another session's forward pass if two
ran at once on the cached model. Every forward pass in the workbench goes
through the helpers here, which hold a per-model lock for the duration of the
pass, add the hooks, and remove them before the lock is released.
"""


import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from jaxtyping import Int
from transformer_lens.utilities import get_act_name

HookFn = Callable[[torch.Tensor, Any], Optional[torch.Tensor]]


def pattern_hook(layer: int) -> str:
    """``blocks.{layer}.attn.hook_pattern``: post-softmax attention ``[batch, head, query, key]``."""
    return get_act_name("pattern", layer)


def z_hook(layer: int) -> str:
    """``blocks.{layer}.attn.hook_z``: each head's output before ``W_O``, where heads are ablated."""
    return get_act_name("z", layer)


def qkv_input_hook(layer: int, kind: str) -> str:
    """``blocks.{layer}.attn.hook_{q,k,v}_input``: the per-head copy of the residual stream feeding ``kind``.

    Exists while ``use_split_qkv_input`` is on. ``get_act_name`` names the HookedTransformer location
    (``blocks.{layer}.hook_q_input``); the bridge keeps these forks on its attention component.
    """
    return f"blocks.{layer}.attn.hook_{kind}_input"


def resid_pre_hook(layer: int) -> str:
    """``blocks.{layer}.hook_resid_pre``: the residual stream entering block ``layer``."""
    return get_act_name("resid_pre", layer)


_locks: "weakref.WeakKeyDictionary[Any, threading.RLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The re-entrant lock that serialises all hooked runs of ``model``."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


@contextmanager
def exclusive(model: Any) -> Iterator[Any]:
    """Hold ``model`` for a sequence of passes that must not interleave with other sessions."""
    with model_lock(model), torch.no_grad():
        yield model


def run_with_hooks(model: Any, tokens: Int[torch.Tensor, "batch pos"], fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
                   **kwargs: Any) -> Any:
    """``model.run_with_hooks`` under the model's lock and ``no_grad``; hooks are removed on return."""
    with exclusive(model):
        try:
            return model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), **kwargs)
        finally:
            model.reset_hooks(including_permanent=False)


def capture(model: Any, tokens: Int[torch.Tensor, "batch pos"], hook_names: Iterable[str],
            fwd_hooks: Sequence[tuple[Any, HookFn]] = (), stop_at_layer: Optional[int] = None,
            **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run once and return ``(output, {hook_name: activation})`` for just the named hooks.

    Cheaper than ``run_with_cache`` when only a few hooks are needed, and
    ``stop_at_layer`` skips the blocks above the last one needed (the output
    is then ``None``). Capturing hooks run after ``fwd_hooks``, so they see
    interventions.
    """
    captured: dict[str, torch.Tensor] = {}

    def store_as(name: str) -> HookFn:
        # Keyed by the name asked for: the bridge reports aliases such as
        # hook_z under their canonical name (attn.o.hook_in).
        def store(tensor: torch.Tensor, hook: Any) -> None:
            captured[name] = tensor.detach()

        return store

    hooks = list(fwd_hooks) + [(name, store_as(name)) for name in dict.fromkeys(hook_names)]
    output = None
    with exclusive(model):
        try:
            output = model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=stop_at_layer, **kwargs)
        finally:
            model.reset_hooks(including_permanent=False)
    return (None if stop_at_layer is not None else output), captured


def forward(model: Any, tokens: Int[torch.Tensor, "batch pos"], **kwargs: Any) -> Any:
    """A plain forward pass under the model's lock (no other session's hooks can fire)."""
    with exclusive(model):
        return model(tokens, **kwargs)
