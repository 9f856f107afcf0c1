"""Placement across devices: device_map / n_devices / max_memory, checked before any weights load.

No GPU here: a split over GPUs is not run. What runs is every refusal, the per-device memory
check (with the free memory of pretend GPUs), the all-CPU maps (which the bridge loads without
accelerate's dispatch hooks), and a CPU + disk map booted through the bridge itself, whose
dispatch hooks move activations between modules the way a GPU split does.
"""

import json

import numpy as np
import pytest
import torch

from headvis_core.errors import InputError, NotEnoughMemoryError
from headvis_core.hooks import capture, pattern_hook, z_hook
from headvis_core.models import loader as models
from headvis_core.models.devices import Placement, parse_max_memory, resolve_placement
from headvis_core.models.loader import LoadedModel, check_split_memory, load_model, params_per_device
from headvis_core.store.fingerprint import model_fingerprint

PROMPT = "When Mary and John went to the store, John gave a drink to Mary"


def per_module_map(n_layers: int) -> dict[str, str]:
    """Every module of a Llama-style model named, all on the CPU."""
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(n_layers)})
    return device_map


BAD_PLACEMENTS = [
    ("device and device_map", dict(device="cpu", device_map="auto"), "Give device or device_map, not both"),
    ("device_map and n_devices", dict(device_map="auto", n_devices=2), "not both"),
    ("n_devices 0", dict(n_devices=0), "n_devices is 0: give at least 1"),
    ("n_devices -3", dict(n_devices=-3), "give at least 1"),
    ("n_devices not a number", dict(n_devices="2"), "whole number"),
    ("more GPUs than exist", dict(n_devices=2), "n_devices=2, but this machine has"),
    ("meta target", dict(device_map={"model.layers.0": "meta"}), "meta device holds no weights"),
    ("disk target", dict(device_map={"": "disk"}), "disk offload is not supported"),
    ("missing GPU index", dict(device_map={"": 7}), "GPU 7 does not exist"),
    ("negative GPU index", dict(device_map={"": -1}), "negative"),
    ("unknown target", dict(device_map={"": "tpu"}), "not a device"),
    ("target a list", dict(device_map={"": ["cpu"]}), "give a GPU index"),
    ("empty map", dict(device_map={}), "is empty"),
    ("unknown strategy", dict(device_map="fastest"), "neither a strategy"),
    ("map not JSON", dict(device_map='{"model": cpu}'), "device_map is not valid JSON"),
    ("max_memory not JSON", dict(device_map="auto", max_memory="{0: 1GB}"), "max_memory is not valid JSON"),
    ("max_memory a list", dict(device_map="auto", max_memory="[1, 2]"), "must be a JSON object"),
    ("max_memory bad size", dict(device_map="auto", max_memory={"cpu": "lots"}), "not a size"),
    ("max_memory zero", dict(device_map="auto", max_memory={"cpu": 0}), "more than 0 bytes"),
    ("max_memory negative", dict(device_map="auto", max_memory={"cpu": "-3GB"}), "not a size"),
    ("max_memory nan", dict(device_map="auto", max_memory={"cpu": float("nan")}), "whole number of bytes"),
    ("max_memory unknown device", dict(device_map="auto", max_memory={"gpu0": "1GB"}), "not a device"),
    ("max_memory missing GPU", dict(device_map="auto", max_memory={"3": "1GB"}), "GPU 3 does not exist"),
    ("max_memory alone", dict(max_memory={"cpu": "1GB"}), "give one of them too"),
    ("max_memory with a dict map", dict(device_map={"": "cpu"}, max_memory={"cpu": "1GB"}),
     "already says where each module goes"),
]


@pytest.mark.parametrize("arguments, message", [c[1:] for c in BAD_PLACEMENTS], ids=[c[0] for c in BAD_PLACEMENTS])
def test_a_bad_placement_is_refused_before_the_model_is_even_looked_up(arguments, message, monkeypatch):
    looked_up = []
    monkeypatch.setattr(models, "resolve_source", lambda *a, **k: looked_up.append(a))
    with pytest.raises(InputError, match=message):
        load_model("tiny-llama", **arguments)
    assert looked_up == []


@pytest.mark.parametrize("device_map, message", [
    ({"model.foo": "cpu"}, "does not have. Module names look like 'model', 'model.embed_tokens'"),
    ({"model.embed_tokens": "cpu"}, "places no module holding 'model.layers.0"),
])
def test_a_map_that_does_not_fit_the_model_is_refused_before_any_weights_load(device_map, message, monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    def boot(*args, **kwargs):
        raise AssertionError("booted although the map was bad")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boot)
    with pytest.raises(InputError, match=message):
        load_model("tiny-llama", device_map=device_map)


