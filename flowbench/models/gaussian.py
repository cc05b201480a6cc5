"""Full-covariance Gaussian fitted by maximum likelihood in closed form (the MAF paper's baseline row).

``z = L⁻¹ (x − μ)`` with ``Σ = L Lᵀ`` (Cholesky), ``log|det ∂z/∂x| = −Σ_i log L_ii``; ``μ`` and ``Σ``
(``ddof = 0``) are computed once by :meth:`GaussianFlow.initialize` in float64. Nothing is trained.

References:
    Papamakarios, Pavlakou, Murray. "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017
    (Table 1, "Gaussian").
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowbench.errors import DataIntegrityError
from flowbench.models.base import CompositeTransform, Flow, StandardNormal, Transform, check_input
from flowbench.models.spec import ModelSpec

__all__ = ["GAUSSIAN_SPEC", "GaussianWhitening", "GaussianFlow", "build_gaussian"]


class GaussianWhitening(Transform):
    """Affine whitening map ``x ↦ L⁻¹(x − μ)``; the statistics are buffers (saved, moved, not trained)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("chol", torch.eye(dim))
        self.register_buffer("chol_inv", torch.eye(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = (x - self.mean) @ self.chol_inv.T
        return z, self._logdet().expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z @ self.chol.T + self.mean, -self._logdet().expand(z.shape[0])

    def _logdet(self) -> Tensor:
        return -torch.log(torch.diagonal(self.chol)).sum()


class GaussianFlow(Flow):
    """The Gaussian baseline: :meth:`initialize` fits it completely, so ``trainable`` is False."""

    trainable = False

    def __init__(self, dim: int):
        super().__init__(CompositeTransform([GaussianWhitening(dim)]), StandardNormal(dim), dim)

    @torch.no_grad()
    def initialize(self, train_x: Tensor) -> None:
        """Maximum-likelihood mean and covariance (``ddof = 0``) of ``train_x``, computed in float64."""
        check_input(train_x, self.dim, "train_x")
        x = train_x.to(torch.float64)
        mean = x.mean(0)
        xc = x - mean
        cov = xc.T @ xc / x.shape[0]
        eig = torch.linalg.eigvalsh(cov)
        # relative threshold: an exactly duplicated or constant column leaves only rounding error here
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0 or eig[0] <= 1e-12 * eig[-1].clamp_min(torch.finfo(torch.float64).tiny):
            raise DataIntegrityError(
                "the training covariance is singular (a constant or linearly dependent column?); "
                "remove such columns before fitting the Gaussian baseline"
            )
        eye = torch.eye(self.dim, dtype=torch.float64, device=x.device)
        chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        w = self.transform.transforms[0]
        w.mean.copy_(mean)
        w.chol.copy_(chol)
        w.chol_inv.copy_(chol_inv)

    def num_params(self) -> int:
        """The fitted statistics: D means + D(D+1)/2 covariance entries (there are no nn.Parameters)."""
        return self.dim + self.dim * (self.dim + 1) // 2


def build_gaussian(dim: int) -> Flow:
    """Closed-form full-covariance Gaussian; call ``initialize(train_x)`` to fit it."""
    return GaussianFlow(dim)


GAUSSIAN_SPEC = ModelSpec(
    name="gaussian",
    build=build_gaussian,
    hparams={},
    label="Gaussian",
    paper="Papamakarios et al. 2017, Masked Autoregressive Flow for Density Estimation",
    lr=1e-4,  # unused: nothing is trained
    count=lambda d, hp: d + d * (d + 1) // 2,
    trainable=False,
)
