"""Principal component analysis of one head's activation vectors, with a rotation kept for later projections.

An exact SVD of the centred data in float64 (the data are at most a few
thousand vectors of ``d_head`` or ``d_model`` values, so the exact
decomposition costs milliseconds and, unlike ``torch.pca_lowrank``, is the
same on every run). Each component's sign is fixed so that its largest-magnitude
loading is positive, so a refit of the same data gives the same picture.
"""


from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from headvis_core.errors import InputError

N_COMPONENTS = 3


@dataclass(frozen=True)
class PcaFit:
    mean: np.ndarray  # [dim]
    components: np.ndarray  # [component, dim], orthonormal rows
    explained: np.ndarray  # [component] share of the variance

    def transform(self, vectors: Float[torch.Tensor, "pair dim"] | np.ndarray) -> np.ndarray:
        """``[pair, component]`` coordinates of ``vectors`` in this fit's rotation."""
        data = vectors.detach().double().cpu().numpy() if isinstance(vectors, torch.Tensor) else \
            np.asarray(vectors, np.float64)
        return (data - self.mean) @ self.components.T


def fit_pca(vectors: Float[torch.Tensor, "pair dim"] | np.ndarray, n_components: int = N_COMPONENTS,
            what: str = "these vectors") -> PcaFit:
    """The top ``n_components`` principal axes of ``vectors`` (see the module docstring).

    Needs more vectors than components (``n`` centred vectors span at most ``n - 1`` directions).
    """
    data = torch.as_tensor(np.asarray(vectors) if not isinstance(vectors, torch.Tensor) else vectors.detach().cpu(),
                           dtype=torch.float64)
    n, dim = data.shape
    if n <= n_components:
        raise InputError(f"PCA of {what} needs at least {n_components + 1} pairs for {n_components} components; "
                         f"there are {n}.")
    if dim < n_components:
        raise InputError(f"PCA of {what}: {n_components} components asked of {dim}-dimensional vectors.")
    mean = data.mean(0)
    _, singular, vh = torch.linalg.svd(data - mean, full_matrices=False)
    components = vh[:n_components]
    biggest = components.abs().argmax(1)
    signs = torch.sign(components[torch.arange(n_components), biggest])
    components = components * torch.where(signs == 0, 1.0, signs)[:, None]
    variance = singular ** 2
    explained = variance[:n_components] / variance.sum().clamp(min=1e-300)
    return PcaFit(mean.numpy(), components.numpy(), explained.numpy())
