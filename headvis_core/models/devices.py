"""Device, dtype and placement choice.

A model is placed on one device (``device``), or split across several by
Hugging Face's dispatcher (accelerate): ``device_map`` (a strategy such as
``"auto"``, or a dict from module name to device), or ``n_devices`` GPUs in a
balanced split, optionally capped per device by ``max_memory``. TransformerLens's
``TransformerBridge.boot_transformers`` takes the same three arguments
(``transformer_lens.utilities.multi_gpu.resolve_device_map``); :func:`resolve_placement`
checks them first, so that every value the bridge or accelerate would refuse (some
only after the weights are read) is refused here with a message, before anything loads.

What the bridge refuses and this module therefore refuses too: ``device`` together
with ``device_map``; a dict map that mixes a GPU with CPU (or disk) targets; ``meta``
targets. ``disk`` targets (accelerate's disk offload) are refused by HeadVis itself:
offloaded weights are not in memory between passes, and the workbench reads weights
directly (the atlas's copying scores, edge attribution, the result store's fingerprint).
"""

import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from headvis_core.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# accelerate's strategies for a device_map string (``infer_auto_device_map`` / ``get_balanced_memory``)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

DeviceMap = Union[str, dict[str, Union[int, str]]]
MaxMemory = dict[Union[int, str], int]


