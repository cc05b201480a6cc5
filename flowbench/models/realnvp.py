"""Real NVP with affine coupling layers, configured as in the MAF paper's experiments.

Coupling (data → noise), mask ``b`` (1 = passed through unchanged):
``u = b·x + (1 − b)·exp(−s(b·x))·(x − t(b·x))``, ``log|det| = −Σ (1 − b)·s``.
``s`` is an MLP with tanh hidden units, ``t`` one with ReLU units, both with a linear output of size D and
the same hidden sizes; the masks alternate, starting from ``arange(D) % 2``; a batch norm follows every
coupling layer, the last included (switchable). The class-conditional version (MAF code:
ConditionalCouplingLayer, ConditionalRealNVP) feeds both nets ``[onehot(y), b·x]`` (the label first).

References:
    Dinh, Sohl-Dickstein, Bengio. "Density estimation using Real NVP", ICLR 2017.
    Papamakarios, Pavlakou, Murray. "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017
    (code: gpapamak/maf, ml/models/nvps.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowbench.errors import ConfigError, InputError
from flowbench.models.base import CompositeTransform, ConditionalFlow, Flow, StandardNormal, Transform
from flowbench.models.layers import BatchNorm, Linear, maf_linear_init_
from flowbench.models.maf import MAF_HPARAMS
from flowbench.models.spec import ModelSpec, conditional_spec

__all__ = ["REALNVP_SPEC", "REALNVP_COND_SPEC", "CouplingLayer", "build_realnvp", "build_realnvp_cond"]


def _mlp(dim: int, hidden: int, hidden_layers: int, activation: type[nn.Module], extra_in: int = 0) -> nn.Sequential:
    """MLP from ``extra_in + dim`` inputs (a conditional layer's label columns first) to ``dim`` outputs."""
    sizes = [extra_in + dim] + [hidden] * hidden_layers
    mods: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        mods += [Linear(n_in, n_out), activation()]
    mods.append(Linear(hidden, dim))
    for m in mods:
        if isinstance(m, nn.Linear):
            maf_linear_init_(m.weight, m.bias)
    return nn.Sequential(*mods)


class CouplingLayer(Transform):
    """Affine coupling layer of Real NVP (MAF-code variant: both nets read the masked input ``b·x``).

    ``forward`` also evaluates R stacked runs (parameters and input with a leading run axis).
    ``context_features = K > 0``: class-conditional (MAF code's ConditionalCouplingLayer): both nets read
    ``[context, b·x]``, ``context`` the label's one-hot (B, K).
    """

    stacks = True

    def __init__(self, mask: Tensor, hidden: int, hidden_layers: int, context_features: int = 0):
        super().__init__()
        dim = mask.numel()
        self.register_buffer("mask", mask.to(torch.get_default_dtype()), persistent=False)
        self.conditional = context_features > 0
        self.scale_net = _mlp(dim, hidden, hidden_layers, nn.Tanh, context_features)
        self.translate_net = _mlp(dim, hidden, hidden_layers, nn.ReLU, context_features)

    def _net_input(self, masked: Tensor, context: Tensor | None) -> Tensor:
        if not self.conditional:
            return masked
        if context is None:
            raise InputError("a class-conditional coupling layer needs the label's one-hot as context")
        return torch.cat([context, masked], -1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mx = self.mask * x
        h = self._net_input(mx, context)
        s, t = self.scale_net(h), self.translate_net(h)
        inv = 1.0 - self.mask
        return mx + inv * torch.exp(-s) * (x - t), -(inv * s).sum(-1)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mu = self.mask * u  # the passed-through half is the same on both sides
        h = self._net_input(mu, context)
        s, t = self.scale_net(h), self.translate_net(h)
        inv = 1.0 - self.mask
        return mu + inv * (u * torch.exp(s) + t), (inv * s).sum(-1)


def build_realnvp(dim: int, *, layers: int, hidden: int, hidden_layers: int, batch_norm: bool) -> Flow:
    """Real NVP(K) with a standard normal base (Dinh et al. 2017; MAF paper's configuration)."""
    return Flow(_realnvp_transform(dim, layers, hidden, hidden_layers, batch_norm), StandardNormal(dim), dim)


def build_realnvp_cond(
    dim: int, *, classes: int, layers: int, hidden: int, hidden_layers: int, batch_norm: bool
) -> ConditionalFlow:
    """Class-conditional Real NVP(K) (MAF code: ConditionalRealNVP)."""
    transform = _realnvp_transform(dim, layers, hidden, hidden_layers, batch_norm, classes)
    return ConditionalFlow(transform, StandardNormal(dim), dim, classes)


def _realnvp_transform(
    dim: int, layers: int, hidden: int, hidden_layers: int, batch_norm: bool, classes: int = 0
) -> CompositeTransform:
    if layers < 1 or hidden < 1 or hidden_layers < 1:
        raise ConfigError(
            f"layers, hidden and hidden_layers must be ≥ 1; got layers={layers}, hidden={hidden}, "
            f"hidden_layers={hidden_layers}"
        )
    mask = torch.arange(dim) % 2
    steps: list[Transform] = []
    for _ in range(layers):
        steps.append(CouplingLayer(mask, hidden, hidden_layers, classes))
        if batch_norm:
            steps.append(BatchNorm(dim))
        mask = 1 - mask
    return CompositeTransform(steps)


def _realnvp_count(d: int, hp: dict) -> int:
    """K·[4DH + 2(L−1)H² + 2LH + 2D] (scale and translation nets) + 2KD for the batch norms."""
    h, hl, k = hp["hidden"], hp["hidden_layers"], hp["layers"]
    bn = 2 * k * d if hp["batch_norm"] else 0
    return k * (4 * d * h + 2 * (hl - 1) * h * h + 2 * hl * h + 2 * d) + bn


REALNVP_SPEC = ModelSpec(
    name="realnvp",
    build=build_realnvp,
    hparams={k: MAF_HPARAMS[k] for k in ("layers", "hidden", "hidden_layers", "batch_norm")},
    label="Real NVP ({layers})",
    paper="Dinh et al. 2017, Real NVP",
    lr=1e-4,
    match_knob="hidden",
    count=_realnvp_count,
)

#: + the label's K inputs to the first layer of both nets of every coupling layer
REALNVP_COND_SPEC = conditional_spec(
    REALNVP_SPEC, build_realnvp_cond, lambda d, hp, k: _realnvp_count(d, hp) + hp["layers"] * 2 * k * hp["hidden"]
)
