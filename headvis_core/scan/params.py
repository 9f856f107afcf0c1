"""What a dataset scan computes: its parameters, all of which go into the result's key."""

from dataclasses import dataclass
from typing import Optional

from headvis_core.errors import InputError
from headvis_core.scan.heavy_hitters import MAX_FIXED_TOKENS

N_DECILES = 10


@dataclass(frozen=True)
class ScanParams:
    """What a scan computes (all of it goes into the result key)."""

    window_len: int = 64  # corpus tokens per window, BOS not counted
    max_windows: Optional[int] = 1000  # None: the whole corpus
    examples_per_decile: int = 4
    top_examples: int = 8
    top_k_keys: int = 4  # sparse attention kept per query of an example
    reservoir_size: Optional[int] = None  # None: 40 x examples_per_decile
    histogram_bins: int = 4096
    seed: int = 0
    # Windows per shard: the unit of work of a sharded scan (scan/shards.py) and the step at which the
    # token summaries are merged, so a one-process scan and a sharded one merge the same summaries.
    shard_windows: int = 256
    token_capacity: int = 1024  # counters per head and role of the top-token summary (scan/heavy_hitters.py)

    @property
    def reservoir(self) -> int:
        return int(self.reservoir_size or 4 * N_DECILES * self.examples_per_decile)

    def check(self, n_ctx: int) -> None:
        longest = min(n_ctx, 32767)  # token positions are stored as int16
        if not 2 <= self.window_len < longest:
            raise InputError(f"The window length must be between 2 and {longest - 1} tokens for this "
                             f"model (context {n_ctx}, one position for BOS); got {self.window_len}.")
        if self.max_windows is not None and self.max_windows < 1:
            raise InputError("The number of windows must be at least 1.")
        # the attention weight sums are int64 in 2**-30 units (scan/heavy_hitters.py): at most
        # 2**33 tokens of queries; a whole-corpus scan (no max) is checked as it merges instead
        if self.max_windows is not None and self.max_windows * (self.window_len + 1) > MAX_FIXED_TOKENS:
            raise InputError(f"{self.max_windows} windows of {self.window_len} tokens are more than one scan's "
                             f"fixed-point sums hold ({MAX_FIXED_TOKENS} tokens); scan fewer windows.")
        for name in ("examples_per_decile", "top_examples", "top_k_keys", "histogram_bins", "shard_windows",
                     "token_capacity"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be at least 1.")