def auto_device() -> str:
    """cuda if available, then mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if _mps_available():
        return "mps"
    return "cpu"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def n_cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return auto_device()
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError("Device 'cuda' was asked for, but no CUDA GPU is available here.")
    if kind == "mps" and not _mps_available():
        raise InputError("Device 'mps' was asked for, but Apple's MPS is not available here.")
    if kind not in ("cpu", "cuda", "mps"):
        raise InputError(f"Unknown device {device!r}: use auto, cpu, cuda or mps.")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


@dataclass(frozen=True)
class Placement:
    """Where a model's weights go: one ``device``, or a split (``device_map`` and ``max_memory``)."""

    device: Optional[str]  # the single device; None for a split
    device_map: Optional[DeviceMap] = None  # a strategy or a dict, as the bridge takes it
    max_memory: Optional[MaxMemory] = None  # bytes per device (GPU index, "cpu" or "mps")
    n_devices: Optional[int] = None  # as asked for (a balanced split over this many GPUs)

    @property
    def is_split(self) -> bool:
        return self.device is None

    def describe(self) -> str:
        """The placement as one short text (for the model card and messages)."""
        if not self.is_split:
            return self.device or ""
        if self.n_devices is not None and self.device_map is None:
            return f"split over {self.n_devices} GPUs"
        if isinstance(self.device_map, str):
            return f"device_map={self.device_map}"
        return f"device_map over {', '.join(sorted(set(map(target_device, self.device_map.values()))))}"

    def boot_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``TransformerBridge.boot_transformers``."""
        if not self.is_split:
            return {"device": self.device}
        arguments: dict[str, Any] = {"device_map": self.device_map, "max_memory": self.max_memory}
        if self.device_map is None:
            arguments["n_devices"] = self.n_devices
        return arguments


def target_device(target: Union[int, str]) -> str:
    """A device_map target as a torch device string: ``0`` -> ``cuda:0``, ``cuda`` -> ``cuda:0``."""
    if isinstance(target, int):
        return f"cuda:{target}"
    text = str(target).strip().lower()
    return "cuda:0" if text == "cuda" else text


def _json_value(value: Any, option: str, kind: str) -> Any:
    """``value`` itself, or the JSON it holds when it is text starting with ``{``."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise InputError(f"{option} is not valid JSON ({err.msg} at character {err.pos}): give {kind}.") from None
    return value


def _check_gpu_index(index: int, what: str) -> None:
    count = n_cuda_devices()
    if index < 0:
        raise InputError(f"{what}: GPU index {index} is negative.")
    if index >= count:
        raise InputError(f"{what}: GPU {index} does not exist; this machine has "
                         + (f"{count} CUDA GPU(s) (0..{count - 1})." if count else "no CUDA GPU."))


def _check_target(module: str, target: Any) -> Union[int, str]:
    what = f"device_map[{module!r}]"
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise InputError(f"{what} is {target!r}: give a GPU index, \"cuda:N\", \"cpu\" or \"mps\".")
    if isinstance(target, int):
        _check_gpu_index(target, what)
        return target
    device = target.strip().lower()
    if device == "meta":
        raise InputError(f"{what} is \"meta\": a meta device holds no weights, so the model cannot run there. "
                         "Give a GPU or \"cpu\".")
    if device == "disk":
        raise InputError(f"{what} is \"disk\": disk offload is not supported here (the workbench reads weights "
                         "directly, and offloaded weights are not in memory). Give a GPU or \"cpu\".")
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not n_cuda_devices():
            raise InputError(f"{what} is {target!r}, but no CUDA GPU is available here.")
        if index:
            if not index.isdigit():
                raise InputError(f"{what} is {target!r}: not a device (use \"cuda:N\").")
            _check_gpu_index(int(index), what)
        return device
    if device == "mps":
        if not _mps_available():
            raise InputError(f"{what} is \"mps\", but Apple's MPS is not available here.")
        return device
    if device == "cpu":
        return device
    raise InputError(f"{what} is {target!r}: not a device (use a GPU index, \"cuda:N\", \"cpu\" or \"mps\").")


def parse_device_map(value: Any, option: str = "device_map") -> Optional[DeviceMap]:
    """A strategy (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``) or a dict of module -> device.

    A dict may come as JSON text. Its targets are checked against the devices this machine has.
    """
    value = _json_value(value, option, "a JSON object of module name -> device")
    if value is None:
        return None
    if isinstance(value, str):
        strategy = value.strip().lower()
        if strategy not in DEVICE_MAP_STRATEGIES:
            raise InputError(f"{option} {value!r} is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) nor a "
                             "JSON object of module name -> device.")
        return strategy
    if not isinstance(value, dict):
        raise InputError(f"{option} must be a strategy or a JSON object of module name -> device, "
                         f"not {type(value).__name__}.")
    if not value:
        raise InputError(f"{option} is empty: name the device of each module (\"\" for the whole model).")
    checked = {}
    for module, target in value.items():
        if not isinstance(module, str):
            raise InputError(f"{option}: module names must be text, not {module!r}.")
        checked[module.strip()] = _check_target(module, target)
    devices = {target_device(t) for t in checked.values()}
    gpus = {d for d in devices if d.startswith("cuda")}
    if gpus and devices - gpus:
        raise InputError(f"{option} mixes GPUs ({', '.join(sorted(gpus))}) with {', '.join(sorted(devices - gpus))}: "
                         "TransformerLens's bridge refuses a map that puts some weights on a GPU and some on the "
                         "CPU. Put every module on a GPU, or every module on the CPU.")
    return checked


def parse_max_memory(value: Any, option: str = "max_memory") -> Optional[MaxMemory]:
    """Per-device budgets: ``{"0": "20GiB", "1": 20e9, "cpu": "64GB"}`` (JSON text or a dict) -> bytes."""
    from accelerate.utils import convert_file_size_to_int

    value = _json_value(value, option, 'a JSON object such as {"0": "20GiB", "1": "20GiB"}')
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise InputError(f'{option} must be a JSON object of device -> size, such as {{"0": "20GiB", "cpu": '
                         f'"64GB"}}, not {value!r}.')
    budgets: MaxMemory = {}
    for key, size in value.items():
        name = str(key).strip().lower()
        if name.isdigit():
            device: Union[int, str] = int(name)
            _check_gpu_index(int(name), f"{option}[{key!r}]")
        elif name.startswith("cuda:") and name[5:].isdigit():
            device = int(name[5:])
            _check_gpu_index(device, f"{option}[{key!r}]")
        elif name in ("cpu", "mps"):
            device = name
        else:
            raise InputError(f"{option}: {key!r} is not a device (use a GPU index, \"cpu\" or \"mps\").")
        if isinstance(size, bool) or not isinstance(size, (int, float, str)):
            raise InputError(f"{option}[{key!r}] is {size!r}: give bytes or a size such as \"20GiB\".")
        if isinstance(size, float):
            if not math.isfinite(size) or size != int(size):
                raise InputError(f"{option}[{key!r}] is {size!r}: give a whole number of bytes or a size.")
            size = int(size)
        try:
            n_bytes = convert_file_size_to_int(size.strip() if isinstance(size, str) else size)
        except (ValueError, TypeError):
            raise InputError(f"{option}[{key!r}] is {size!r}: not a size (use bytes, or a number with a unit "
                             "such as \"20GiB\" or \"500MB\").") from None
        if n_bytes <= 0:
            raise InputError(f"{option}[{key!r}] is {size!r}: a budget must be more than 0 bytes.")
        budgets[device] = int(n_bytes)
    return budgets


def resolve_placement(device: Optional[str] = None, device_map: Any = None, n_devices: Optional[int] = None,
                      max_memory: Any = None) -> Placement:
    """Check a placement request and return it resolved; every bad combination is an :class:`InputError`.

    Rules (the bridge's own, checked here before any weights are read):
    ``device_map`` and ``n_devices`` exclude each other and an explicit ``device``;
    ``n_devices`` is at least 1 and at most the CUDA GPUs present (1 means one device,
    no split); ``max_memory`` applies to a strategy or to ``n_devices`` (a dict map
    already says where each module goes).
    """
    explicit_device = device not in (None, "", "auto")
    if n_devices is not None:
        if isinstance(n_devices, bool) or not isinstance(n_devices, int):
            raise InputError(f"n_devices must be a whole number, not {n_devices!r}.")
        if n_devices < 1:
            raise InputError(f"n_devices is {n_devices}: give at least 1.")
    if device_map is not None and n_devices is not None:
        raise InputError("Give device_map or n_devices, not both (n_devices is a balanced device_map over that "
                         "many GPUs).")
    if device_map is not None and explicit_device:
        raise InputError(f"Give device or device_map, not both: device={device!r} puts the whole model on one "
                         "device, device_map splits it.")
    resolved_map = parse_device_map(device_map)
    budgets = parse_max_memory(max_memory)
    if budgets is not None and 0 < sum(isinstance(k, int) for k in budgets) < len(budgets):
        raise InputError("max_memory gives budgets to GPUs and to the CPU: TransformerLens's bridge refuses a split "
                         "that puts some weights on a GPU and some on the CPU. Give budgets to GPUs only.")
    if n_devices is not None and n_devices > 1:
        if explicit_device and str(device).split(":")[0] != "cuda":
            raise InputError(f"n_devices={n_devices} splits the model over CUDA GPUs, but device={device!r}.")
        available = n_cuda_devices()
        if available < n_devices:
            raise InputError(f"n_devices={n_devices}, but this machine has "
                             + (f"only {available} CUDA GPU(s)." if available else "no CUDA GPU."))
        if budgets is not None and set(budgets) != set(range(n_devices)):
            raise InputError(f"max_memory names {sorted(map(str, budgets))}, but n_devices={n_devices} splits over "
                             f"GPUs {', '.join(map(str, range(n_devices)))}: give a budget for each of them.")
        return Placement(device=None, device_map=None, max_memory=budgets, n_devices=n_devices)
    if budgets is not None and not isinstance(resolved_map, str):
        raise InputError("max_memory caps the devices a strategy (auto, balanced, sequential) or n_devices splits "
                         "the model over; " + ("a dict device_map already says where each module goes."
                                               if resolved_map else "give one of them too."))
    if resolved_map is None:
        return Placement(device=resolve_device(device), n_devices=n_devices)
    return Placement(device=None, device_map=resolved_map, max_memory=budgets)
