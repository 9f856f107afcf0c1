"""Loading a model into TransformerLens 4's ``TransformerBridge``.

One entry point, :func:`load_model`, accepts a short name from
:mod:`headvis_core.models.registry`, a local HF-format directory, or a Hugging Face
id, and returns a :class:`LoadedModel`: the bridge plus a :class:`ModelInfo`
with what the pages need to know. Every failure a user can cause is raised as
a :class:`~headvis_core.errors.ModelLoadError` with a readable message; a hub
name with no network fails within seconds instead of retrying for minutes.
"""

import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from headvis_core.errors import (
    ModelLoadError,
    ModelNeedsNetworkError,
    NotEnoughMemoryError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from headvis_core.models.devices import resolve_device, resolve_dtype
from headvis_core.models.offline import fetch_offline_model, is_fetched, verify_offline_model
from headvis_core.models.random_models import RANDOM_PRESETS, RandomModelSpec, random_model_dir
from headvis_core.models.registry import KNOWN_MODELS
from headvis_core.progress import ProgressCallback, report, scaled

HUB_PROBE_TIMEOUT_S = 4.0


@dataclass(frozen=True)
class ModelInfo:
    """What the pages need to know about a loaded model."""

    name: str  # as the user gave it
    source: str  # local directory or hub id actually loaded
    architecture: str
    n_layers: int
    n_heads: int  # query heads per layer
    n_kv_heads: int  # key/value heads per layer (< n_heads under grouped-query attention)
    d_head: int
    d_model: int
    d_vocab: int
    n_ctx: int
    prepends_bos: bool
    n_params: int
    device: str
    dtype: str
    load_seconds: float

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def is_gqa(self) -> bool:
        return self.n_kv_heads < self.n_heads

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: Any  # transformer_lens.model_bridge.TransformerBridge
    info: ModelInfo


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "offline", "random", "local" or "hub"
    target: str  # directory, or hub id
    random_init: bool = False


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub answers a TCP connect within ``timeout`` seconds.

    DNS lookups cannot be given a timeout, so the probe runs in a daemon
    thread and is abandoned if it takes too long.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _cached_hub_snapshot(repo_id: str) -> Optional[Path]:
    """The local snapshot folder of a hub model that was downloaded before, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    if isinstance(config, str) and any(Path(config).parent.glob("*.safetensors")) or (
            isinstance(config, str) and any(Path(config).parent.glob("*.bin"))):
        return Path(config).parent
    return None


def resolve_source(name: str, progress: Optional[ProgressCallback] = None) -> ResolvedSource:
    """Turn what the user typed into something ``boot_transformers`` can load."""
    name = (name or "").strip()
    if not name:
        raise UnknownModelError("No model name given.")
    known = KNOWN_MODELS.get(name.lower())
    if known and known.kind == "offline":
        fetch_offline_model(known.target, progress=progress)  # a no-op once fetched
        report(progress, 0.95, f"checking the checksums of {name}")
        return ResolvedSource("offline", str(verify_offline_model(known.target)))
    if known and known.kind == "random":
        return ResolvedSource("random", str(random_model_dir(RANDOM_PRESETS[known.target])), random_init=True)
    path = Path(name).expanduser()
    if known is None and (path.exists() or name.startswith((".", "/", "~"))):
        if not path.is_dir():
            raise UnknownModelError(f"{name!r} is not a directory. Give a folder holding an HF-format model "
                                    "(config.json and weights).")
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"The folder {name!r} has no config.json, so it is not an HF-format model.")
        return ResolvedSource("local", str(path.resolve()))
    repo_id = known.target if known else name
    snapshot = _cached_hub_snapshot(repo_id)
    if snapshot is not None:
        return ResolvedSource("local", str(snapshot))
    if not hub_reachable():
        offline = ", ".join(n for n, m in KNOWN_MODELS.items() if m.kind in ("offline", "random"))
        raise ModelNeedsNetworkError(
            f"{name!r} is a Hugging Face hub model ({repo_id}) and needs the network, which this machine "
            f"cannot reach. Use a model that works offline ({offline}) or give a local directory that "
            "holds an HF-format model.")
    return ResolvedSource("hub", repo_id)


def _load_hf_config(target: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(target)
    except Exception as err:
        text = str(err)
        if "does not recognize this architecture" in text or "model_type" in text:
            raise UnsupportedArchitectureError(f"transformers does not know the architecture of {target!r}: "
                                               f"{text[:300]}") from err
        raise UnknownModelError(f"No model called {target!r} could be found ({type(err).__name__}: "
                                f"{text[:300]}). Check the name, or give a local directory.") from err


def _count_parameters(config) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in empty.parameters())
    except Exception:
        return 0  # unknown; the boot itself will tell if it cannot be built


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory(n_params: int, dtype: torch.dtype, device: str, name: str) -> None:
    """Refuse to load a model whose weights (plus 20% for the load) will not fit."""
    needed = int(n_params * torch.finfo(dtype).bits / 8 * 1.2)
    available = _available_bytes(device)
    if needed > available:
        raise NotEnoughMemoryError(
            f"{name!r} has {n_params / 1e6:.0f}M parameters and needs about {needed / 2**30:.1f} GiB on {device}, "
            f"but only {available / 2**30:.1f} GiB is free. Try a smaller model or a 16-bit dtype.")


def load_model(name: str, device: Optional[str] = None, dtype: str | torch.dtype | None = "float32",
               progress: Optional[ProgressCallback] = None) -> LoadedModel:
    """Load ``name`` as a ``TransformerBridge`` in eval mode with gradients off.

    Args:
        name: a short name (``smollm2-135m``, ``gpt2``, ``tiny-llama``...), a
            local HF-format directory, or a Hugging Face id.
        device: ``None``/``"auto"`` (cuda, then mps, then cpu), or a device string.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        progress: called with (fraction, message) during fetch and load.
    """
    started = time.time()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    report(progress, 0.0, f"resolving {name}")
    source = resolve_source(name, progress=scaled(progress, 0.0, 0.7))
    seed = RANDOM_PRESETS[name.lower()].seed if source.random_init else None
    report(progress, 0.75, f"booting {name} in TransformerLens on {device}")
    loaded = _boot(name, source, device, torch_dtype, seed, started)
    report(progress, 1.0, f"{name} loaded")
    return loaded


def load_random_model(spec: RandomModelSpec, device: Optional[str] = "cpu",
                      dtype: str | torch.dtype | None = "float32") -> LoadedModel:
    """A randomly initialised model of any shape (one layer, one head, GQA...), same weights for the same spec."""
    source = ResolvedSource("random", str(random_model_dir(spec)), random_init=True)
    return _boot(f"random:{spec.key}", source, resolve_device(device), resolve_dtype(dtype), spec.seed, time.time())


def _boot(name: str, source: ResolvedSource, device: str, torch_dtype: torch.dtype, seed: Optional[int],
          started: float) -> LoadedModel:
    from transformer_lens.model_bridge import TransformerBridge

    config = _load_hf_config(source.target)
    n_params = _count_parameters(config)
    check_memory(n_params, torch_dtype, device, name)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        bridge = TransformerBridge.boot_transformers(source.target, device=device, dtype=torch_dtype,
                                                     load_weights=seed is None)
    except ModelLoadError:
        raise
    except MemoryError as err:
        raise NotEnoughMemoryError(f"Ran out of memory while loading {name!r}.") from err
    except ValueError as err:
        if "architecture" in str(err).lower():
            archs = getattr(config, "architectures", None) or [getattr(config, "model_type", "?")]
            raise UnsupportedArchitectureError(
                f"TransformerLens cannot hook {name!r}: its architecture {', '.join(archs)} is not supported "
                f"({err}).") from err
        raise ModelLoadError(f"Could not load {name!r}: {err}") from err
    except OSError as err:
        raise UnknownModelError(f"Could not load {name!r}: {err}") from err
    bridge.eval()  # boot leaves randomly initialised models in train mode (dropout on)
    bridge.requires_grad_(False)
    info = _model_info(name, source.target, bridge, config, n_params, device, torch_dtype, time.time() - started)
    return LoadedModel(model=bridge, info=info)


def _model_info(name, target, bridge, config, n_params, device, dtype, seconds) -> ModelInfo:
    cfg = bridge.cfg
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    archs = getattr(config, "architectures", None) or [type(bridge.original_model).__name__]
    return ModelInfo(
        name=name, source=target, architecture=archs[0], n_layers=int(cfg.n_layers), n_heads=n_heads,
        n_kv_heads=int(n_kv), d_head=int(cfg.d_head), d_model=int(cfg.d_model), d_vocab=int(cfg.d_vocab),
        n_ctx=int(cfg.n_ctx), prepends_bos=bool(getattr(cfg, "default_prepend_bos", True)),
        # parameters() counts tied embedding/unembedding weights once, unlike the config estimate
        n_params=int(sum(p.numel() for p in bridge.original_model.parameters()) or n_params),
        device=str(device), dtype=str(dtype).replace("torch.", ""), load_seconds=round(seconds, 2))


def available_offline(name: str) -> bool:
    """Whether ``name`` can be loaded right now with no network."""
    known = KNOWN_MODELS.get(name.lower())
    if known is None:
        return Path(name).expanduser().is_dir()
    if known.kind == "random":
        return True
    if known.kind == "offline":
        return is_fetched(known.target)
    return _cached_hub_snapshot(known.target) is not None
