"""The linear layers of neural spline flows: a fixed random permutation and an LU-parameterised linear map.

``LULinear``: ``z = L U x + b`` with L unit lower triangular, U upper triangular with diagonal
``softplus(ũ) + ε`` (ε = 1e-3), so the map is invertible by construction and
``log|det| = Σ_i log(softplus(ũ_i) + ε)`` costs O(D). It starts at the identity (L = U = I, b = 0).
Together with a permutation P fixed at construction this is the ``W = P L U`` parameterisation of the
paper's tabular experiments.

References:
    Durkan, Bekasov, Murray, Papamakarios. "Neural Spline Flows", NeurIPS 2019, section 5.1
    (code: bayesiains/nsf, nde/transforms/lu.py and permutations.py; experiments/uci.py builds each
    linear layer as RandomPermutation followed by LULinear(identity_init=True)).
    Kingma, Dhariwal. "Glow: Generative flow with invertible 1x1 convolutions", NeurIPS 2018 (the LU idea).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowbench.errors import ConfigError
from flowbench.models.base import Transform

__all__ = ["LULinear", "Permutation", "lu_param_count"]


def lu_param_count(dim: int) -> int:
    """D(D − 1)/2 entries each for L and U, D for U's diagonal, D for the bias."""
    return dim * dim + dim


class Permutation(Transform):
    """``z = x[:, perm]``; the permutation is a persistent buffer, so a saved model reloads the same one.

    ``perm`` defaults to a draw from torch's global generator (seeded by the caller, as run_experiment does
    before building the model).
    """

    def __init__(self, dim: int, perm: Tensor | None = None):
        super().__init__()
        perm = torch.randperm(dim) if perm is None else torch.as_tensor(perm, dtype=torch.long)
        if sorted(perm.tolist()) != list(range(dim)):
            raise ConfigError(f"not a permutation of 0..{dim - 1}: {perm.tolist()}")
        self.register_buffer("perm", perm)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z[:, torch.argsort(self.perm)], z.new_zeros(z.shape[0])


class LULinear(Transform):
    """``z = L U x + b`` (see the module docstring), identity at initialisation."""

    def __init__(self, dim: int, eps: float = 1e-3):
        super().__init__()
        self.dim, self.eps = dim, eps
        n_tri = dim * (dim - 1) // 2
        self.lower_entries = nn.Parameter(torch.zeros(n_tri))
        self.upper_entries = nn.Parameter(torch.zeros(n_tri))
        # softplus⁻¹(1 − ε): the diagonal starts at exactly 1
        self.unconstrained_diag = nn.Parameter(torch.full((dim,), math.log(math.expm1(1 - eps))))
        self.bias = nn.Parameter(torch.zeros(dim))
        # row-major order of the entries, as the reference's numpy tril/triu indices
        lower_idx = torch.tril_indices(dim, dim, offset=-1)
        upper_idx = torch.triu_indices(dim, dim, offset=1)
        self.register_buffer("_lower_flat", lower_idx[0] * dim + lower_idx[1], persistent=False)
        self.register_buffer("_upper_flat", upper_idx[0] * dim + upper_idx[1], persistent=False)

    def _diag(self) -> Tensor:
        return F.softplus(self.unconstrained_diag) + self.eps

    def _factors(self) -> tuple[Tensor, Tensor]:
        d = self.dim
        eye = torch.eye(d, dtype=self.bias.dtype, device=self.bias.device)
        lower = eye.flatten().index_put((self._lower_flat,), self.lower_entries).view(d, d)
        upper = torch.diag(self._diag()).flatten().index_put((self._upper_flat,), self.upper_entries).view(d, d)
        return lower, upper

    def weight(self) -> Tensor:
        lower, upper = self._factors()
        return lower @ upper

    def logabsdet(self) -> Tensor:
        return torch.log(self._diag()).sum()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        # two triangular products: 2·N·D² flops, against D³ for forming L U first
        z = F.linear(F.linear(x, upper), lower, self.bias)
        return z, self.logabsdet().expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        rhs = (z - self.bias).T
        h = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper, h, upper=True).T
        return x, (-self.logabsdet()).expand(z.shape[0])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"
