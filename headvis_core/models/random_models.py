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
    arch: Literal["gpt2", "llama"] = "gpt2"
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # llama only; None means n_heads (no GQA)
    d_model: int = 64
    n_ctx: int = 256
    d_vocab: int = 257  # at least the tokenizer's 257 tokens
    seed: int = 0

    @property
    def key(self) -> str:
        kv = f"kv{self.n_kv_heads}" if self.n_kv_heads else ""
        return (f"{self.arch}-L{self.n_layers}H{self.n_heads}{kv}-d{self.d_model}"
                f"-ctx{self.n_ctx}-v{self.d_vocab}-s{self.seed}")


RANDOM_PRESETS: dict[str, RandomModelSpec] = {
    "tiny-gpt2": RandomModelSpec(arch="gpt2", n_layers=2, n_heads=4, d_model=64),
    "tiny-llama": RandomModelSpec(arch="llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64),
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
    from transformers import GPT2Config, LlamaConfig

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