def test_tied_weights_split_across_gpus_are_refused():
    """Pretend GPUs: the check reads the map, not the machine (the embedding and unembedding are one tensor)."""
    config = models._load_hf_config(models.resolve_source("tiny-llama").target)
    empty = models._empty_model(config)
    split = Placement(device=None, device_map={"model": 0, "lm_head": 1})
    with pytest.raises(InputError, match="tied weights .* on cuda:0 and cuda:1"):
        params_per_device(split, empty, 0, "tiny-llama")
    together = Placement(device=None, device_map={"model.embed_tokens": 0, "model.layers": 1, "model.norm": 1,
                                                  "lm_head": 0})
    shares = params_per_device(together, empty, 0, "tiny-llama")
    layers = sum(p.numel() for p in empty.model.layers.parameters())
    assert shares["cuda:1"] == layers + empty.model.norm.weight.numel()
    assert sum(shares.values()) == sum(p.numel() for p in empty.parameters())  # the tied tensor counted once


def test_the_memory_check_counts_each_devices_share(monkeypatch):
    free = {"cuda:0": 3 * 2**30, "cuda:1": 1 * 2**30, "cpu": 100 * 2**30}
    monkeypatch.setattr(models, "_available_bytes", lambda device: free[device])
    half = 500_000_000  # 1.0 GB in float16, 1.2 GB with the load's 20%
    check_split_memory({"cuda:0": half, "cuda:1": half // 2}, torch.float16, "m")
    with pytest.raises(NotEnoughMemoryError, match="on cuda:1 for its 500M parameters mapped there"):
        check_split_memory({"cuda:0": half, "cuda:1": half}, torch.float16, "m")
    # a strategy or n_devices: the whole model against the sum of the budgets, each capped by free memory
    check_split_memory({"all": 2 * half}, torch.float16, "m", budgets={"cuda:0": 2**40, "cuda:1": 2**40})
    with pytest.raises(NotEnoughMemoryError, match=r"can use only 4.0 GiB \(3.0 GiB on cuda:0, 1.0 GiB on cuda:1"):
        check_split_memory({"all": 4 * half}, torch.float16, "m", budgets={"cuda:0": 2**40, "cuda:1": 2**40})
    with pytest.raises(NotEnoughMemoryError, match="raise max_memory"):
        check_split_memory({"all": 2 * half}, torch.float32, "m", budgets={"cuda:0": 2**31, "cuda:1": 2**30})


def test_a_budget_below_the_model_is_refused_before_loading():
    with pytest.raises(NotEnoughMemoryError, match="across its devices"):
        load_model("tiny-llama", device_map="sequential", max_memory={"cpu": "1KB"})


def test_max_memory_accepts_bytes_units_and_gpu_keys_as_text():
    assert parse_max_memory('{"cpu": "1.5GB"}') == {"cpu": 1_500_000_000}
    assert parse_max_memory({"cpu": 2**30}) == {"cpu": 2**30}
    assert resolve_placement(n_devices=1) == Placement(device="cpu", n_devices=1)  # one device: no split


@pytest.fixture(scope="module")
def split_tiny_llama():
    return load_model("tiny-llama", device_map=per_module_map(2))


def test_an_all_cpu_map_gives_the_plain_models_logits_patterns_and_fingerprint(tiny_llama, split_tiny_llama):
    tokens = tiny_llama.model.to_tokens(PROMPT)
    names = [pattern_hook(0), pattern_hook(1), z_hook(1)]
    plain_logits, plain = capture(tiny_llama.model, tokens, names)
    split_logits, split = capture(split_tiny_llama.model, tokens, names)
    assert torch.equal(plain_logits, split_logits)
    assert all(torch.equal(plain[name], split[name]) for name in names)
    info = split_tiny_llama.info
    assert json.loads(info.device_map) == per_module_map(2) and info.n_devices == 1 and info.device == "cpu"
    assert str(split_tiny_llama.model.cfg.device) == "cpu" and split_tiny_llama.model.cfg.n_devices == 1
    assert tiny_llama.info.device_map is None and tiny_llama.info.n_devices == 1


def test_where_the_weights_live_is_not_part_of_the_fingerprint():
    # fresh models: tokenising sets the tokenizer's padding and truncation, which the fingerprint hashes
    plain = load_model("tiny-llama", device="cpu")
    split = load_model("tiny-llama", device_map=per_module_map(2))
    assert model_fingerprint(split).digest == model_fingerprint(plain).digest
    assert model_fingerprint(load_model("tiny-llama", device="cpu", dtype="bfloat16")).digest != \
        model_fingerprint(plain).digest


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gemma3"])
def test_a_random_model_loaded_from_its_seeded_checkpoint_is_the_one_built_without_weights(name):
    built = load_model(name, device="cpu")
    loaded = load_model(name, device_map="auto")  # on a CPU-only machine: everything on the CPU
    assert loaded.info.device == "cpu" and loaded.info.device_map == "auto"
    assert model_fingerprint(built).digest == model_fingerprint(loaded).digest
    tokens = built.model.to_tokens(PROMPT)
    assert torch.equal(built.model(tokens), loaded.model(tokens))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_random_model_has_16_bit_weights(dtype):
    loaded = load_model("tiny-llama", device="cpu", dtype=dtype)
    floats = {p.dtype for p in loaded.model.original_model.parameters() if p.is_floating_point()}
    assert floats == {dtype} and loaded.info.dtype == str(dtype).replace("torch.", "")
    from headvis_core.limits import weight_bytes

    assert weight_bytes(loaded) * 2 == weight_bytes(load_model("tiny-llama", device="cpu"))


@pytest.fixture(scope="module")
def dispatched_tiny_llama(tmp_path_factory, tiny_llama):
    """tiny-llama dispatched by accelerate over the CPU and disk (layer 1 offloaded), booted by the bridge itself.

    HeadVis refuses disk targets; this is the only way to run accelerate's dispatch hooks on a
    CPU-only machine, and so to check that the workbench's hooked runs work on a split model.
    """
    from transformer_lens.model_bridge import TransformerBridge

    folder = models._random_weights_folder(models.resolve_source("tiny-llama"),
                                           models._load_hf_config(models.resolve_source("tiny-llama").target), 0)
    device_map = per_module_map(2) | {"model.layers.1": "disk"}
    bridge = TransformerBridge.boot_transformers(folder, device_map=device_map,
                                                 offload_folder=str(tmp_path_factory.mktemp("offload")))
    bridge.eval()
    assert set(bridge.original_model.hf_device_map.values()) == {"cpu", "disk"} and bridge.cfg.n_devices == 2
    return LoadedModel(model=bridge, info=tiny_llama.info)


def test_hooked_runs_on_a_dispatched_model_see_the_plain_models_activations(tiny_llama, dispatched_tiny_llama):
    tokens = tiny_llama.model.to_tokens(PROMPT)
    names = [pattern_hook(1), z_hook(1)]
    ablate = [(z_hook(0), lambda z, hook: z * 0)]
    plain_logits, plain = capture(tiny_llama.model, tokens, names, fwd_hooks=ablate)
    split_logits, split = capture(dispatched_tiny_llama.model, tokens, names, fwd_hooks=ablate)
    assert torch.equal(plain_logits, split_logits)
    assert all(torch.equal(plain[name], split[name]) for name in names)


def test_a_scan_on_a_dispatched_model_equals_the_plain_scan(tiny_llama, dispatched_tiny_llama, tmp_path):
    from headvis_core.data.corpus import open_corpus
    from headvis_core.scan import ScanParams, run_scan

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the cat sat on the mat and the dog sat on the log. " * 20)
    corpus = open_corpus(str(tmp_path / "corpus"))
    params = ScanParams(window_len=12, max_windows=8, reservoir_size=8)
    plain = run_scan(tiny_llama, corpus, params, out_dir=tmp_path / "a", batch_size=4)
    split = run_scan(dispatched_tiny_llama, corpus, params, out_dir=tmp_path / "b", batch_size=4)
    assert sorted(plain.arrays) == sorted(split.arrays)
    for name in plain.arrays:
        assert np.array_equal(plain.arrays[name], split.arrays[name], equal_nan=True), name


def test_smollm2_split_module_by_module_gives_the_plain_logits_and_patterns(smollm2):
    split = load_model("smollm2-135m", device_map=per_module_map(30))
    assert split.info.n_devices == 1 and split.info.device == "cpu" and split.model.cfg.n_devices == 1
    tokens = smollm2.model.to_tokens(PROMPT)
    names = [pattern_hook(0), pattern_hook(29)]
    plain_logits, plain = capture(smollm2.model, tokens, names)
    split_logits, captured = capture(split.model, tokens, names)
    assert torch.equal(plain_logits, split_logits)
    assert all(torch.equal(plain[name], captured[name]) for name in names)


def test_placements_over_pretend_gpus(monkeypatch):
    """The checks that need GPUs, with the GPU count pretended (nothing is loaded)."""
    from headvis_core.models import devices

    monkeypatch.setattr(devices, "n_cuda_devices", lambda: 2)
    split = resolve_placement(n_devices=2, max_memory='{"0": "20GiB", "1": "20GiB"}')
    assert split.is_split and split.boot_arguments() == {"device_map": None, "n_devices": 2,
                                                         "max_memory": {0: 20 * 2**30, 1: 20 * 2**30}}
    assert resolve_placement(device_map={"model": 0, "lm_head": "cuda:1"}).device_map == {"model": 0,
                                                                                         "lm_head": "cuda:1"}
    with pytest.raises(InputError, match="n_devices=3, but this machine has only 2 CUDA GPU"):
        resolve_placement(n_devices=3)
    with pytest.raises(InputError, match="give a budget for each of them"):
        resolve_placement(n_devices=2, max_memory={"0": "1GB"})
    with pytest.raises(InputError, match="budgets to GPUs and to the CPU"):
        resolve_placement(device_map="auto", max_memory={"0": "1GB", "cpu": "8GB"})
    with pytest.raises(InputError, match="mixes GPUs"):
        resolve_placement(device_map={"model": 0, "lm_head": "cpu"})
    with pytest.raises(InputError, match="device='cpu'"):
        resolve_placement(device="cpu", n_devices=2)
