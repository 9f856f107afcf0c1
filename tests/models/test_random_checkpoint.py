"""A random model's seeded checkpoint (16-bit or off-CPU loads) under concurrency and in a bad cache.

Each test gets its own empty cache (``HEADVIS_HOME``), so the checkpoint is written during the
test: two threads loading at once (two Streamlit sessions) must get the float32 weights cast,
the checkpoint written once, and no staging folder left; an unwritable cache is a
``ModelLoadError`` naming the folder; a crashed writer's stale staging folder is removed.
"""

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from headvis_core.errors import ModelLoadError
from headvis_core.models import loader, random_models
from headvis_core.models.loader import load_model
from headvis_core.models.random_models import RANDOM_PRESETS, random_model_dir


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HEADVIS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def parameters(loaded) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in loaded.model.original_model.named_parameters()}


def assert_is_float32_cast(loaded, name: str, dtype: torch.dtype) -> None:
    reference = parameters(load_model(name, device="cpu"))
    got = parameters(loaded)
    assert got.keys() == reference.keys()
    for key, weight in got.items():
        assert weight.dtype == dtype and torch.equal(weight, reference[key].to(dtype)), key


def load_at_once(requests: list[tuple[str, str]]) -> list:
    """Load each (name, dtype) in its own thread, all released together; re-raise any thread's error."""
    barrier = threading.Barrier(len(requests))
    results: list = [None] * len(requests)

    def run(i: int, name: str, dtype: str) -> None:
        barrier.wait()
        try:
            results[i] = load_model(name, device="cpu", dtype=dtype)
        except BaseException as err:  # handed to the main thread, which raises it
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, *request)) for i, request in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def partial_folders(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*" + random_models.PARTIAL_INFIX + "*"))


def test_two_threads_loading_one_random_model_in_bfloat16_get_the_float32_weights_cast(fresh_cache, monkeypatch):
    writes = []
    write = loader._write_random_checkpoint

    def counted(*args):
        writes.append(args)
        time.sleep(0.2)  # widen the window in which the other thread would also write
        write(*args)

    monkeypatch.setattr(loader, "_write_random_checkpoint", counted)
    first, second = load_at_once([("tiny-gpt2", "bfloat16"), ("tiny-gpt2", "bfloat16")])
    assert len(writes) == 1  # the second thread waited for the first's checkpoint
    assert_is_float32_cast(first, "tiny-gpt2", torch.bfloat16)
    assert_is_float32_cast(second, "tiny-gpt2", torch.bfloat16)
    assert partial_folders(fresh_cache) == []


def test_two_threads_loading_different_random_models_in_bfloat16_both_load(fresh_cache):
    # first with the checkpoints being written, then with them there (only the constructions overlap)
    for _round in range(2):
        gpt2, llama = load_at_once([("tiny-gpt2", "bfloat16"), ("tiny-llama", "bfloat16")])
        assert_is_float32_cast(gpt2, "tiny-gpt2", torch.bfloat16)
        assert_is_float32_cast(llama, "tiny-llama", torch.bfloat16)


def test_float32_and_bfloat16_loads_at_once_draw_the_seeded_weights(fresh_cache):
    # the float32 CPU load seeds torch's global RNG and draws; a concurrent construction must not interleave
    plain, half = load_at_once([("tiny-llama", "float32"), ("tiny-llama", "bfloat16")])
    reference = parameters(load_model("tiny-llama", device="cpu"))
    assert all(torch.equal(weight, reference[key]) for key, weight in parameters(plain).items())
    assert_is_float32_cast(half, "tiny-llama", torch.bfloat16)


def make_read_only(folder: Path) -> bool:
    """Make ``folder`` unwritable, even to root (``chattr +i``); False if that cannot be done here."""
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return True
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        (folder / "probe").touch()
    except OSError:
        return made
    (folder / "probe").unlink()
    return False


def make_writable(folder: Path) -> None:
    subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


@pytest.fixture
def read_only_random_dir(fresh_cache):
    folder = random_model_dir(RANDOM_PRESETS["tiny-gpt2"])  # config and tokenizer written, no weights yet
    if not make_read_only(folder):
        make_writable(folder)
        pytest.skip("cannot make a folder read-only here (neither chmod nor chattr +i takes effect)")
    yield folder
    make_writable(folder)


def test_a_read_only_cache_is_a_model_load_error_naming_the_folder(read_only_random_dir):
    with pytest.raises(ModelLoadError, match=re.escape(str(read_only_random_dir / "weights"))):
        load_model("tiny-gpt2", device="cpu", dtype="bfloat16")
    # float32 on the CPU needs no checkpoint, so it still loads from the read-only cache
    assert load_model("tiny-gpt2", device="cpu").info.dtype == "float32"


def test_a_read_only_cache_root_is_a_model_load_error_for_the_config_too(fresh_cache):
    fresh_cache.mkdir()
    if not make_read_only(fresh_cache):
        make_writable(fresh_cache)
        pytest.skip("cannot make a folder read-only here")
    try:
        with pytest.raises(ModelLoadError, match="Could not write the random model"):
            load_model("tiny-gpt2", device="cpu")
    finally:
        make_writable(fresh_cache)


def test_a_write_that_fails_midway_leaves_nothing_and_is_a_model_load_error(fresh_cache, monkeypatch):
    def disk_full(config_folder, config, seed, staging):
        (staging / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loader, "_write_random_checkpoint", disk_full)
    with pytest.raises(ModelLoadError, match="No space left on device"):
        load_model("tiny-gpt2", device="cpu", dtype="bfloat16")
    folder = random_model_dir(RANDOM_PRESETS["tiny-gpt2"])
    assert not (folder / "weights").exists() and partial_folders(fresh_cache) == []


def test_a_stale_staging_folder_is_removed_and_a_live_one_kept(fresh_cache):
    folder = random_model_dir(RANDOM_PRESETS["tiny-gpt2"])
    stale = folder / "weights.partial-crashed"
    live = folder / "weights.partial-writing"
    for partial in (stale, live):
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"half")
    old = time.time() - random_models.STALE_PARTIAL_AGE_S - 60
    for path in (stale / "model.safetensors", stale):
        os.utime(path, (old, old))
    load_model("tiny-gpt2", device="cpu", dtype="bfloat16")
    assert not stale.exists() and live.is_dir()
    assert (folder / "weights" / "model.safetensors").is_file()


