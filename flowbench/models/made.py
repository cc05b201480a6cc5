"""MADE with Gaussian conditionals (also the autoregressive layer of MAF) and MADE with mixture-of-Gaussians
conditionals (MADE MoG, also the base density of MAF MoG).

Conditionals are parameterised by a mean ``m`` and a log precision ``logp``:
``u = exp(½ logp) · (x − m)``, ``log p(x) = −½ (D log 2π + Σ (u² − logp))``. Degrees are assigned
"sequentially" as in the MAF code, and all weight matrices are stored in full (masked entries included).

References:
    Germain, Gregor, Murray, Larochelle. "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015.
    Papamakarios, Pavlakou, Murray. "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017
    (code: gpapamak/maf, ml/models/mades.py).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from flowbench.errors import ConfigError
from flowbench.models.base import CompositeTransform, Flow, StandardNormal, Transform
from flowbench.models.layers import MaskedLinear, linear
from flowbench.models.spec import HParam, ModelSpec

__all__ = [
    "ACTIVATIONS",
    "create_degrees",
    "MADE",
    "MADEMoG",
    "MADE_HPARAMS",
    "MADE_SPEC",
    "MADE_MOG_SPEC",
    "build_made",
    "build_made_mog",
]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": torch.relu, "tanh": torch.tanh}

#: The MADE hyperparameters (MAF paper section 4: 100 hidden units, 1 or 2 hidden layers, ReLU); MAF and its
#: relatives reuse them.
MADE_HPARAMS: dict[str, HParam] = {
    "hidden": HParam(100, "hidden units per layer of each MADE / coupling net", low=1),
    "hidden_layers": HParam(1, "hidden layers per MADE / coupling net (the MAF paper used 1 or 2)", low=1),
    "activation": HParam("relu", "hidden-layer nonlinearity", choices=("relu", "tanh")),
}
COMPONENTS = HParam(10, "mixture components per conditional (MoG models)", low=1)


def create_degrees(dim: int, hidden: list[int], input_degrees: Tensor | None = None) -> list[Tensor]:
    """Degrees of the input units (``1..D`` or the given order) and of each hidden layer ("sequential" mode).

    A hidden unit of degree d may see inputs of degree ≤ d; output d may see hidden units of degree < d.
    """
    d0 = torch.arange(1, dim + 1) if input_degrees is None else torch.as_tensor(input_degrees).long()
    if sorted(d0.tolist()) != list(range(1, dim + 1)):
        raise ConfigError(f"input degrees must be a permutation of 1..{dim}; got {d0.tolist()}")
    degrees = [d0]
    for n in hidden:
        # sequential mode of the MAF code: cycle through 1..D-1 (all zeros when D == 1)
        degrees.append(torch.arange(n) % max(1, dim - 1) + min(1, dim - 1))
    return degrees


def _check_common(dim: int, hidden: int, hidden_layers: int, activation: str) -> None:
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"dim must be a positive integer; got {dim!r}")
    if hidden < 1 or hidden_layers < 1:
        raise ConfigError(f"hidden and hidden_layers must be ≥ 1; got hidden={hidden}, hidden_layers={hidden_layers}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")


def _masked_trunk(
    module: nn.Module, dim: int, hidden: int, hidden_layers: int, activation: str, input_degrees: Tensor | None
) -> Tensor:
    """Give ``module`` the masked hidden layers shared by MADE and MADE MoG; return the output mask (D × H)."""
    _check_common(dim, hidden, hidden_layers, activation)
    degrees = create_degrees(dim, [hidden] * hidden_layers, input_degrees)
    module.activation = activation
    module.hidden = nn.ModuleList(
        MaskedLinear((d_in[None, :] <= d_out[:, None]).float()) for d_in, d_out in zip(degrees[:-1], degrees[1:])
    )
    module.register_buffer("input_degrees", degrees[0].clone(), persistent=False)
    # output d sees hidden units of strictly smaller degree
    return (degrees[-1][None, :] < degrees[0][:, None]).float()


def _net(module: nn.Module, x: Tensor) -> Tensor:
    """Hidden layers then the output layer; functional calls keep per-step Python overhead low (MAF hot path)."""
    act = ACTIVATIONS[module.activation]
    for lin in module.hidden:
        x = act(linear(x, lin.weight * lin.mask, lin.bias))
    out = module.out
    return linear(x, out.weight * out.mask, out.bias)


class MADE(Transform):
    """Gaussian MADE as a transform x → u, ``u = exp(½ logp)(x − m(x))``, log-det ``½ Σ logp``.

    The inverse (sampling) needs D sequential passes; the density is ``Flow(MADE, StandardNormal)``.
    ``forward`` also evaluates R stacked runs (parameters and input with a leading run axis).
    """

    stacks = True

    def __init__(
        self,
        dim: int,
        hidden: int,
        hidden_layers: int,
        activation: str,
        input_degrees: Tensor | None = None,
    ):
        super().__init__()
        self.dim = dim
        out_mask = _masked_trunk(self, dim, hidden, hidden_layers, activation, input_degrees)
        # one output layer for [m, logp]: one matmul in the hot path
        self.out = MaskedLinear(torch.cat([out_mask, out_mask]))

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m, logp = _net(self, x).chunk(2, dim=-1)
        return m, logp

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m, logp = self._params(x)
        half = 0.5 * logp
        return torch.exp(half) * (x - m), half.sum(-1)

    def inverse(self, u: Tensor) -> tuple[Tensor, Tensor]:
        # After pass k every coordinate of degree ≤ k is exact, so D passes invert exactly; logp of the
        # last pass only depends on coordinates of lower degree, which were already exact.
        x = torch.zeros_like(u)
        logp = torch.zeros_like(u)
        for _ in range(self.dim):
            m, logp = self._params(x)
            x = m + torch.exp(-0.5 * logp) * u
        return x, -0.5 * logp.sum(-1)


class MADEMoG(nn.Module):
    """MADE whose conditionals are mixtures of C Gaussians: a density with ``log_prob`` and ``sample``.

    ``log p(x) = −½ D log 2π + Σ_d log Σ_c exp(log a_dc − ½ u_dc² + ½ logp_dc)``, with
    ``u_dc = exp(½ logp_dc)(x_d − m_dc)`` and ``log a`` normalised over components. Output biases are
    initialised N(0, 1), as in the MAF code, so the components start apart. ``log_prob`` also evaluates R
    stacked runs.
    """

    stacks = True

    def __init__(
        self,
        dim: int,
        hidden: int,
        hidden_layers: int,
        activation: str,
        components: int,
        input_degrees: Tensor | None = None,
    ):
        super().__init__()
        if components < 1:
            raise ConfigError(f"components must be ≥ 1; got {components}")
        self.dim, self.components = dim, components
        out_mask = _masked_trunk(self, dim, hidden, hidden_layers, activation, input_degrees)
        # outputs laid out as (3, D, C): means, log precisions, mixing logits
        mask = out_mask.repeat_interleave(components, dim=0).repeat(3, 1)
        self.out = MaskedLinear(mask)
        with torch.no_grad():
            self.out.bias.normal_()

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = _net(self, x).view(*x.shape[:-1], 3, self.dim, self.components)
        m, logp, loga = out.unbind(-3)
        return m, logp, torch.log_softmax(loga, dim=-1)

    def log_prob(self, x: Tensor) -> Tensor:
        m, logp, loga = self._params(x)
        u = torch.exp(0.5 * logp) * (x.unsqueeze(-1) - m)
        per_dim = torch.logsumexp(loga - 0.5 * u.pow(2) + 0.5 * logp, dim=-1)
        return per_dim.sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        # Noise is drawn once (Gumbel-max for the component, N(0,1) for u), so each pass is the same
        # deterministic map and D passes give an exact ancestral sample. (The MAF code also caps the
        # standard deviation at e^10 when sampling; we sample the density exactly, without the cap.)
        ref = self.out.weight
        u = torch.randn(n, self.dim, device=ref.device, dtype=ref.dtype)
        unif = torch.rand(n, self.dim, self.components, device=ref.device, dtype=ref.dtype)
        gumbel = -torch.log(-torch.log(unif.clamp_min(torch.finfo(ref.dtype).tiny)))
        x = torch.zeros_like(u)
        for _ in range(self.dim):
            m, logp, loga = self._params(x)
            k = (loga + gumbel).argmax(-1, keepdim=True)
            x = m.gather(-1, k).squeeze(-1) + torch.exp(-0.5 * logp.gather(-1, k).squeeze(-1)) * u
        return x


def build_made(dim: int, *, hidden: int, hidden_layers: int, activation: str) -> Flow:
    """MADE density (Germain et al. 2015) with Gaussian conditionals, as in the MAF paper's Table 1."""
    return Flow(CompositeTransform([MADE(dim, hidden, hidden_layers, activation)]), StandardNormal(dim), dim)


