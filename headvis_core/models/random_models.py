"""Small randomly initialised models that need no download.

Used by the fast test tier, by benchmarks (a model of GPT-2 small's shape)
and for edge cases such as a single layer or a single head. The config and a
byte-level tokenizer (256 byte tokens plus ``<|endoftext|>`` as BOS/EOS) are
written to the cache; weights are drawn from the architecture's own
initialiser under a fixed seed, so the same spec always gives the same model.

Files in the cache are written once and whole (:func:`write_folder_once`): into a unique
staging folder beside the target, renamed into place under a lock that serialises this
process's threads (two Streamlit sessions) and other processes (a file lock), so a folder
that exists is complete, and a crashed writer's staging folder is removed once stale.
"""

import json
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

from filelock import FileLock

from headvis_core.errors import ModelLoadError
from headvis_core.paths import models_dir

BOS = "<|endoftext|>"
SPEC_FILE = "headvis_random_spec.json"  # written last: marks a complete folder (earlier versions wrote in place)


@dataclass(frozen=True)
class RandomModelSpec:
    arch: Literal["gpt2", "llama", "gemma3"] = "gpt2"
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # llama/gemma3 only; None means n_heads (no GQA)
    d_model: int = 64
    n_ctx: int = 256
    d_vocab: int = 257  # at least the tokenizer's 257 tokens
    seed: int = 0
    # gemma3 only: every ``global_every``-th layer attends to all earlier keys,
    # the others only to the last ``sliding_window`` positions (the query's own included)
    sliding_window: int | None = None
    global_every: int = 6

    @property
    def key(self) -> str:
        kv = f"kv{self.n_kv_heads}" if self.n_kv_heads else ""
        window = f"-w{self.sliding_window}g{self.global_every}" if self.sliding_window else ""
        return (f"{self.arch}-L{self.n_layers}H{self.n_heads}{kv}-d{self.d_model}"
                f"-ctx{self.n_ctx}-v{self.d_vocab}{window}-s{self.seed}")

    @property
    def layer_types(self) -> list[str]:
        """``"sliding_attention"`` or ``"full_attention"`` per layer, as Gemma 3's config names them."""
        return ["full_attention" if self.sliding_window is None or (layer + 1) % self.global_every == 0
                else "sliding_attention" for layer in range(self.n_layers)]


RANDOM_PRESETS: dict[str, RandomModelSpec] = {
    "tiny-gpt2": RandomModelSpec(arch="gpt2", n_layers=2, n_heads=4, d_model=64),
    "tiny-llama": RandomModelSpec(arch="llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64),
    # Gemma 3's quirks in miniature: QK-norm, one KV head for 4 query heads, and a
    # sliding window of 8 positions on layers 0 and 1 (layer 2 is global)
    "tiny-gemma3": RandomModelSpec(arch="gemma3", n_layers=3, n_heads=4, n_kv_heads=1, d_model=64,
                                   sliding_window=8, global_every=3),
    "gpt2-small-random": RandomModelSpec(arch="gpt2", n_layers=12, n_heads=12, d_model=768,
                                         n_ctx=1024, d_vocab=50257),
}


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab[BOS] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=BOS, unk_token=BOS)