def test_a_folder_an_earlier_version_left_half_written_is_written_again(fresh_cache):
    spec = RANDOM_PRESETS["tiny-gpt2"]
    half = random_models.models_dir() / "random" / spec.key
    half.mkdir(parents=True)
    (half / "config.json").write_text("{")  # cut short, and no spec file
    folder = random_model_dir(spec)
    assert folder == half and (folder / random_models.SPEC_FILE).is_file()
    assert load_model("tiny-gpt2", device="cpu").info.n_layers == spec.n_layers


DIGEST_SCRIPT = """
import hashlib, sys, torch
from headvis_core.models.loader import load_model
model = load_model("tiny-gpt2", device="cpu", dtype="bfloat16").model.original_model
weights = sorted(model.named_parameters())
print(hashlib.sha256(b"".join(p.detach().view(torch.int16).numpy().tobytes() for _, p in weights)).hexdigest())
"""


def test_two_processes_writing_one_checkpoint_at_once_both_load_it(fresh_cache):
    environment = dict(os.environ, HEADVIS_HOME=str(fresh_cache))
    processes = [subprocess.Popen([sys.executable, "-c", DIGEST_SCRIPT], env=environment, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    reference = load_model("tiny-gpt2", device="cpu").model.original_model
    weights = sorted(reference.named_parameters())
    expected = hashlib.sha256(b"".join(p.detach().to(torch.bfloat16).view(torch.int16).numpy().tobytes()
                                       for _, p in weights)).hexdigest()
    assert [out.strip().splitlines()[-1] for out, _ in outputs] == [expected, expected]
    assert partial_folders(fresh_cache) == []
