"""Loading a model into TransformerLens 4's ``TransformerBridge``.

One entry point, :func:`load_model`, accepts a short name from
:mod:`headvis_core.models.registry`, a local HF-format directory, or a Hugging Face
id, and returns a :class:`LoadedModel`: the bridge plus a :class:`ModelInfo`
with what the pages need to know. Every failure a user can cause is raised as
a :class:`~headvis_core.errors.ModelLoadError` with a readable message; a hub
name with no network fails within seconds instead of retrying for minutes.
"""

import json
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
    InputError,
    ModelLoadError,
    ModelNeedsNetworkError,
    NotEnoughMemoryError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from headvis_core.limits import gib
from headvis_core.models.devices import (
    Placement,
    n_cuda_devices,
    resolve_dtype,
    resolve_placement,
    target_device,
)
from headvis_core.models.offline import fetch_offline_model, is_fetched, verify_offline_model
from headvis_core.models.random_models import (
    MODEL_CONSTRUCTION_LOCK,
    RANDOM_PRESETS,
    RandomModelSpec,
    random_model_dir,
    write_folder_once,
)
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
    device: str  # where the inputs go: the device, or under a split the input embedding's device
    dtype: str
    load_seconds: float
    # the placement: None on one device, else the strategy or the module -> device dict (JSON text)
    device_map: Optional[str] = None
    n_devices: int = 1  # devices the weights are spread over (the bridge's cfg.n_devices)

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


def _empty_model(config) -> Optional[torch.nn.Module]:
    """The model's modules with weights on the meta device (no memory), or None if it cannot be built."""
    try:
        with MODEL_CONSTRUCTION_LOCK:
            from accelerate import init_empty_weights
            from transformers import AutoModelForCausalLM

            with init_empty_weights():
                empty = AutoModelForCausalLM.from_config(config)
        empty.tie_weights()  # not done on meta weights: tied weights would count (and be placed) twice
        return empty
    except Exception:
        return None  # unknown; the boot itself will tell if it cannot be built


