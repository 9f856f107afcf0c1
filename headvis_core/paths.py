"""Where the workbench keeps files it makes: converted models, scan results.

Everything lives in one per-user folder outside the repository:
``$HEADVIS_HOME`` if set, else ``$XDG_CACHE_HOME/headvis``, else
``~/.cache/headvis``.
"""

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("HEADVIS_HOME"):
        return Path(os.environ["HEADVIS_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "headvis"


def models_dir() -> Path:
    return cache_root() / "models"


def results_dir(kind: str) -> Path:
    """Folder for stored results of one kind (``"scans"``, ``"experiments"``, ...)."""
    return cache_root() / "results" / kind
