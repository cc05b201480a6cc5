"""Masked Autoregressive Flow: MAF(K) and MAF MoG(K).

MAF(K) stacks K Gaussian MADEs (data → noise). As in the MAF code, the first MADE uses the input order
1..D and each next MADE the reverse of the previous one's order (by its degrees, so no permutation layer is
needed); a batch norm follows every MADE, the last included (``batch_norm=False`` switches them off).
MAF MoG(K) puts a MADE MoG, whose order reverses the last MADE's, on top of MAF(K) as the base density.
The input orders alternate the same way with random hidden degrees (the MAF code reverses ``input_order``
whatever its ``mode``). The class-conditional versions (MAF code: ConditionalMaskedAutoregressiveFlow,
ConditionalMaskedAutoregressiveFlow_on_MADE) make every MADE, the MoG base included, conditional on the same
label; the batch norms are unchanged.

References:
    Papamakarios, Pavlakou, Murray. "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017
    (code: gpapamak/maf, ml/models/mafs.py: MaskedAutoregressiveFlow, MaskedAutoregressiveFlow_on_MADE).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowbench.errors import ConfigError
from flowbench.models.base import CompositeTransform, ConditionalFlow, Flow, StandardNormal, Transform
from flowbench.models.layers import BatchNorm
from flowbench.models.made import COMPONENTS, MADE, MADE_HPARAMS, MAF_PAPER, MADEMoG, made_count, made_mog_count
from flowbench.models.spec import HParam, ModelSpec, conditional_spec

__all__ = [
    "MAF_HPARAMS",
    "MAF_SPEC",
    "MAF_MOG_SPEC",
    "MAF_COND_SPEC",
    "MAF_MOG_COND_SPEC",
    "build_maf",
    "build_maf_mog",
    "build_maf_cond",
    "build_maf_mog_cond",
]

#: MAF(K): K MADEs (MAF paper: K = 5 or 10) with batch norm between them.
MAF_HPARAMS: dict[str, HParam] = {
    "layers": HParam(5, "flow depth: the number of MADEs / coupling layers (the MAF paper used 5 or 10)", low=1),
    **MADE_HPARAMS,
    "batch_norm": HParam(True, "batch norm after every flow layer (MAF paper section 3.4)"),
}


def _maf_transform(
    dim: int,
    layers: int,
    hidden: int,
    hidden_layers: int,
    activation: str,
    batch_norm: bool,
    degrees_mode: str = "sequential",
    classes: int = 0,
) -> tuple[CompositeTransform, Tensor]:
    """The K MADEs (+ batch norms) and the input degrees a next layer would use (the last MADE's, reversed)."""
    if layers < 1:
        raise ConfigError(f"layers (the number of MADEs) must be ≥ 1; got {layers}")
    steps: list[Transform] = []
    degrees = torch.arange(1, dim + 1)
    for _ in range(layers):
        made = MADE(
            dim,
            hidden,
            hidden_layers,
            activation,
            input_degrees=degrees,
            degrees=degrees_mode,
            context_features=classes,
        )
        steps.append(made)
        if batch_norm:
            steps.append(BatchNorm(dim))
        degrees = degrees.flip(0)
    return CompositeTransform(steps), degrees


# ``degrees`` keeps a default in the builders (the spec's) so that callers from before it existed still work.
def build_maf(
    dim: int,
    *,
    layers: int,
    hidden: int,
    hidden_layers: int,
    activation: str,
    degrees: str = "sequential",
    batch_norm: bool,
) -> Flow:
    """MAF(K) with a standard normal base (Papamakarios et al. 2017)."""
    transform, _ = _maf_transform(dim, layers, hidden, hidden_layers, activation, batch_norm, degrees)
    return Flow(transform, StandardNormal(dim), dim)


def build_maf_mog(
    dim: int,
    *,
    layers: int,
    hidden: int,
    hidden_layers: int,
    activation: str,
    degrees: str = "sequential",
    batch_norm: bool,
    components: int,
) -> Flow:
    """MAF MoG(K): MAF(K) on a MADE MoG base density (Papamakarios et al. 2017)."""
    transform, next_degrees = _maf_transform(dim, layers, hidden, hidden_layers, activation, batch_norm, degrees)
    base = MADEMoG(dim, hidden, hidden_layers, activation, components, input_degrees=next_degrees, degrees=degrees)
    return Flow(transform, base, dim)


def build_maf_cond(
    dim: int,
    *,
    classes: int,
    layers: int,
    hidden: int,
    hidden_layers: int,
    activation: str,
    degrees: str,
    batch_norm: bool,
) -> ConditionalFlow:
    """Class-conditional MAF(K) (MAF code: ConditionalMaskedAutoregressiveFlow)."""
    transform, _ = _maf_transform(dim, layers, hidden, hidden_layers, activation, batch_norm, degrees, classes)
    return ConditionalFlow(transform, StandardNormal(dim), dim, classes)


def build_maf_mog_cond(
    dim: int,
    *,
    classes: int,
    layers: int,
    hidden: int,
    hidden_layers: int,
    activation: str,
    degrees: str,
    batch_norm: bool,
    components: int,
) -> ConditionalFlow:
    """Class-conditional MAF MoG(K) (MAF code: ConditionalMaskedAutoregressiveFlow_on_MADE)."""
    transform, next_degrees = _maf_transform(
        dim, layers, hidden, hidden_layers, activation, batch_norm, degrees, classes
    )
    base = MADEMoG(
        dim,
        hidden,
        hidden_layers,
        activation,
        components,
        input_degrees=next_degrees,
        degrees=degrees,
        context_features=classes,
    )
    return ConditionalFlow(transform, base, dim, classes)


def _maf_count(d: int, hp: dict) -> int:
    """K·MADE + 2KD for the batch norms (log γ and β)."""
    bn = 2 * hp["layers"] * d if hp["batch_norm"] else 0
    return hp["layers"] * made_count(d, hp["hidden"], hp["hidden_layers"]) + bn


MAF_SPEC = ModelSpec(
    name="maf",
    build=build_maf,
    hparams=MAF_HPARAMS,
    label="MAF ({layers})",
    paper=MAF_PAPER,
    lr=1e-4,  # MAF paper section 4: 1e-4 for the flows
    match_knob="hidden",
    count=_maf_count,
)

MAF_MOG_SPEC = ModelSpec(
    name="maf-mog",
    build=build_maf_mog,
    hparams={**MAF_HPARAMS, "components": COMPONENTS},
    label="MAF MoG ({layers})",
    paper=MAF_PAPER,
    lr=1e-4,
    match_knob="hidden",
    count=lambda d, hp: _maf_count(d, hp) + made_mog_count(d, hp["hidden"], hp["hidden_layers"], hp["components"]),
)

#: + one K × H label weight Wx per MADE (the MoG base's too)
MAF_COND_SPEC = conditional_spec(
    MAF_SPEC, build_maf_cond, lambda d, hp, k: MAF_SPEC.count(d, hp) + hp["layers"] * k * hp["hidden"]
)
MAF_MOG_COND_SPEC = conditional_spec(
    MAF_MOG_SPEC, build_maf_mog_cond, lambda d, hp, k: MAF_MOG_SPEC.count(d, hp) + (hp["layers"] + 1) * k * hp["hidden"]
)
