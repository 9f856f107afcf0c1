"""The memory guard: estimates from a request's shape, the cap's precedence, refusals before any work.

The real-model test runs the issue's requests through the CLI in a subprocess and measures the process's
peak resident set size (``os.wait4``): each is refused, and none goes past the cap.
"""

import os
import subprocess
import sys

import pytest

from headvis_core.errors import InputError
from headvis_core.limits import (
    DEFAULT_CAP_GB,
    GIB,
    PATTERN_COPIES,
    MemoryLimitError,
    ModelDims,
    check_atlas_memory,
    check_forward,
    forward_estimate,
    largest_tokens,
    memory_cap_bytes,
    weight_bytes,
)
from headvis_core.models.loader import load_model
from tests.conftest import CORPUS, ROOT

SMOLLM2 = ModelDims(n_layers=30, n_heads=9, d_model=576, d_mlp=1536, d_vocab=49152, n_ctx=8192)


def test_attention_grows_with_heads_and_the_square_of_the_tokens():
    small = forward_estimate(SMOLLM2, batch=1, tokens=1024, logit_positions=0)
    big = forward_estimate(SMOLLM2, batch=2, tokens=2048, logit_positions=0)
    assert small.parts["attention patterns"] == 9 * 1024**2 * 4 * PATTERN_COPIES
    assert big.parts["attention patterns"] == 8 * small.parts["attention patterns"]
    assert small.parts["logits"] == 0
    with_logits = forward_estimate(SMOLLM2, batch=1, tokens=1024)
    assert with_logits.parts["logits"] == 1024 * 49152 * 4 * 2


def test_the_issues_requests_are_far_over_a_few_gigabytes():
    atlas = forward_estimate(SMOLLM2, batch=16, tokens=8192, logit_positions=0)
    prompt = forward_estimate(SMOLLM2, batch=1, tokens=8192)
    assert atlas.total > 100 * GIB and prompt.total > 6 * GIB


def test_the_cap_comes_from_the_argument_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.delenv("HEADVIS_MEMORY_CAP_GB", raising=False)
    assert memory_cap_bytes() == 6 * GIB
    monkeypatch.setenv("HEADVIS_MEMORY_CAP_GB", "2.5")
    assert memory_cap_bytes() == int(2.5 * GIB)
    assert memory_cap_bytes(1.0) == GIB
    for bad in ("abc", "nan", "-1", "0"):
        monkeypatch.setenv("HEADVIS_MEMORY_CAP_GB", bad)
        with pytest.raises(InputError, match="HEADVIS_MEMORY_CAP_GB|positive"):
            memory_cap_bytes()


def test_largest_tokens_is_the_boundary_of_the_estimate():
    budget = 2 * GIB
    n = largest_tokens(SMOLLM2, batch=1, budget=budget)
    assert forward_estimate(SMOLLM2, 1, n).total <= budget < forward_estimate(SMOLLM2, 1, n + 1).total


def test_a_request_over_the_cap_is_refused_with_the_estimate_the_limit_and_what_fits(tiny_llama):
    with pytest.raises(MemoryLimitError) as refused:
        check_forward(tiny_llama.model, batch=64, tokens=256, what="this prompt", cap_gb=0.001)
    text = str(refused.value)
    assert text.startswith("This prompt needs about") and "over the limit of 1 MiB" in text
    small = check_forward(tiny_llama.model, batch=1, tokens=16, what="this prompt", cap_gb=64)
    assert small.total > 0


def test_an_8192_token_prompt_on_smollm2_is_refused_under_the_default_cap(smollm2, monkeypatch):
    monkeypatch.delenv("HEADVIS_MEMORY_CAP_GB", raising=False)
    with pytest.raises(MemoryLimitError, match=f"over the limit of {DEFAULT_CAP_GB} GiB"):
        check_forward(smollm2.model, batch=1, tokens=8192, what="this prompt")
    assert check_forward(smollm2.model, batch=1, tokens=512, what="this prompt").total < GIB


def _peak_rss(args: list[str], tmp_path) -> tuple[int, int, str]:
    env = dict(os.environ, HEADVIS_STORE_DIR=str(tmp_path / "store"))
    env.pop("HEADVIS_MEMORY_CAP_GB", None)
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "headvis_core", *args], cwd=ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, err_path.read_text()


ISSUE_REQUESTS = [
    ("atlas 16 x 8192", ["atlas", "--n-seqs", "16", "--seq-len", "8192", "--out", "{tmp}/a.csv"]),
    ("scan --window 8191", ["scan", "--corpus", "{corpus}", "--window", "8191", "--out", "{tmp}/scan"]),
    ("induction 4000 x 64", ["ablate", "--preset", "induction", "--half-len", "4000", "--n-prompts", "64",
                             "--out", "{tmp}/i.json"]),
    ("scan --batch-size 0", ["scan", "--corpus", "{corpus}", "--batch-size", "0"]),
    ("scan --batch-size -1", ["scan", "--corpus", "{corpus}", "--batch-size", "-1"]),
]


@pytest.mark.real_model
@pytest.mark.parametrize("args", [r[1] for r in ISSUE_REQUESTS], ids=[r[0] for r in ISSUE_REQUESTS])
def test_the_issues_requests_are_refused_and_stay_under_the_cap(args, tmp_path):
    if not CORPUS.is_dir():
        pytest.skip("../shared/corpus is not here")
    args = [a.replace("{tmp}", str(tmp_path)).replace("{corpus}", str(CORPUS / "gutenberg")) for a in args]
    status, peak, err = _peak_rss([args[0], "--model", "smollm2-135m", *args[1:]], tmp_path)
    assert status == 2 and "Traceback" not in err
    assert "error: " in err
    assert peak < memory_cap_bytes(), f"peak RSS {peak / GIB:.2f} GiB"
    if "--batch-size" not in args:
        assert f"over the limit of {DEFAULT_CAP_GB} GiB" in err


def test_16_bit_weights_count_at_their_size_and_activations_at_float32(tiny_llama):
    half = load_model("tiny-llama", device="cpu", dtype="bfloat16")
    assert weight_bytes(half) * 2 == weight_bytes(tiny_llama)
    assert ModelDims.of(half).bytes_per_value == ModelDims.of(tiny_llama).bytes_per_value == 4
    full_parts = check_atlas_memory(tiny_llama, 8, 64, cap_gb=64).parts
    half_parts = check_atlas_memory(half, 8, 64, cap_gb=64).parts
    label = "weight copies and score temporaries"
    assert full_parts[label] - half_parts[label] == (weight_bytes(tiny_llama) - weight_bytes(half)) * 3 // 2
    assert {k: v for k, v in full_parts.items() if k != label} == {k: v for k, v in half_parts.items() if k != label}


def test_the_scan_estimate_counts_the_score_reductions_float32_temporaries(tiny_llama):
    from headvis_core.limits import FLOAT32_BYTES, SCORE_REDUCTION_COPIES, ModelDims, check_scan_memory
    estimate = check_scan_memory(tiny_llama, window_len=63, batch_size=4)
    n_heads = ModelDims.of(tiny_llama).n_heads
    expected = int(4 * n_heads * 64 * 64 * FLOAT32_BYTES * SCORE_REDUCTION_COPIES)
    assert estimate.parts["score statistics (float32 temporaries)"] == expected
