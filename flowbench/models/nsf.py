"""Neural spline flows: RQ-NSF (AR) and RQ-NSF (C), as in the paper's tabular experiments.

A flow of K steps (data → noise) is ``[P_1, LU_1, T_1, …, P_K, LU_K, T_K, P_{K+1}, LU_{K+1}]``: each step
is a fixed random permutation P and an LU linear layer (:mod:`flowbench.models.lu`, identity at
initialisation) followed by an elementwise rational-quadratic spline T (:mod:`flowbench.models.splines`,
``bins`` bins on ``[−tail_bound, tail_bound]``, identity outside) whose parameters come from a network;
one more linear layer ends the flow. The base density is N(0, I).

- **RQ-NSF (AR)**: T is autoregressive; the spline of coordinate i is a function of x_{<i}, computed by a
  ResMADE (a MADE whose hidden layers are pre-activation residual blocks), inputs in the natural order (the
  permutations and LU layers mix the order between steps). Sampling takes D network passes per step.
- **RQ-NSF (C)**: T is a coupling layer; alternate steps transform the even / odd coordinates with splines
  conditioned, through a residual MLP, on the others. The pass-through half gets its own unconditional
  spline (one learnt spline per coordinate) when ``unconditional`` is on, the reference code's default.

The networks are ``initial linear → blocks × [ReLU, linear, ReLU, dropout, linear] (+ skip) → final
linear``, PyTorch's default ``nn.Linear`` initialisation except the last linear layer of every residual
block, drawn from U(−10⁻³, 10⁻³) so that each block starts near the identity. As in the reference code,
the coupling nets' width and height outputs are divided by sqrt(hidden) before the softmax; the ResMADE's
are not (the reference MADE has no ``hidden_features`` attribute, so its scaling branch never runs).

References:
    Durkan, Bekasov, Murray, Papamakarios. "Neural Spline Flows", NeurIPS 2019, sections 3 and 5.1
    (arXiv:1906.04032; code: bayesiains/nsf, experiments/uci.py, nde/transforms/autoregressive.py,
    nde/transforms/coupling.py, nde/transforms/made.py, nn/resnet.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowbench.errors import ConfigError
from flowbench.models.base import CompositeTransform, Flow, StandardNormal, Transform
from flowbench.models.lu import LULinear, Permutation, lu_param_count
from flowbench.models.spec import HParam, ModelSpec
from flowbench.models.splines import rational_quadratic_spline, spline_param_count

__all__ = [
    "NSF_AR_SPEC",
    "NSF_C_SPEC",
    "AutoregressiveSpline",
    "CouplingSpline",
    "ResidualNet",
    "build_nsf_ar",
    "build_nsf_c",
    "nsf_ar_count",
    "nsf_c_count",
]


def _default_init_(layer: nn.Linear) -> None:
    """``nn.Linear``'s own initialisation (weights and biases U(±1/sqrt(fan_in))), which the reference keeps."""
    layer.reset_parameters()