def build_made_mog(dim: int, *, hidden: int, hidden_layers: int, activation: str, components: int) -> Flow:
    """MADE MoG density: the identity transform on a :class:`MADEMoG` base."""
    return Flow(CompositeTransform([]), MADEMoG(dim, hidden, hidden_layers, activation, components), dim)


def made_count(d: int, h: int, hl: int) -> int:
    """Parameters of one Gaussian MADE: 3DH + (L−1)H² + LH + 2D (masked entries are stored, as in MAF)."""
    return 3 * d * h + (hl - 1) * h * h + hl * h + 2 * d


def made_mog_count(d: int, h: int, hl: int, c: int) -> int:
    """Parameters of one MADE MoG: DH + (L−1)H² + LH + 3C(HD + D)."""
    return d * h + (hl - 1) * h * h + hl * h + 3 * c * (h * d + d)


MAF_PAPER = "Papamakarios et al. 2017, Masked Autoregressive Flow for Density Estimation"

MADE_SPEC = ModelSpec(
    name="made",
    build=build_made,
    hparams=MADE_HPARAMS,
    label="MADE",
    paper="Germain et al. 2015, MADE",
    lr=1e-3,  # MAF paper section 4: 1e-3 for MADE and MADE MoG
    match_knob="hidden",
    count=lambda d, hp: made_count(d, hp["hidden"], hp["hidden_layers"]),
)

MADE_MOG_SPEC = ModelSpec(
    name="made-mog",
    build=build_made_mog,
    hparams={**MADE_HPARAMS, "components": COMPONENTS},
    label="MADE MoG",
    paper=MAF_PAPER,
    lr=1e-3,
    match_knob="hidden",
    count=lambda d, hp: made_mog_count(d, hp["hidden"], hp["hidden_layers"], hp["components"]),
)
