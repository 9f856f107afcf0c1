"""The deterministic shard plan of a scan, and scanning one shard into a partial state.

Shard ``i`` is windows ``[i * shard_windows, (i + 1) * shard_windows)`` of the
corpus (cut at ``max_windows``). It depends only on the scan's parameters,
never on the number of workers, so a one-process scan, a sharded scan and a
resumed one cut the corpus the same way. Batches never straddle a shard
(the batch size divides ``shard_windows``), so every window is run in the
same batch, with the same floating-point results, whoever scans it.

A shard's partial state is an ordinary :class:`ScanState` scanned from
empty; :meth:`ScanState.merge_state` folds partial states together exactly.
"""


import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from jaxtyping import Int

from headvis_core.data.corpus import Corpus, iter_window_batches
from headvis_core.models.loader import LoadedModel
from headvis_core.scan.params import ScanParams
from headvis_core.scan.run import new_state, scan_batch
from headvis_core.scan.state import ScanState
from headvis_core.tokens import bos_token_id


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first window
    stop: int  # one past the last window (the corpus may end before)


def shard(index: int, params: ScanParams) -> Shard:
    """Shard ``index`` of a scan with ``params``."""
    start = index * params.shard_windows
    stop = start + params.shard_windows
    if params.max_windows is not None:
        stop = min(stop, params.max_windows)
    return Shard(index, start, stop)


def n_shards(params: ScanParams) -> Optional[int]:
    """How many shards ``max_windows`` makes (``None``: until the corpus ends)."""
    return None if params.max_windows is None else math.ceil(params.max_windows / params.shard_windows)


def shard_batch_size(batch_size: int, params: ScanParams) -> int:
    """The largest batch size up to ``batch_size`` that divides the shard (no batch straddles two shards)."""
    return math.gcd(batch_size, params.shard_windows)


def with_bos(tokens: np.ndarray, bos: Optional[int]) -> Int[torch.Tensor, "batch pos"]:
    """``tokens [batch, window]`` as a tensor, with BOS in front where the model uses one."""
    seq = torch.from_numpy(tokens)
    if bos is not None:
        seq = torch.cat([torch.full((seq.shape[0], 1), bos, dtype=seq.dtype), seq], dim=1)
    return seq


def scan_windows(loaded: LoadedModel, corpus: Corpus, state: ScanState, start: int, stop: int,
                 batch_size: int) -> Iterator[int]:
    """Fold windows ``[start, stop)`` into ``state`` batch by batch, yielding the windows done after each."""
    bos = bos_token_id(loaded.model)
    params = state.params
    for batch in iter_window_batches(corpus, loaded.model.tokenizer, params.window_len,
                                     shard_batch_size(batch_size, params), stop, start=start):
        scan_batch(loaded.model, state, with_bos(batch.tokens, bos), batch.indices, device=loaded.info.device)
        yield state.n_windows


def scan_shard(loaded: LoadedModel, corpus: Corpus, params: ScanParams, index: int, batch_size: int,
               on_batch: Optional[Callable[[int], None]] = None) -> ScanState:
    """The partial state of shard ``index`` (its token summary merged: ready for ``merge_state``).

    ``on_batch(windows done in the shard)`` is called after every batch (progress).
    """
    part = shard(index, params)
    state = new_state(loaded, params)
    for done in scan_windows(loaded, corpus, state, part.start, part.stop, batch_size):
        if on_batch is not None:
            on_batch(done)
    state.end_shard()
    return state
