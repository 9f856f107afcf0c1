"""Fixtures of the model tests: the real Gemma 3 270M (``gemma3``), where it has been fetched.

Gemma is fetched only after its licence is accepted, so tests never fetch it
themselves: they skip with the command to run. Tests using ``gemma3`` carry
the ``real_model`` marker, like those using ``smollm2``.
"""

import pytest

GEMMA = "gemma-3-270m"


@pytest.fixture(scope="session")
def gemma3():
    from headvis_core.models.loader import load_model
    from headvis_core.models.offline import is_fetched

    if not is_fetched(GEMMA):
        pytest.skip(f"{GEMMA} is not fetched: read the Gemma Terms of Use, then run "
                    f"`python -m headvis_core models fetch {GEMMA} --accept-gemma-terms`")
    return load_model(GEMMA, device="cpu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gemma3" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_model)
