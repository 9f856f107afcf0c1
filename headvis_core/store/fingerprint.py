"""What identifies a result: a fingerprint of the model and a digest of the inputs.

A model's fingerprint hashes its configuration, its tokenizer and *every byte
of every weight* (xxHash XXH3-128, which runs at memory bandwidth: about
0.1 s for SmolLM2-135M's 0.5 GB on one core, once per loaded model). A full
hash is as cheap as a strided sample here and, unlike a sample, it also
catches a change to a single weight (a bit flip in a file, a one-row edit),
so a result computed with other weights can never be taken for current.
Weights on an accelerator are copied to the host one tensor at a time to be
hashed, so the same weights have the same fingerprint on any device.

The fingerprint is computed once per model object and remembered: the
workbench never edits a loaded model's weights in place (ablations and
patches are hooks), and a model loaded again is a new object, hashed anew.
"""

import dataclasses
import hashlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import xxhash

# Config fields that say where or how a model was loaded, not what it computes.
CONFIG_FIELDS_IGNORED = frozenset({"device", "n_devices", "model_name", "tokenizer_name", "n_params"})

_fingerprints: "weakref.WeakKeyDictionary[Any, ModelFingerprint]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModelFingerprint:
    digest: str  # 32 hex digits
    label: str  # the model's name, for people (not part of the digest)
    n_params: int

    @property
    def short(self) -> str:
        return self.digest[:12]


def _bridge_and_label(model: Any) -> tuple[Any, str]:
    """Accept a ``LoadedModel`` (bridge + info) or a bare bridge."""
    info = getattr(model, "info", None)
    if info is not None and hasattr(model, "model"):
        return model.model, str(info.name)
    return model, str(getattr(getattr(model, "cfg", None), "model_name", "") or type(model).__name__)


def _config_text(bridge: Any) -> str:
    cfg = getattr(bridge, "cfg", None)
    fields = {k: v for k, v in sorted(vars(cfg).items()) if k not in CONFIG_FIELDS_IGNORED} if cfg else {}
    return json.dumps(fields, sort_keys=True, default=repr)


def _tokenizer_text(bridge: Any) -> str:
    tokenizer = getattr(bridge, "tokenizer", None)
    if tokenizer is None:
        return ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        # padding and truncation are call state that encoding sets on the backend, not the tokenizer's identity:
        # without this the first padded to_tokens call would change the model's fingerprint
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        return json.dumps(spec, sort_keys=True)
    return json.dumps(sorted(tokenizer.get_vocab().items()))


def _weights(bridge: Any) -> dict[str, torch.Tensor]:
    module = getattr(bridge, "original_model", None) or bridge
    return module.state_dict()


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes (bfloat16 included, which numpy cannot hold as numbers), on the host."""
    return tensor.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy()


def model_fingerprint(model: Any) -> ModelFingerprint:
    """The fingerprint of ``model`` (a ``LoadedModel`` or a ``TransformerBridge``), computed once per model object."""
    bridge, label = _bridge_and_label(model)
    known = _fingerprints.get(bridge)
    if known is not None:
        return dataclasses.replace(known, label=label)
    hasher = xxhash.xxh3_128()
    hasher.update(_config_text(bridge).encode("utf-8"))
    hasher.update(_tokenizer_text(bridge).encode("utf-8"))
    seen: set[tuple[int, tuple[int, ...]]] = set()
    n_params = 0
    for name, tensor in _weights(bridge).items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if identity in seen:  # tied weights: hashed once
            continue
        seen.add(identity)
        n_params += tensor.numel()
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode("utf-8"))
        hasher.update(_tensor_bytes(tensor))
    fingerprint = ModelFingerprint(digest=hasher.hexdigest(), label=label, n_params=n_params)
    try:
        _fingerprints[bridge] = fingerprint
    except TypeError:  # an object that takes no weak references is simply hashed each time
        pass
    return fingerprint


def _canonical(value: Any) -> Any:
    """``value`` as JSON-able data that two equal inputs map to identically (tensors and tables by digest)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # keeps nan, inf and the exact value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v) for v in value)
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().contiguous()
        return ["tensor", str(array.dtype), list(array.shape), xxhash.xxh3_128_hexdigest(
            array.reshape(-1).view(torch.uint8).numpy())]
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        if array.dtype == object:
            return ["array", [_canonical(v) for v in array.tolist()]]
        return ["array", str(array.dtype), list(array.shape), xxhash.xxh3_128_hexdigest(array.tobytes())]
    if isinstance(value, np.generic):
        return _canonical(value.item())
    if isinstance(value, pd.DataFrame):
        return ["frame", list(map(str, value.columns)), _canonical(value.to_numpy(dtype=str))]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [type(value).__name__, {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}]
    raise TypeError(f"Cannot key a stored result on a {type(value).__name__}: pass plain values, tensors or tables.")


def inputs_digest(inputs: Mapping[str, Any]) -> str:
    """A digest of the inputs that define a result (plain values, tensors, arrays, tables, dataclasses)."""
    text = json.dumps(_canonical(dict(inputs)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _short(value: Any, limit: int) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit - 3] + "..."
    if isinstance(value, Path):
        return _short(str(value), limit)
    if isinstance(value, torch.Tensor) or isinstance(value, np.ndarray):
        return f"{type(value).__name__}[{' x '.join(map(str, value.shape))}]"
    if isinstance(value, pd.DataFrame):
        return f"table[{len(value)} x {len(value.columns)}]"
    if isinstance(value, (list, tuple)):
        if len(value) <= 4 and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
            return _short(json.dumps(list(value)), limit)
        return f"[{len(value)} items]"
    if isinstance(value, Mapping):
        return f"{{{len(value)} fields}}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value).__name__
    return _short(str(value), limit)


def describe_inputs(inputs: Mapping[str, Any], limit: int = 80) -> dict[str, Any]:
    """A short, JSON-able copy of ``inputs`` to show in listings (long values summarised by their size)."""
    return {str(key): _short(value, limit) for key, value in inputs.items()}