class ResidualNet(nn.Module):
    """Residual MLP ``in_features → out_features``; with ``made_dim`` set, the masked ResMADE.

    For the ResMADE, inputs have degrees 1..D, hidden units the MADE "sequential" degrees and output
    ``i·M + j`` (j < M = out_features / D) the degree i + 1, so the M outputs of coordinate i see x_{<i} only;
    the residual blocks keep the hidden degrees, so a skip connection never leaks a later input.
    """

    def __init__(
        self, in_features: int, out_features: int, hidden: int, blocks: int, dropout: float, made_dim: int | None = None
    ):
        super().__init__()
        self.hidden = hidden
        self.initial = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)]) for _ in range(blocks)
        )
        self.final = nn.Linear(hidden, out_features)
        for layer in [self.initial, self.final, *(lin for block in self.blocks for lin in block)]:
            _default_init_(layer)
        for _, last in self.blocks:
            nn.init.uniform_(last.weight, -1e-3, 1e-3)
            nn.init.uniform_(last.bias, -1e-3, 1e-3)
        self.dropout = nn.Dropout(dropout)
        self.masked = made_dim is not None
        if self.masked:
            d = made_dim
            if in_features != d or out_features % d:
                raise ConfigError(f"ResMADE: {in_features} inputs / {out_features} outputs do not fit D = {d}")
            deg_in = torch.arange(1, d + 1)
            deg_hidden = torch.arange(hidden) % max(1, d - 1) + min(1, d - 1)
            deg_out = deg_in.repeat_interleave(out_features // d)
            # Not persistent: the masks are a function of the architecture, rebuilt by the constructor.
            dt = torch.get_default_dtype()
            self.register_buffer("mask_initial", (deg_hidden[:, None] >= deg_in[None, :]).to(dt), persistent=False)
            self.register_buffer("mask_hidden", (deg_hidden[:, None] >= deg_hidden[None, :]).to(dt), persistent=False)
            self.register_buffer("mask_final", (deg_out[:, None] > deg_hidden[None, :]).to(dt), persistent=False)

    def _linear(self, layer: nn.Linear, x: Tensor, mask_name: str) -> Tensor:
        weight = layer.weight * getattr(self, mask_name) if self.masked else layer.weight
        return F.linear(x, weight, layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self._linear(self.initial, x, "mask_initial")
        for first, last in self.blocks:
            t = self._linear(first, torch.relu(h), "mask_hidden")
            t = self._linear(last, self.dropout(torch.relu(t)), "mask_hidden")
            h = h + t
        return self._linear(self.final, h, "mask_final")


def _split(params: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    return params[..., :bins], params[..., bins : 2 * bins], params[..., 2 * bins :]


class AutoregressiveSpline(Transform):
    """``z_i = RQS(x_i; θ_i(x_{<i}))`` with θ from a ResMADE (forward one pass, inverse D passes)."""

    def __init__(self, dim: int, hidden: int, blocks: int, bins: int, tail_bound: float, dropout: float):
        super().__init__()
        self.dim, self.bins, self.tail_bound = dim, bins, tail_bound
        self.net = ResidualNet(dim, dim * spline_param_count(bins), hidden, blocks, dropout, made_dim=dim)

    def _spline(self, values: Tensor, context: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        params = self.net(context).view(context.shape[0], self.dim, spline_param_count(self.bins))
        out, logdet = rational_quadratic_spline(
            values, *_split(params, self.bins), inverse=inverse, tail_bound=self.tail_bound
        )
        return out, logdet.sum(-1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(x, x, inverse=False)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        # After pass k every coordinate of degree ≤ k is exact, so D passes invert exactly; the last pass's
        # parameters depend only on coordinates that were already exact, so its log-det is exact too.
        x = torch.zeros_like(z)
        logdet = z.new_zeros(z.shape[0])
        for _ in range(self.dim):
            x, logdet = self._spline(z, x, inverse=True)
        return x, logdet


class CouplingSpline(Transform):
    """Coupling layer: coordinates with ``transformed`` True get splines conditioned on the others."""

    def __init__(
        self,
        transformed: Tensor,
        hidden: int,
        blocks: int,
        bins: int,
        tail_bound: float,
        dropout: float,
        unconditional: bool,
    ):
        super().__init__()
        transformed = torch.as_tensor(transformed, dtype=torch.bool)
        ident, trans = (~transformed).nonzero().flatten(), transformed.nonzero().flatten()
        if len(ident) == 0 or len(trans) == 0:
            raise ConfigError("a coupling layer needs at least one transformed and one pass-through coordinate")
        self.bins, self.tail_bound = bins, tail_bound
        self.register_buffer("ident", ident, persistent=False)
        self.register_buffer("trans", trans, persistent=False)
        self.register_buffer("unsplit", torch.argsort(torch.cat([ident, trans])), persistent=False)
        m = spline_param_count(bins)
        self.net = ResidualNet(len(ident), len(trans) * m, hidden, blocks, dropout)
        self.unconditional = None
        if unconditional:
            # reference: PiecewiseRationalQuadraticCDF(identity_init=False), parameters U(0, 1)
            self.unconditional = nn.Parameter(torch.rand(len(ident), m))

    def _conditional(self, values: Tensor, context: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        params = self.net(context).view(context.shape[0], len(self.trans), spline_param_count(self.bins))
        w, h, d = _split(params, self.bins)
        scale = math.sqrt(self.net.hidden)  # the reference's softmax temperature for coupling nets
        out, logdet = rational_quadratic_spline(
            values, w / scale, h / scale, d, inverse=inverse, tail_bound=self.tail_bound
        )
        return out, logdet.sum(-1)

    def _identity_part(self, values: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        if self.unconditional is None:
            return values, values.new_zeros(values.shape[0])
        params = self.unconditional.expand(values.shape[0], -1, -1)
        out, logdet = rational_quadratic_spline(
            values, *_split(params, self.bins), inverse=inverse, tail_bound=self.tail_bound
        )
        return out, logdet.sum(-1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_id, x_tr = x[:, self.ident], x[:, self.trans]
        z_tr, logdet = self._conditional(x_tr, x_id, inverse=False)
        z_id, logdet_id = self._identity_part(x_id, inverse=False)
        return torch.cat([z_id, z_tr], dim=1)[:, self.unsplit], logdet + logdet_id

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x_id, logdet_id = self._identity_part(z[:, self.ident], inverse=True)
        x_tr, logdet = self._conditional(z[:, self.trans], x_id, inverse=True)
        return torch.cat([x_id, x_tr], dim=1)[:, self.unsplit], logdet + logdet_id


def _check(dim: int, layers: int, hidden: int, blocks: int, bins: int, tail_bound: float, dropout: float) -> None:
    if layers < 1 or hidden < 1 or blocks < 1:
        raise ConfigError(f"layers, hidden and blocks must be ≥ 1; got {layers}, {hidden}, {blocks}")
    if bins < 2:
        raise ConfigError(f"bins must be ≥ 2; got {bins}")
    if not tail_bound > 0:
        raise ConfigError(f"tail_bound must be positive; got {tail_bound}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1); got {dropout}")


def _flow(dim: int, layers: int, make_step: Callable[[int], Transform]) -> Flow:
    steps: list[Transform] = []
    for i in range(layers):
        steps += [Permutation(dim), LULinear(dim), make_step(i)]
    steps += [Permutation(dim), LULinear(dim)]
    return Flow(CompositeTransform(steps), StandardNormal(dim), dim)


def build_nsf_ar(
    dim: int, *, layers: int, hidden: int, blocks: int, bins: int, tail_bound: float, dropout: float
) -> Flow:
    """RQ-NSF (AR) with ``layers`` steps (Durkan et al. 2019)."""
    _check(dim, layers, hidden, blocks, bins, tail_bound, dropout)
    return _flow(dim, layers, lambda i: AutoregressiveSpline(dim, hidden, blocks, bins, tail_bound, dropout))


def _coupling_mask(dim: int, i: int) -> Tensor:
    """Step i transforms the even coordinates when i is even, the odd ones otherwise (as in the reference)."""
    return torch.arange(dim) % 2 == i % 2


def build_nsf_c(
    dim: int,
    *,
    layers: int,
    hidden: int,
    blocks: int,
    bins: int,
    tail_bound: float,
    dropout: float,
    unconditional: bool,
) -> Flow:
    """RQ-NSF (C) with ``layers`` steps (Durkan et al. 2019)."""
    _check(dim, layers, hidden, blocks, bins, tail_bound, dropout)
    if dim < 2:
        raise ConfigError(f"nsf-c needs data of at least 2 dimensions to split; got {dim}")
    return _flow(
        dim,
        layers,
        lambda i: CouplingSpline(_coupling_mask(dim, i), hidden, blocks, bins, tail_bound, dropout, unconditional),
    )


# -- closed-form parameter counts (tests check them against built models) ---------------------------------
def _resnet_count(n_in: int, n_out: int, hidden: int, blocks: int) -> int:
    return n_in * hidden + hidden + blocks * 2 * (hidden * hidden + hidden) + hidden * n_out + n_out


def nsf_ar_count(dim: int, hp: Mapping[str, Any]) -> int:
    """K·[ResMADE(D → D(3B − 1)) + D² + D] + D² + D, masked weights included (they are stored)."""
    made = _resnet_count(dim, dim * spline_param_count(hp["bins"]), hp["hidden"], hp["blocks"])
    return hp["layers"] * (made + lu_param_count(dim)) + lu_param_count(dim)


def nsf_c_count(dim: int, hp: Mapping[str, Any]) -> int:
    """Σ_steps [ResNet(n_id → n_tr(3B − 1)) + n_id(3B − 1) if unconditional + D² + D] + D² + D."""
    m = spline_param_count(hp["bins"])
    total = lu_param_count(dim)
    for i in range(hp["layers"]):
        n_tr = int(_coupling_mask(dim, i).sum())
        n_id = dim - n_tr
        total += _resnet_count(n_id, n_tr * m, hp["hidden"], hp["blocks"]) + lu_param_count(dim)
        total += n_id * m if hp["unconditional"] else 0
    return total


# -- the specs -------------------------------------------------------------------------------------------
_PAPER = "Durkan et al. 2019, Neural Spline Flows"

# Defaults are the reference code's (bayesiains/nsf, experiments/uci.py argparse defaults); the per-dataset
# configs carry the paper's appendix settings. ``lr`` is the MAF protocol's (1e-4, as for every flow there):
# the NSF protocol's learning rates are in the configs.
_COMMON = {
    "layers": HParam(10, "flow steps (linear layer + spline transform)", low=1),
    "hidden": HParam(256, "hidden units of the conditioner's residual blocks", low=1),
    "blocks": HParam(2, "residual blocks per conditioner", low=1),
    "bins": HParam(8, "spline bins K", low=2),
    "tail_bound": HParam(3.0, "spline interval [−B, B]; identity outside", low=1e-6),
    "dropout": HParam(0.25, "dropout probability inside the residual blocks", low=0.0, high=0.99),
}


def _unstackable(hp: Mapping[str, Any]) -> str | None:
    """A stack shares one random stream, so dropout masks would not be each run's own (its result would depend on
    stacking); without dropout NSF stacks through vmap."""
    if hp["dropout"] > 0:
        return f"dropout {hp['dropout']} draws each run's masks from its own random stream (set --dropout 0 to stack)"
    return None


NSF_AR_SPEC = ModelSpec(
    name="nsf-ar",
    build=build_nsf_ar,
    hparams=dict(_COMMON),
    label="RQ-NSF (AR)",
    paper=_PAPER,
    lr=1e-4,
    match_knob="hidden",
    count=nsf_ar_count,
    unstackable=_unstackable,
)

NSF_C_SPEC = ModelSpec(
    name="nsf-c",
    build=build_nsf_c,
    hparams={
        **_COMMON,
        "unconditional": HParam(True, "also give the pass-through coordinates an unconditional spline"),
    },
    label="RQ-NSF (C)",
    paper=_PAPER,
    lr=1e-4,
    match_knob="hidden",
    count=nsf_c_count,
    unstackable=_unstackable,
)
