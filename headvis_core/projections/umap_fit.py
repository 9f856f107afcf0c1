"""UMAP of one head's activation vectors (McInnes, Healy & Melville 2018, "UMAP: Uniform Manifold Approximation
and Projection"), an optional view next to the PCA.

UMAP comes from ``umap-learn``, an optional dependency: without it only PCA is
computed, and asking for UMAP raises an :class:`InputError` saying how to get it.
A fixed ``random_state`` makes umap-learn run single-threaded and give the same
layout on every run of the same data (tested). Unlike the PCA, the layout has
no rotation to keep: a typed prompt is projected with the PCA only.
"""

import importlib
import importlib.util
import warnings

import numpy as np
import torch
from jaxtyping import Float

from headvis_core.errors import InputError

PIN = "umap-learn==0.5.12"
N_NEIGHBORS = 15  # umap-learn's default; fewer where a head has fewer pairs
MIN_DIST = 0.1



def umap_available() -> bool:
    """Whether umap-learn is installed (found, not imported: its import with numba takes seconds)."""
    return importlib.util.find_spec("umap") is not None


def require_umap() -> None:
    """Refuse UMAP with a clear message where umap-learn is not installed."""
    if not umap_available():
        raise InputError(f"UMAP needs the package umap-learn, which is not installed (pip install {PIN}); "
                         "without it only PCA is available.")


def _umap_module():
    require_umap()
    try:
        return importlib.import_module("umap")
    except ImportError as err:  # installed but broken (e.g. a numba that does not match numpy)
        raise InputError(f"umap-learn is installed but does not import ({err}); reinstall {PIN}.") from None


def fit_umap(vectors: Float[torch.Tensor, "pair dim"] | np.ndarray, n_components: int, seed: int = 0,
             what: str = "these vectors") -> np.ndarray:
    """``[pair, n_components]`` UMAP coordinates of ``vectors`` (deterministic for a given ``seed``).

    Needs at least ``n_components + 2`` vectors (the spectral initialisation solves for ``n_components + 1``
    eigenvectors of the neighbour graph).
    """
    umap = _umap_module()
    data = vectors.detach().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
    data = data.astype(np.float32)
    n = len(data)
    if n < n_components + 2:
        raise InputError(f"UMAP of {what} needs at least {n_components + 2} pairs for {n_components} components; "
                         f"there are {n}.")
    reducer = umap.UMAP(n_components=n_components, n_neighbors=min(N_NEIGHBORS, n - 1), min_dist=MIN_DIST,
                        random_state=int(seed), init="spectral" if n > N_NEIGHBORS else "random")
    with warnings.catch_warnings():
        # "n_jobs value 1 overridden to 1 by setting random_state": the determinism we ask for
        warnings.filterwarnings("ignore", message=".*random_state.*", category=UserWarning)
        coords = reducer.fit_transform(data)
    return np.asarray(coords, np.float32)
