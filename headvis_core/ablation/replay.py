"""Block replay: running blocks ``l..L-1`` from a residual stream without recomputing the blocks below.

TransformerBridge's own ``forward(start_at_layer=l)`` accepts a residual
stream but still executes blocks ``0..l-1`` internally (it discards their
output), so the ablation runner drives the bridge's blocks itself, replaying
the exact arguments each block received in a clean pass. The runner checks
the replay against the full forward before relying on it.
"""


from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from transformers.cache_utils import Cache

from headvis_core import hooks


class BlockReplay:
    """Calls the bridge's blocks with the arguments they received in a clean pass.

    The recorded arguments (attention mask, rotary position embeddings,
    position ids) depend only on the sequence length, so one recording per
    length serves any batch size; the KV cache object is dropped so the
    replay neither reads nor grows a cache.
    """

    def __init__(self, model: Any, tokens_1: torch.Tensor):
        self.model = model
        self.calls: dict[int, tuple[tuple, dict]] = {}

        def strip(value: Any) -> Any:
            return None if isinstance(value, Cache) else value

        def recorder(index: int) -> Callable:
            def record(module: Any, args: tuple, kwargs: dict) -> None:
                if index not in self.calls:
                    kwargs = {k: strip(v) for k, v in kwargs.items()}
                    if "use_cache" in kwargs:
                        kwargs["use_cache"] = False
                    self.calls[index] = (tuple(strip(a) for a in args[1:]), kwargs)
            return record

        # Under the model's lock, so no other session's pass is recorded.
        with hooks.exclusive(model):
            handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True)
                       for i, block in enumerate(model.blocks)]
            try:
                hooks.forward(model, tokens_1)
            finally:
                for handle in handles:
                    handle.remove()
        if len(self.calls) != len(model.blocks):
            raise RuntimeError("not every block was called with (hidden_states, ...)")

    def block(self, index: int,
              hidden: Float[torch.Tensor, "rows pos d_model"]) -> Float[torch.Tensor, "rows pos d_model"]:
        args, kwargs = self.calls[index]
        out = self.model.blocks[index](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: Float[torch.Tensor, "rows pos d_model"],
               positions: Sequence[int]) -> Float[torch.Tensor, "rows n_ans vocab"]:
        """``[rows, len(positions), vocab]`` from the final residual ``[rows, pos, d_model]``."""
        return self.model.unembed(self.model.ln_final(hidden[:, list(positions)]))
