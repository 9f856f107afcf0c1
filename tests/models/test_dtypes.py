"""16-bit models on the CPU: a scan and an atlas in bfloat16 and float16 are close to float32's, with no NaN.

Tolerance, per quantity q (the float32 value q32, the 16-bit one q16):
``|q16 - q32| <= atol + rtol * max|q32|`` over all heads, with ``max|q32|`` taken per metric
(per array for the scan's sums). bfloat16 keeps 8 significant bits (about 0.4%), float16 11
(about 0.05%), so rtol is 1e-2 for bfloat16 and 2e-3 for float16, atol 1e-4 and 2e-5.
Measured on tiny-llama (window 32, 32 windows; atlas 6 x 32 tokens): the largest |q16 - q32| /
max|q32| was 2.4% of a near-zero metric (retrieval, max 0.0017: within atol) and otherwise at most
0.5% in bfloat16; in float16 at most 0.5% (direct copying, max 9e-5), 0.2% or less elsewhere. The
worst quantity used 36% of its bound in bfloat16, 22% in float16. float16 runs on the CPU in torch
2.13 (no op refused).

A real model drifts more through its 30 layers. SmolLM2 (window 32, 16 windows of Austen), worst
|q16 - q32| / max|q32| per quantity: bfloat16 7% (the top windows' scores), 3.2% (q-k distance),
1.9% (its variance), 1.3% (logit z-score), 0.5% or less for the distance and score sums, logit std
and margin; float16 1% (top scores) and 0.4% or less elsewhere. So the SmolLM2 test allows rtol 1e-1
(bfloat16) and 2e-2 (float16), atol 1e-3 and 1e-4; on the test's 4 windows of 16 tokens the worst
quantity (the top scores) uses 66% of its bound in bfloat16, 39% in float16. The entropies of a
head's high-attention tokens are left out there: they count the tokens above a threshold, so one
rounding moves a token across it (measured: 0.9 bits of 7.3 in both 16-bit dtypes, on 16 windows),
or leaves a head with no token over it (the entropy is then undefined, NaN, in one dtype only); they
are not a precision figure.
"""

import math

import numpy as np
import pytest

from headvis_core.atlas.run import METRIC_COLUMNS, builtin_probe_set, run_atlas
from headvis_core.data.corpus import open_corpus
from headvis_core.models.loader import load_model
from headvis_core.scan import ScanParams, run_scan

TOLERANCE = {"bfloat16": (1e-2, 1e-4), "float16": (2e-3, 2e-5)}  # (rtol, atol)
REAL_MODEL_TOLERANCE = {"bfloat16": (1e-1, 1e-3), "float16": (2e-2, 1e-4)}
THRESHOLD_METRICS = ("query_token_entropy", "key_token_entropy")  # discontinuous: see the module docstring
SCAN_SUMS = ("distance_sum", "score_sum", "top_scores")


def assert_close(reference: np.ndarray, value: np.ndarray, dtype: str, what: str,
                 tolerance: dict = TOLERANCE) -> None:
    reference, value = np.asarray(reference, dtype=np.float64), np.asarray(value, dtype=np.float64)
    assert not np.isnan(value[~np.isnan(reference)]).any(), f"{what}: NaN in {dtype} where float32 has a number"
    finite = np.isfinite(reference)
    if not finite.any():
        return
    rtol, atol = tolerance[dtype]
    bound = atol + rtol * np.abs(reference[finite]).max()
    worst = np.abs(value[finite] - reference[finite]).max()
    assert worst <= bound, f"{what} in {dtype}: off by {worst:.3g}, more than {bound:.3g}"


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype_corpus")
    words = ("the cat sat on the mat while a dog ran to the door and the bird sang in the tree "
             "then Mary gave John a book because John had given Mary a pen").split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(2000))
    (root / "a.txt").write_text(text)
    return open_corpus(str(root))


def scan(name: str, dtype: str, corpus, out_dir, window: int = 32, windows: int = 32):
    loaded = load_model(name, device="cpu", dtype=dtype)
    params = ScanParams(window_len=window, max_windows=windows, reservoir_size=8)
    return run_scan(loaded, corpus, params, out_dir=out_dir, batch_size=4)


@pytest.fixture(scope="module")
def float32_scan(text_corpus, tmp_path_factory):
    return scan("tiny-llama", "float32", text_corpus, tmp_path_factory.mktemp("f32"))


def assert_scans_close(reference, other, dtype: str, tolerance: dict = TOLERANCE, skip: tuple = ()) -> None:
    assert other.meta["model"]["dtype"] == dtype and other.n_windows == reference.n_windows
    for name in SCAN_SUMS:
        assert_close(reference.arrays[name], other.arrays[name], dtype, name, tolerance)
    assert np.array_equal(reference.arrays["token_count"], other.arrays["token_count"])  # same tokens seen
    ours, theirs = reference.headvis_metrics(), other.headvis_metrics()
    for name in ours:
        if skip and name.startswith(skip):
            continue  # counts of tokens over a threshold: see the module docstring
        assert_close(ours[name], theirs[name], dtype, f"scan {name}", tolerance)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_scan_is_close_to_float32(dtype, text_corpus, float32_scan, tmp_path):
    assert_scans_close(float32_scan, scan("tiny-llama", dtype, text_corpus, tmp_path), dtype)


@pytest.fixture(scope="module")
def float32_atlas():
    model = load_model("tiny-llama", device="cpu").model
    return run_atlas(model, builtin_probe_set(model, n_seqs=6, seq_len=32), model_name="tiny-llama")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_atlas_is_close_to_float32(dtype, float32_atlas):
    model = load_model("tiny-llama", device="cpu", dtype=dtype).model
    atlas = run_atlas(model, builtin_probe_set(model, n_seqs=6, seq_len=32), model_name="tiny-llama")
    assert len(atlas.table) == len(float32_atlas.table) == 8
    for column in METRIC_COLUMNS:
        assert_close(float32_atlas.table[column].to_numpy(float), atlas.table[column].to_numpy(float), dtype,
                     f"atlas {column}")


def test_the_tolerance_would_catch_a_real_difference():
    with pytest.raises(AssertionError, match="off by"):
        assert_close(np.array([0.5, 0.2]), np.array([0.5, 0.2 + 0.01]), "bfloat16", "q")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(np.array([0.5, 0.2]), np.array([0.5, math.nan]), "float16", "q")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_short_smollm2_scan_in_16_bits_is_close_to_float32(smollm2, dtype, text_corpus, tmp_path):
    reference = run_scan(smollm2, text_corpus, ScanParams(window_len=16, max_windows=4, reservoir_size=8),
                         out_dir=tmp_path / "f32", batch_size=4)
    other = scan("smollm2-135m", dtype, text_corpus, tmp_path / dtype, window=16, windows=4)
    assert_scans_close(reference, other, dtype, REAL_MODEL_TOLERANCE, skip=THRESHOLD_METRICS)
