"""A sparse dictionary (SAE) in SAELens's saved format, as the sides of an edge attribution.

SAELens saves a dictionary as a folder with ``cfg.json`` (``hook_name``, ``d_in``, ``d_sae``,
optionally ``architecture`` and ``apply_b_dec_to_input``) and ``sae_weights.safetensors``
(``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``, and
``threshold [d_sae]`` for JumpReLU). SAELens itself does not import under TransformerLens 4, so the
folder is read here with ``safetensors``.

The encoder gives feature activations ``f = relu((x - b_dec) W_enc + b_enc)`` (JumpReLU: zero
below ``threshold``); the reconstruction is ``f W_dec + b_dec``; the **error** is ``x`` minus it.
So ``x = sum_i f_i W_dec[i] + b_dec + error`` exactly, and replacing the model's components by
these (``F{i}`` for each active feature, ``error``, and ``b_dec`` in ``bias``) keeps the QK sum exact:
HeadVis's ``(q_act . q_dec) W_Q^T W_K (k_dec . k_act)`` (Anthropic 2025, "HeadVis") plus the error
terms.
"""


import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from jaxtyping import Float

from headvis_core.attribution.components import BIAS, Components
from headvis_core.errors import CorruptFileError, InputError

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
ERROR = "error"


@dataclass(frozen=True)
class SparseDictionary:
    path: str
    hook_name: str
    d_in: int
    d_sae: int
    W_enc: Float[torch.Tensor, "d_in d_sae"]
    W_dec: Float[torch.Tensor, "d_sae d_in"]
    b_enc: Float[torch.Tensor, " d_sae"]
    b_dec: Float[torch.Tensor, " d_in"]
    threshold: Optional[torch.Tensor] = None
    apply_b_dec_to_input: bool = True

    def encode(self, x: Float[torch.Tensor, " d_in"]) -> Float[torch.Tensor, " d_sae"]:
        x = x.double()
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.threshold is not None:
            return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))
        return torch.relu(pre)

    def components(self, x: Float[torch.Tensor, " d_in"], position: int, layer: int) -> Components:
        """``x`` as active features (largest first), the error, and ``b_dec`` in the bias row."""
        x = x.double()
        acts = self.encode(x)
        active = torch.nonzero(acts, as_tuple=True)[0]
        active = active[acts[active].argsort(descending=True)]
        features = acts[active, None] * self.W_dec[active]
        reconstruction = features.sum(dim=0) + self.b_dec
        names = [f"F{i}" for i in active.tolist()] + [ERROR, BIAS]
        labels = [f"F{i} ({float(acts[i]):.3g})" for i in active.tolist()] + [ERROR, BIAS]
        vectors = torch.cat([features, (x - reconstruction)[None], self.b_dec[None]])
        error = float((vectors.sum(0) - x).abs().max())
        return Components(names=names, labels=labels, vectors=vectors, position=position, layer=layer,
                          reconstruction_error=error)


def _read_tensor(tensors: dict, name: str, shape: tuple[int, ...], folder: Path) -> torch.Tensor:
    if name not in tensors:
        raise CorruptFileError(f"{folder / WEIGHTS_FILE} has no {name!r} tensor (SAELens format expected).")
    value = tensors[name]
    if tuple(value.shape) != shape:
        raise CorruptFileError(f"{name} in {folder / WEIGHTS_FILE} has shape {tuple(value.shape)}, but cfg.json "
                               f"says {shape}.")
    return value.double()


def load_sae(path: str | Path) -> SparseDictionary:
    """Read a SAELens-format folder; a missing or malformed one raises a clear :class:`HeadVisError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InputError(f"No SAE folder at {path}: give a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}.")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise InputError(f"The SAE folder {path} has no {name} (SAELens's saved format is expected).")
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        hook_name, d_in, d_sae = str(cfg["hook_name"]), int(cfg["d_in"]), int(cfg["d_sae"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"{folder / CONFIG_FILE} is not a SAELens config with hook_name, d_in and d_sae "
                               f"({type(err).__name__}: {err}).") from err
    architecture = str(cfg.get("architecture", "standard"))
    if architecture not in ("standard", "jumprelu"):
        raise InputError(f"The SAE's architecture is {architecture!r}; only standard (ReLU) and jumprelu "
                         "dictionaries are supported.")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(f"{folder / WEIGHTS_FILE} could not be read as safetensors: {err}") from err
    threshold = None
    if architecture == "jumprelu":
        threshold = _read_tensor(tensors, "threshold", (d_sae,), folder)
    return SparseDictionary(
        path=str(folder), hook_name=hook_name, d_in=d_in, d_sae=d_sae,
        W_enc=_read_tensor(tensors, "W_enc", (d_in, d_sae), folder),
        W_dec=_read_tensor(tensors, "W_dec", (d_sae, d_in), folder),
        b_enc=_read_tensor(tensors, "b_enc", (d_sae,), folder),
        b_dec=_read_tensor(tensors, "b_dec", (d_in,), folder),
        threshold=threshold, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)))


def check_sae(sae: SparseDictionary, model: Any, layer: int) -> None:
    """The dictionary must read the residual stream entering the head's layer, at the model's width."""
    expected = f"blocks.{layer}.hook_resid_pre"
    if sae.d_in != int(model.cfg.d_model):
        raise InputError(f"The SAE has d_in={sae.d_in}, but this model's residual stream has "
                         f"d_model={int(model.cfg.d_model)}: it was trained on another model.")
    if sae.hook_name != expected:
        raise InputError(f"The SAE reads {sae.hook_name!r}, but head attribution in layer {layer} needs a dictionary "
                         f"of the stream entering that layer, {expected!r}.")


def save_sae(folder: str | Path, hook_name: str, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor,
             b_dec: torch.Tensor) -> Path:
    """Write a dictionary in SAELens's format (used by the tests and to try the feature with a random one)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d_in, d_sae = W_enc.shape
    (folder / CONFIG_FILE).write_text(json.dumps({"hook_name": hook_name, "d_in": int(d_in), "d_sae": int(d_sae),
                                                  "architecture": "standard", "apply_b_dec_to_input": True}))
    save_file({"W_enc": W_enc.float().contiguous(), "W_dec": W_dec.float().contiguous(),
               "b_enc": b_enc.float().contiguous(), "b_dec": b_dec.float().contiguous()}, str(folder / WEIGHTS_FILE))
    return folder


def random_sae(model: Any, layer: int, d_sae: int, seed: int = 0) -> dict[str, Any]:
    """Arguments for :func:`save_sae` of a random dictionary on ``layer``'s input (for tests and demos)."""
    generator = torch.Generator().manual_seed(seed)
    d_model = int(model.cfg.d_model)
    W_dec = torch.randn(d_sae, d_model, generator=generator) / d_model ** 0.5
    return {"hook_name": f"blocks.{layer}.hook_resid_pre", "W_enc": W_dec.T.clone(), "W_dec": W_dec,
            "b_enc": torch.randn(d_sae, generator=generator) * 0.01, "b_dec": torch.zeros(d_model)}
