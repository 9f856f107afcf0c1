"""Small randomly initialised models that need no download.

Used by the fast test tier, by benchmarks (a model of GPT-2 small's shape)
and for edge cases such as a single layer or a single head. The config and a
byte-level tokenizer (256 byte tokens plus ``<|endoftext|>`` as BOS/EOS) are
written to the cache; weights are drawn from the architecture's own
initialiser under a fixed seed, so the same spec always gives the same model.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from headvis_core.paths import models_dir

BOS = "<|endoftext|>"


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


def random_model_dir(spec: RandomModelSpec) -> Path:
    """Write (once) the config and tokenizer for ``spec``; return the directory."""
    folder = models_dir() / "random" / spec.key
    marker = folder / "headvis_random_spec.json"
    if not marker.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        _hf_config(spec).save_pretrained(folder)
        _byte_tokenizer().save_pretrained(folder)
        marker.write_text(json.dumps(asdict(spec), indent=2))
    return folder
