"""MADE with Gaussian conditionals (also the autoregressive layer of MAF) and MADE with mixture-of-Gaussians
conditionals (MADE MoG, also the base density of MAF MoG).

Conditionals are parameterised by a mean ``m`` and a log precision ``logp``:
``u = exp(½ logp) · (x − m)``, ``log p(x) = −½ (D log 2π + Σ (u² − logp))``. Hidden degrees are assigned
"sequentially" (the default) or "randomly" as in the MAF code's ``create_degrees``, and all weight matrices are
stored in full (masked entries included).

Class-conditional versions (``context_features = K``; MAF code: ConditionalGaussianMade,
ConditionalMixtureOfGaussiansMade) add an unmasked K × H weight ``Wx`` from the label's one-hot to the first
hidden layer, ``h₁ = f(onehot · Wx + x · (M₀ ⊙ W₀) + b₀)``, and change nothing else.

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

from flowbench.errors import ConfigError, InputError
from flowbench.models.base import CompositeTransform, ConditionalFlow, Flow, StandardNormal, Transform
from flowbench.models.layers import MaskedLinear, linear, maf_linear_init_
from flowbench.models.spec import HParam, ModelSpec, conditional_spec

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
    "build_made_cond",
    "build_made_mog_cond",
    "MADE_COND_SPEC",
    "MADE_MOG_COND_SPEC",
]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": torch.relu, "tanh": torch.tanh}

#: The MADE hyperparameters (MAF paper section 4: 100 hidden units, 1 or 2 hidden layers, ReLU); MAF and its
#: relatives reuse them.
MADE_HPARAMS: dict[str, HParam] = {
    "hidden": HParam(100, "hidden units per layer of each MADE / coupling net", low=1),
    "hidden_layers": HParam(1, "hidden layers per MADE / coupling net (the MAF paper used 1 or 2)", low=1),
    "activation": HParam("relu", "hidden-layer nonlinearity", choices=("relu", "tanh")),
    "degrees": HParam(
        "sequential",
        "MADE hidden-unit degrees: sequential, or random as in the MAF code's CIFAR-10 "
        "runs (drawn from the run's seed)",
        choices=("sequential", "random"),
    ),
}
COMPONENTS = HParam(10, "mixture components per conditional (MoG models)", low=1)


DEGREE_MODES = ("sequential", "random")


def create_degrees(
    dim: int, hidden: list[int], input_degrees: Tensor | None = None, mode: str = "sequential"
) -> list[Tensor]:
    """Degrees of the input units (``1..D`` or the given order) and of each hidden layer.

    A hidden unit of degree d may see inputs of degree ≤ d; output d may see hidden units of degree < d.
    ``mode`` as in the MAF code (ml/models/mades.py, create_degrees): "sequential" cycles through 1..D−1;
    "random" draws each layer's degrees uniformly from [min(previous layer's degrees, D − 1), D − 1], from torch's
    global generator (so the run's seed fixes them).
    """
    if mode not in DEGREE_MODES:
        raise ConfigError(f"unknown degrees mode {mode!r}; choose one of {', '.join(DEGREE_MODES)}")
    d0 = torch.arange(1, dim + 1) if input_degrees is None else torch.as_tensor(input_degrees).long()
    if sorted(d0.tolist()) != list(range(1, dim + 1)):
        raise ConfigError(f"input degrees must be a permutation of 1..{dim}; got {d0.tolist()}")
    degrees = [d0]
    for n in hidden:
        if mode == "random":
            # rng.randint(min_prev_degree, n_inputs, N) of the MAF code: low inclusive, high exclusive
            low = min(int(degrees[-1].min()), dim - 1)
            degrees.append(torch.randint(low, dim, (n,)))
        else:
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


def _masks(degrees: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """The hidden layers' masks (out × in) and the output mask (D × H) of the given degrees."""
    hidden = [(d_in[None, :] <= d_out[:, None]).float() for d_in, d_out in zip(degrees[:-1], degrees[1:])]
    # output d sees hidden units of strictly smaller degree
    return hidden, (degrees[-1][None, :] < degrees[0][:, None]).float()


def _masked_trunk(
    module: nn.Module,
    dim: int,
    hidden: int,
    hidden_layers: int,
    activation: str,
    input_degrees: Tensor | None,
    degrees: str = "sequential",
    context_features: int = 0,
) -> Tensor:
    """Give ``module`` the masked hidden layers shared by MADE and MADE MoG (and, for a conditional one, the
    label's weight ``Wx``); return the output mask (D × H)."""
    _check_common(dim, hidden, hidden_layers, activation)
    if isinstance(context_features, bool) or not isinstance(context_features, int) or context_features < 0:
        raise ConfigError(f"context_features must be a non-negative integer; got {context_features!r}")
    degs = create_degrees(dim, [hidden] * hidden_layers, input_degrees, degrees)
    module.activation = activation
    module.degrees_mode = degrees
    hidden_masks, out_mask = _masks(degs)
    module.hidden = nn.ModuleList(MaskedLinear(m) for m in hidden_masks)
    module.register_buffer("input_degrees", degs[0].clone(), persistent=False)
    if degrees == "random":
        # Random degrees are state, not architecture: saved with the model (the masks, rebuilt from them on load,
        # stay non-persistent as in sequential mode, whose state_dict is unchanged).
        for i, d in enumerate(degs[1:], 1):
            module.register_buffer(f"degrees_{i}", d.clone())
        module.register_load_state_dict_post_hook(_reload_masks)
    module.conditional = context_features > 0
    module.context_features = context_features
    if context_features:
        # MAF code's Wx: unmasked (the label may inform every conditional), randn / sqrt(K + 1); stored (H, K)
        module.context_weight = nn.Parameter(torch.empty(hidden, context_features))
        maf_linear_init_(module.context_weight, None)
    return out_mask


def _reload_masks(module: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict``: the masks of the loaded random degrees (a post hook of random-degree MADEs)."""
    degs = [module.input_degrees] + [getattr(module, f"degrees_{i}") for i in range(1, len(module.hidden) + 1)]
    hidden_masks, out_mask = _masks([d.cpu() for d in degs])
    with torch.no_grad():
        for lin, m in zip(module.hidden, hidden_masks):
            lin.mask.copy_(m)
        module.out.mask.copy_(module._output_mask(out_mask))


def _net(module: nn.Module, x: Tensor, context: Tensor | None = None) -> Tensor:
    """Hidden layers then the output layer; functional calls keep per-step Python overhead low (MAF hot path).

    ``context`` (a conditional MADE's one-hot labels) enters the first hidden layer through ``Wx``.
    """
    if module.conditional and context is None:
        raise InputError("a class-conditional MADE needs the label's one-hot as context")
    act = ACTIVATIONS[module.activation]
    for i, lin in enumerate(module.hidden):
        pre = linear(x, lin.weight * lin.mask, lin.bias)
        if i == 0 and module.conditional:
            pre = pre + linear(context, module.context_weight, None)
        x = act(pre)
    out = module.out
    return linear(x, out.weight * out.mask, out.bias)


class MADE(Transform):
    """Gaussian MADE as a transform x → u, ``u = exp(½ logp)(x − m(x))``, log-det ``½ Σ logp``.

    The inverse (sampling) needs D sequential passes; the density is ``Flow(MADE, StandardNormal)``.
    ``forward`` also evaluates R stacked runs (parameters and input with a leading run axis).
    ``context_features = K > 0``: class-conditional (MAF code's ConditionalGaussianMade); ``forward`` and
    ``inverse`` then take the label's one-hot ``context`` (B, K).
    """

    stacks = True

    def __init__(
        self,
        dim: int,
        hidden: int,
        hidden_layers: int,
        activation: str,
        input_degrees: Tensor | None = None,
        degrees: str = "sequential",
        context_features: int = 0,
    ):
        super().__init__()
        self.dim = dim
        out_mask = _masked_trunk(self, dim, hidden, hidden_layers, activation, input_degrees, degrees, context_features)
        # one output layer for [m, logp]: one matmul in the hot path
        self.out = MaskedLinear(self._output_mask(out_mask))

    @staticmethod
    def _output_mask(out_mask: Tensor) -> Tensor:
        return torch.cat([out_mask, out_mask])

    def _params(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        m, logp = _net(self, x, context).chunk(2, dim=-1)
        return m, logp

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        m, logp = self._params(x, context)
        half = 0.5 * logp
        return torch.exp(half) * (x - m), half.sum(-1)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # After pass k every coordinate of degree ≤ k is exact, so D passes invert exactly; logp of the
        # last pass only depends on coordinates of lower degree, which were already exact.
        x = torch.zeros_like(u)
        logp = torch.zeros_like(u)
        for _ in range(self.dim):
            m, logp = self._params(x, context)
            x = m + torch.exp(-0.5 * logp) * u
        return x, -0.5 * logp.sum(-1)


class MADEMoG(nn.Module):
    """MADE whose conditionals are mixtures of C Gaussians: a density with ``log_prob`` and ``sample``.

    ``log p(x) = −½ D log 2π + Σ_d log Σ_c exp(log a_dc − ½ u_dc² + ½ logp_dc)``, with
    ``u_dc = exp(½ logp_dc)(x_d − m_dc)`` and ``log a`` normalised over components. Output biases are
    initialised N(0, 1), as in the MAF code, so the components start apart. ``log_prob`` also evaluates R
    stacked runs. ``context_features = K > 0``: class-conditional (MAF code's ConditionalMixtureOfGaussiansMade);
    ``log_prob`` and ``sample`` then take the label's one-hot ``context``.
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
        degrees: str = "sequential",
        context_features: int = 0,
    ):
        super().__init__()
        if components < 1:
            raise ConfigError(f"components must be ≥ 1; got {components}")
        self.dim, self.components = dim, components
        out_mask = _masked_trunk(self, dim, hidden, hidden_layers, activation, input_degrees, degrees, context_features)
        self.out = MaskedLinear(self._output_mask(out_mask))
        with torch.no_grad():
            self.out.bias.normal_()

    def _output_mask(self, out_mask: Tensor) -> Tensor:
        # outputs laid out as (3, D, C): means, log precisions, mixing logits
        return out_mask.repeat_interleave(self.components, dim=0).repeat(3, 1)

    def _params(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        out = _net(self, x, context).view(*x.shape[:-1], 3, self.dim, self.components)
        m, logp, loga = out.unbind(-3)
        return m, logp, torch.log_softmax(loga, dim=-1)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        m, logp, loga = self._params(x, context)
        u = torch.exp(0.5 * logp) * (x.unsqueeze(-1) - m)
        per_dim = torch.logsumexp(loga - 0.5 * u.pow(2) + 0.5 * logp, dim=-1)
        return per_dim.sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)

    @torch.no_grad()
    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        # Noise is drawn once (Gumbel-max for the component, N(0,1) for u), so each pass is the same
        # deterministic map and D passes give an exact ancestral sample. (The MAF code also caps the
        # standard deviation at e^10 when sampling; we sample the density exactly, without the cap.)
        ref = self.out.weight
        u = torch.randn(n, self.dim, device=ref.device, dtype=ref.dtype)
        unif = torch.rand(n, self.dim, self.components, device=ref.device, dtype=ref.dtype)
        gumbel = -torch.log(-torch.log(unif.clamp_min(torch.finfo(ref.dtype).tiny)))
        x = torch.zeros_like(u)
        for _ in range(self.dim):
            m, logp, loga = self._params(x, context)
            k = (loga + gumbel).argmax(-1, keepdim=True)
            x = m.gather(-1, k).squeeze(-1) + torch.exp(-0.5 * logp.gather(-1, k).squeeze(-1)) * u
        return x


# ``degrees`` keeps a default in the builders (the spec's) so that callers from before it existed still work.
def build_made(dim: int, *, hidden: int, hidden_layers: int, activation: str, degrees: str = "sequential") -> Flow:
    """MADE density (Germain et al. 2015) with Gaussian conditionals, as in the MAF paper's Table 1."""
    made = MADE(dim, hidden, hidden_layers, activation, degrees=degrees)
    return Flow(CompositeTransform([made]), StandardNormal(dim), dim)


def build_made_mog(
    dim: int, *, hidden: int, hidden_layers: int, activation: str, degrees: str = "sequential", components: int
) -> Flow:
    """MADE MoG density: the identity transform on a :class:`MADEMoG` base."""
    base = MADEMoG(dim, hidden, hidden_layers, activation, components, degrees=degrees)
    return Flow(CompositeTransform([]), base, dim)


def build_made_cond(
    dim: int, *, classes: int, hidden: int, hidden_layers: int, activation: str, degrees: str
) -> ConditionalFlow:
    """Class-conditional MADE (MAF paper Table 2; MAF code: ConditionalGaussianMade)."""
    made = MADE(dim, hidden, hidden_layers, activation, degrees=degrees, context_features=classes)
    return ConditionalFlow(CompositeTransform([made]), StandardNormal(dim), dim, classes)


def build_made_mog_cond(
    dim: int, *, classes: int, hidden: int, hidden_layers: int, activation: str, degrees: str, components: int
) -> ConditionalFlow:
    """Class-conditional MADE MoG (MAF code: ConditionalMixtureOfGaussiansMade)."""
    base = MADEMoG(dim, hidden, hidden_layers, activation, components, degrees=degrees, context_features=classes)
    return ConditionalFlow(CompositeTransform([]), base, dim, classes)


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

#: + the K × H label weight Wx
MADE_COND_SPEC = conditional_spec(
    MADE_SPEC, build_made_cond, lambda d, hp, k: MADE_SPEC.count(d, hp) + k * hp["hidden"]
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

MADE_MOG_COND_SPEC = conditional_spec(
    MADE_MOG_SPEC, build_made_mog_cond, lambda d, hp, k: MADE_MOG_SPEC.count(d, hp) + k * hp["hidden"]
)