def _hf_config(spec: RandomModelSpec):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig

    bos_id = 256
    if spec.arch == "gpt2":
        config = GPT2Config(n_layer=spec.n_layers, n_head=spec.n_heads, n_embd=spec.d_model,
                            n_positions=spec.n_ctx, vocab_size=spec.d_vocab, bos_token_id=bos_id,
                            eos_token_id=bos_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        config.architectures = ["GPT2LMHeadModel"]
    elif spec.arch == "llama":
        config = LlamaConfig(num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                             num_key_value_heads=spec.n_kv_heads or spec.n_heads, hidden_size=spec.d_model,
                             head_dim=spec.d_model // spec.n_heads, intermediate_size=4 * spec.d_model,
                             max_position_embeddings=spec.n_ctx, vocab_size=spec.d_vocab,
                             bos_token_id=bos_id, eos_token_id=bos_id, tie_word_embeddings=True)
        config.architectures = ["LlamaForCausalLM"]
    elif spec.arch == "gemma3":
        d_head = spec.d_model // spec.n_heads
        config = Gemma3TextConfig(num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                                  num_key_value_heads=spec.n_kv_heads or spec.n_heads,
                                  hidden_size=spec.d_model, head_dim=d_head, query_pre_attn_scalar=d_head,
                                  intermediate_size=4 * spec.d_model, max_position_embeddings=spec.n_ctx,
                                  vocab_size=spec.d_vocab, sliding_window=spec.sliding_window or spec.n_ctx,
                                  layer_types=spec.layer_types, bos_token_id=bos_id, eos_token_id=bos_id,
                                  pad_token_id=None, tie_word_embeddings=True)
        config.architectures = ["Gemma3ForCausalLM"]
    else:
        raise ValueError(f"unknown random architecture {spec.arch!r}")
    return config


# Held while any thread builds a model or first imports transformers' model classes (its lazy
# module is not thread-safe: "cannot import name 'Gemma3TextConfig'"). accelerate's
# init_empty_weights (the loader's memory check) patches torch for the whole process, so another
# thread's from_config inside it got meta weights ("Cannot copy out of meta tensor"); and a random
# model's weights are drawn from torch's global RNG after seeding it, which a concurrent
# construction would advance. Reentrant, as the loader holds it around helpers that take it too.
# Never held while waiting for folder_write_lock (which may take it): no deadlock.
MODEL_CONSTRUCTION_LOCK = threading.RLock()
# a staging folder untouched this long belongs to a writer that died (a live one writes within seconds)
STALE_PARTIAL_AGE_S = 600.0
PARTIAL_INFIX = ".partial-"
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextmanager
def folder_write_lock(folder: Path) -> Iterator[None]:
    """Hold the right to write ``folder``: one thread of this process (a threading lock), one
    process (a file lock ``<folder>.lock`` beside it). Raises ``OSError`` where the parent is unwritable."""
    with _THREAD_LOCKS_GUARD:
        thread_lock = _THREAD_LOCKS.setdefault(str(folder), threading.Lock())
    with thread_lock, FileLock(str(folder.with_name(folder.name + ".lock"))):
        yield


def _last_written(partial: Path) -> float:
    """The newest modification time of a staging folder and the files in it (a writer updates them)."""
    return max([partial.stat().st_mtime] + [child.stat().st_mtime for child in partial.iterdir()])


def remove_stale_partials(folder: Path, max_age_s: float = STALE_PARTIAL_AGE_S) -> list[Path]:
    """Remove the staging folders of ``folder`` that nobody has written for ``max_age_s`` seconds.

    They are what a writer killed mid-write leaves (a GPT-2 small checkpoint is ~475 MiB).
    Best effort: a folder that cannot be read or removed (a read-only cache) is left.
    """
    removed = []
    for partial in folder.parent.glob(folder.name + PARTIAL_INFIX + "*"):
        try:
            stale = time.time() - _last_written(partial) > max_age_s
        except OSError:  # removed meanwhile by another cleaner
            continue
        if stale:
            shutil.rmtree(partial, ignore_errors=True)
            if not partial.exists():
                removed.append(partial)
    return removed


def write_folder_once(folder: Path, write: Callable[[Path], None],
                      is_complete: Callable[[Path], bool] = Path.is_dir) -> Path:
    """Make ``folder`` with ``write`` unless it is there already; a folder there is always complete.

    ``write`` fills a unique staging folder beside ``folder`` (``tempfile.mkdtemp``), which is
    renamed into place (atomic on one filesystem) under :func:`folder_write_lock`, so two threads
    or processes never write into one folder and never see half of one; the first writes, the
    others wait and find it done. A failed ``write`` leaves nothing behind. ``is_complete`` tells
    a finished folder from one an earlier version left half-written (removed and written again).
    Raises ``OSError`` (an unwritable or full cache) for the caller to explain.
    """
    remove_stale_partials(folder)
    if is_complete(folder):  # no lock needed to read a finished folder (a read-only cache works)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with folder_write_lock(folder):
        if is_complete(folder):  # written by another thread or process while this one waited
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + PARTIAL_INFIX))
        try:
            staging.chmod(0o755)  # mkdtemp's 0o700 would hide the folder from a shared cache's other users
            write(staging)
            os.rename(staging, folder)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if is_complete(folder):  # a writer that takes no lock (an earlier version) won the rename
                return folder
            raise
        except BaseException:  # an interrupt or a failed write: leave nothing half-written
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return folder


def random_model_dir(spec: RandomModelSpec) -> Path:
    """Write (once) the config and tokenizer for ``spec``; return the directory.

    Raises ``ModelLoadError`` naming the folder where the cache cannot be written.
    """
    folder = models_dir() / "random" / spec.key

    def write(staging: Path) -> None:
        with MODEL_CONSTRUCTION_LOCK:
            config, tokenizer = _hf_config(spec), _byte_tokenizer()
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))

    try:
        return write_folder_once(folder, write, is_complete=lambda path: (path / SPEC_FILE).is_file())
    except OSError as err:
        raise ModelLoadError(
            f"Could not write the random model {spec.key!r} (config and tokenizer) to {folder}: "
            f"{err.strerror or err}. Make the cache folder writable, or point HEADVIS_HOME at one that is.") from err
