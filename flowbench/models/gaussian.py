"""Full-covariance Gaussian fitted by maximum likelihood in closed form (the MAF paper's baseline row).

``z = L⁻¹ (x − μ)`` with ``Σ = L Lᵀ`` (Cholesky), ``log|det ∂z/∂x| = −Σ_i log L_ii``; ``μ`` and ``Σ``
(``ddof = 0``) are computed once by :meth:`GaussianFlow.initialize` in float64. Nothing is trained.
The class-conditional version fits one such Gaussian per class on that class's training rows, so
``log p(x | y) = N(x; μ_y, Σ_y)`` (MAF code: experiments.py, ``fit_and_evaluate_gaussian(cond=True)``).

References:
    Papamakarios, Pavlakou, Murray. "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017
    (Table 1, "Gaussian").
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from flowbench.errors import DataIntegrityError
from flowbench.models.base import (
    CompositeTransform,
    ConditionalFlow,
    Flow,
    StandardNormal,
    Transform,
    check_input,
    check_one_hot,
)
from flowbench.models.spec import ModelSpec, conditional_spec

__all__ = [
    "GAUSSIAN_SPEC",
    "GAUSSIAN_COND_SPEC",
    "GaussianWhitening",
    "GaussianFlow",
    "ConditionalGaussianWhitening",
    "ConditionalGaussianFlow",
    "build_gaussian",
    "build_gaussian_cond",
    "fit_gaussian",
]


@torch.no_grad()
def fit_gaussian(x: Tensor, what: str = "the training") -> tuple[Tensor, Tensor, Tensor]:
    """Maximum-likelihood mean, Cholesky factor of the covariance (``ddof = 0``) and its inverse, in float64."""
    x = x.to(torch.float64)
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / x.shape[0]
    eig = torch.linalg.eigvalsh(cov)
    # relative threshold: an exactly duplicated or constant column leaves only rounding error here
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0 or eig[0] <= 1e-12 * eig[-1].clamp_min(torch.finfo(torch.float64).tiny):
        raise DataIntegrityError(
            f"{what} covariance is singular (a constant or linearly dependent column?); "
            "remove such columns before fitting the Gaussian baseline"
        )
    eye = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return mean, chol, chol_inv


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
        mean, chol, chol_inv = fit_gaussian(train_x)
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


class ConditionalGaussianWhitening(Transform):
    """``x ↦ L_y⁻¹(x − μ_y)`` with class y's statistics (buffers (K, D) and (K, D, D)), y from the one-hot context.

    Rows are whitened class by class (a (B, D, D) gather of the factors would need 5 GB for a batch of 2,000
    MNIST rows).
    """

    conditional = True

    def __init__(self, dim: int, classes: int):
        super().__init__()
        eye = torch.eye(dim).expand(classes, dim, dim)
        self.register_buffer("mean", torch.zeros(classes, dim))
        self.register_buffer("chol", eye.clone())
        self.register_buffer("chol_inv", eye.clone())

    def _by_class(
        self, v: Tensor, context: Tensor, fn: Callable[[Tensor, int], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        labels = context.argmax(-1)
        out = torch.empty_like(v)
        logdet = v.new_empty(v.shape[0])
        for k in range(self.mean.shape[0]):
            rows = labels == k
            out[rows], logdet[rows] = fn(v[rows], k)
        return out, logdet

    def _logdet(self, k: int) -> Tensor:
        return -torch.log(torch.diagonal(self.chol[k])).sum()

    def forward(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        return self._by_class(x, context, lambda v, k: ((v - self.mean[k]) @ self.chol_inv[k].T, self._logdet(k)))

    def inverse(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        return self._by_class(z, context, lambda v, k: (v @ self.chol[k].T + self.mean[k], -self._logdet(k)))


class ConditionalGaussianFlow(ConditionalFlow):
    """One full-covariance Gaussian per class, fitted by :meth:`initialize` (``trainable`` is False)."""

    trainable = False

    def __init__(self, dim: int, classes: int):
        super().__init__(
            CompositeTransform([ConditionalGaussianWhitening(dim, classes)]), StandardNormal(dim), dim, classes
        )

    @torch.no_grad()
    def initialize(self, train_xy: Tensor) -> None:
        """Per class: the maximum-likelihood mean and covariance (``ddof = 0``) of its training rows, in float64."""
        check_input(train_xy, self.in_features, "train_x")
        check_one_hot(train_xy[:, self.dim :], "train_x")
        x, labels = train_xy[:, : self.dim], train_xy[:, self.dim :].argmax(-1)
        w = self.transform.transforms[0]
        for k in range(self.classes):
            rows = x[labels == k]
            if rows.shape[0] == 0:
                raise DataIntegrityError(f"class {k} has no training rows: the conditional Gaussian cannot be fitted")
            mean, chol, chol_inv = fit_gaussian(rows, f"class {k}'s training")
            w.mean[k].copy_(mean)
            w.chol[k].copy_(chol)
            w.chol_inv[k].copy_(chol_inv)

    def num_params(self) -> int:
        """K × (D means + D(D+1)/2 covariance entries)."""
        return self.classes * (self.dim + self.dim * (self.dim + 1) // 2)


def build_gaussian_cond(dim: int, *, classes: int) -> ConditionalFlow:
    """One closed-form full-covariance Gaussian per class; call ``initialize(train_xy)`` to fit them."""
    return ConditionalGaussianFlow(dim, classes)


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

GAUSSIAN_COND_SPEC = conditional_spec(
    GAUSSIAN_SPEC, build_gaussian_cond, lambda d, hp, k: k * GAUSSIAN_SPEC.count(d, hp)
)