def _available_bytes(device: str) -> int:
    """Free memory on ``device`` now (a GPU's own free memory; host memory for cpu and mps)."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def weight_bytes_needed(n_params: int, dtype: torch.dtype) -> int:
    """Bytes to load ``n_params`` weights of ``dtype``, plus 20% for the load itself."""
    return int(n_params * torch.finfo(dtype).bits / 8 * 1.2)


def check_memory(n_params: int, dtype: torch.dtype, device: str, name: str) -> None:
    """Refuse to load a model whose weights (plus 20% for the load) will not fit."""
    check_split_memory({device: n_params}, dtype, name)


def check_split_memory(params_per_device: dict[str, int], dtype: torch.dtype, name: str,
                       budgets: Optional[dict[str, int]] = None) -> None:
    """Refuse a placement where some device's share of the weights (plus 20%) will not fit on it.

    ``params_per_device``: parameters each device receives. ``budgets``: where the dispatcher
    chooses the shares itself (a strategy, ``n_devices``), the most each device may take: then
    the whole model must fit in the sum of the budgets, each capped by its device's free memory.
    """
    n_params = sum(params_per_device.values())
    if budgets is not None:
        capacity = {device: min(budget, _available_bytes(device)) for device, budget in budgets.items()}
        needed = weight_bytes_needed(n_params, dtype)
        if needed > sum(capacity.values()):
            shares = ", ".join(f"{gib(b)} on {d}" for d, b in capacity.items())
            raise NotEnoughMemoryError(
                f"{name!r} has {n_params / 1e6:.3g}M parameters and needs about {gib(needed)} across its devices, "
                f"but the split can use only {gib(sum(capacity.values()))} ({shares}: each device's budget or its "
                "free memory, whichever is less). Add devices, raise max_memory, or use a 16-bit dtype.")
        return
    for device, count in params_per_device.items():
        needed = weight_bytes_needed(count, dtype)
        available = _available_bytes(device)
        if needed > available:
            share = "" if len(params_per_device) == 1 else f" for its {count / 1e6:.3g}M parameters mapped there"
            raise NotEnoughMemoryError(
                f"{name!r} has {n_params / 1e6:.3g}M parameters and needs about {gib(needed)} on {device}{share}, "
                f"but only {gib(available)} is free. Try a smaller model, a 16-bit dtype"
                + (", or a split over more devices." if device.startswith("cuda") else "."))


def _module_target(name: str, device_map: dict) -> Optional[str]:
    """The key of ``device_map`` that places parameter ``name``: the longest module name it lies under."""
    best = None
    for module in device_map:
        if module == "" or name == module or name.startswith(module + "."):
            if best is None or len(module) > len(best):
                best = module
    return best


def params_per_device(placement: Placement, empty: Optional[torch.nn.Module], n_params: int,
                      name: str) -> dict[str, int]:
    """How many parameters each device receives under ``placement``; checks a dict map against the model.

    A dict map must name modules of this model, place every parameter, and keep tied weights
    (e.g. the embedding and the unembedding) on one device, or accelerate would fail mid-load.
    """
    if not placement.is_split:
        return {placement.device: n_params}
    if not isinstance(placement.device_map, dict) or empty is None:
        return {}  # the dispatcher chooses the shares (see check_split_memory's budgets)
    device_map = placement.device_map
    modules = dict(empty.named_modules())
    unknown = [m for m in device_map if m != "" and m not in modules]
    if unknown:
        children = ", ".join(n for n, _ in empty.named_children())
        raise InputError(f"device_map names {', '.join(map(repr, unknown[:5]))}, which {name!r} does not have. "
                         f"Module names look like {_example_modules(empty)} (top level: {children}).")
    counts: dict[str, int] = {}
    owners: dict[int, set[str]] = {}
    seen: set[int] = set()
    for parameter_name, parameter in empty.named_parameters(remove_duplicate=False):
        module = _module_target(parameter_name, device_map)
        if module is None:
            raise InputError(f"device_map places no module holding {parameter_name!r}: add it (or a module above "
                             "it, \"\" for the whole model).")
        device = target_device(device_map[module])
        owners.setdefault(id(parameter), set()).add(device)
        if id(parameter) not in seen:
            seen.add(id(parameter))
            counts[device] = counts.get(device, 0) + parameter.numel()
    split_ties = [devices for devices in owners.values() if len(devices) > 1]
    if split_ties:
        raise InputError(f"device_map puts tied weights (one tensor shared by two modules, such as the embedding and "
                         f"the unembedding) on {' and '.join(sorted(split_ties[0]))}: map them to the same device.")
    return counts


def _example_modules(empty: torch.nn.Module) -> str:
    names = [n for n, _ in empty.named_modules() if n.count(".") <= 2 and n][:4]
    return ", ".join(map(repr, names))


def _dispatch_budgets(placement: Placement) -> dict[str, int]:
    """The per-device budgets a strategy or ``n_devices`` may fill (GPUs only where there are GPUs).

    With no ``max_memory`` the dispatcher would spill what does not fit on the GPUs to the CPU,
    a mix the bridge refuses after the weights are read; so the GPUs' free memory is the budget.
    """
    if placement.max_memory is not None:
        return {target_device(k): v for k, v in placement.max_memory.items()}
    if placement.n_devices is not None and placement.device_map is None:
        return {f"cuda:{i}": _available_bytes(f"cuda:{i}") for i in range(placement.n_devices)}
    gpus = n_cuda_devices()
    if gpus:
        return {f"cuda:{i}": _available_bytes(f"cuda:{i}") for i in range(gpus)}
    return {"cpu": _available_bytes("cpu")}


def load_model(name: str, device: Optional[str] = None, dtype: str | torch.dtype | None = "float32",
               progress: Optional[ProgressCallback] = None, device_map: Any = None,
               n_devices: Optional[int] = None, max_memory: Any = None) -> LoadedModel:
    """Load ``name`` as a ``TransformerBridge`` in eval mode with gradients off.

    Args:
        name: a short name (``smollm2-135m``, ``gpt2``, ``tiny-llama``...), a
            local HF-format directory, or a Hugging Face id.
        device: ``None``/``"auto"`` (cuda, then mps, then cpu), or a device string.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        progress: called with (fraction, message) during fetch and load.
        device_map: split the model across devices instead of ``device``: a strategy
            (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) or a dict
            of module name -> device (JSON text accepted), as Hugging Face's ``device_map``.
        n_devices: split the model evenly over this many CUDA GPUs (1: no split).
        max_memory: per-device budgets for a strategy or ``n_devices``: ``{0: "20GiB", "cpu": "64GB"}``.

    Every bad placement (see :func:`~headvis_core.models.devices.resolve_placement`) and a
    model that will not fit its devices are refused before any weights are read.
    """
    started = time.time()
    placement = resolve_placement(device, device_map, n_devices, max_memory)
    torch_dtype = resolve_dtype(dtype)
    report(progress, 0.0, f"resolving {name}")
    source = resolve_source(name, progress=scaled(progress, 0.0, 0.7))
    seed = RANDOM_PRESETS[name.lower()].seed if source.random_init else None
    report(progress, 0.75, f"booting {name} in TransformerLens on {placement.describe()}")
    loaded = _boot(name, source, placement, torch_dtype, seed, started)
    report(progress, 1.0, f"{name} loaded")
    return loaded


def load_random_model(spec: RandomModelSpec, device: Optional[str] = "cpu",
                      dtype: str | torch.dtype | None = "float32") -> LoadedModel:
    """A randomly initialised model of any shape (one layer, one head, GQA...), same weights for the same spec."""
    source = ResolvedSource("random", str(random_model_dir(spec)), random_init=True)
    return _boot(f"random:{spec.key}", source, resolve_placement(device), resolve_dtype(dtype), spec.seed,
                 time.time())


def _random_weights_folder(source: ResolvedSource, config, seed: int) -> str:
    """A random model's seeded weights written once as an HF checkpoint beside its config.

    A model the bridge builds without weights (``load_weights=False``) stays on the CPU in
    float32: ``device``, ``dtype`` and ``device_map`` are recorded but not applied (and casting it
    afterwards misses the float32 buffers the bridge adds, such as the unembedding's bias). So a
    random model anywhere but the CPU in float32 is loaded from this checkpoint, like a real one.
    Its weights are the ones the architecture's initialiser draws under the seed, the same as the
    model built without weights (tested).

    Written once by :func:`~headvis_core.models.random_models.write_folder_once` (a unique staging
    folder renamed into place under a thread and file lock; stale staging folders removed). An
    unwritable or full cache raises ``ModelLoadError`` naming the folder.
    """
    from safetensors import SafetensorError

    folder = Path(source.target) / "weights"
    try:
        write_folder_once(folder, lambda staging: _write_random_checkpoint(source.target, config, seed, staging))
    except (OSError, SafetensorError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ModelLoadError(
            f"Could not write the seeded weights of the random model to {folder} ({reason}): a random model "
            "in a 16-bit dtype or off the CPU loads from them. Make the cache folder writable (or point "
            "HEADVIS_HOME at one that is), or load it on the CPU in float32, which needs no file.") from err
    return str(folder)


def _write_random_checkpoint(config_folder: str, config, seed: int, staging: Path) -> None:
    """Draw the model's weights under ``seed`` and save them with its tokenizer as an HF checkpoint."""
    with MODEL_CONSTRUCTION_LOCK:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        tokenizer = AutoTokenizer.from_pretrained(config_folder)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def _boot(name: str, source: ResolvedSource, placement: Placement, torch_dtype: torch.dtype, seed: Optional[int],
          started: float) -> LoadedModel:
    with MODEL_CONSTRUCTION_LOCK:  # transformers' lazy imports are not thread-safe on first use
        from transformer_lens.model_bridge import TransformerBridge

        config = _load_hf_config(source.target)
    empty = _empty_model(config)
    n_params = sum(p.numel() for p in empty.parameters()) if empty is not None else 0
    boot_arguments = placement.boot_arguments()
    if placement.is_split and (placement.device_map is None or isinstance(placement.device_map, str)):
        budgets = _dispatch_budgets(placement)
        check_split_memory({"all": n_params}, torch_dtype, name, budgets=budgets)
        if placement.max_memory is None and n_cuda_devices():
            boot_arguments["max_memory"] = {int(d.split(":")[1]): b for d, b in budgets.items()}
    else:
        check_split_memory(params_per_device(placement, empty, n_params, name), torch_dtype, name)
    target, load_weights = source.target, seed is None
    if seed is not None and (placement.is_split or placement.device != "cpu" or torch_dtype != torch.float32):
        target, load_weights = _random_weights_folder(source, config, seed), True
    try:
        with MODEL_CONSTRUCTION_LOCK:  # no other thread's model built meanwhile, nor its RNG draws taken
            if seed is not None:
                torch.manual_seed(seed)
            bridge = TransformerBridge.boot_transformers(target, dtype=torch_dtype, load_weights=load_weights,
                                                         **boot_arguments)
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
    info = _model_info(name, source.target, bridge, config, n_params, placement, torch_dtype,
                       time.time() - started)
    return LoadedModel(model=bridge, info=info)


def _model_info(name, target, bridge, config, n_params, placement: Placement, dtype, seconds) -> ModelInfo:
    cfg = bridge.cfg
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    archs = getattr(config, "architectures", None) or [type(bridge.original_model).__name__]
    device_map = None
    if placement.is_split:
        requested = placement.device_map if placement.device_map is not None else f"n_devices={placement.n_devices}"
        device_map = requested if isinstance(requested, str) else json.dumps(requested)
    return ModelInfo(
        name=name, source=target, architecture=archs[0], n_layers=int(cfg.n_layers), n_heads=n_heads,
        n_kv_heads=int(n_kv), d_head=int(cfg.d_head), d_model=int(cfg.d_model), d_vocab=int(cfg.d_vocab),
        n_ctx=int(cfg.n_ctx), prepends_bos=bool(getattr(cfg, "default_prepend_bos", True)),
        # parameters() counts tied embedding/unembedding weights once, unlike the config estimate
        n_params=int(sum(p.numel() for p in bridge.original_model.parameters()) or n_params),
        # under a split the bridge sets cfg.device to the input embedding's device: where tokens go
        device=str(placement.device if not placement.is_split else cfg.device), dtype=str(dtype).replace("torch.", ""),
        load_seconds=round(seconds, 2), device_map=device_map, n_devices=int(getattr(cfg, "n_devices", 1) or 1))


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
