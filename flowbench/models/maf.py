"""Masked Autoregressive Flow: MAF(K) and MAF MoG(K).

MAF(K) stacks K Gaussian MADEs (data → noise). As in the MAF code, the first MADE uses the input order
1..D and each next MADE the reverse of the previous one's order (by its degrees, so no permutation layer is
needed); a batch norm follows every MADE, the last included (``batch_norm=False`` switches them off).
MAF MoG(K) puts a MADE MoG, whose order reverses the last MADE's, on top of MAF(K) as the base density.

References:
    Papamakarios, Pavlakou, Murray. "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017
    (code: gpapamak/maf, ml/models/mafs.py: MaskedAutoregressiveFlow, MaskedAutoregressiveFlow_on_MADE).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowbench.errors import ConfigError
from flowbench.models.base import CompositeTransform, Flow, StandardNormal, Transform
from flowbench.models.layers import BatchNorm
from flowbench.models.made import MADE, MADE_HPARAMS, MADEMoG

__all__ = ["MAF_HPARAMS", "MAF_MOG_HPARAMS", "build_maf", "build_maf_mog"]

MAF_HPARAMS: dict = {"layers": 5, **MADE_HPARAMS, "batch_norm": True}
MAF_MOG_HPARAMS: dict = {**MAF_HPARAMS, "components": 10}


def _maf_transform(
    dim: int, layers: int, hidden: int, hidden_layers: int, activation: str, batch_norm: bool
) -> tuple[CompositeTransform, Tensor]:
    """The K MADEs (+ batch norms) and the input degrees a next layer would use (the last MADE's, reversed)."""
    if layers < 1:
        raise ConfigError(f"layers (the number of MADEs) must be ≥ 1; got {layers}")
    steps: list[Transform] = []
    degrees = torch.arange(1, dim + 1)
    for _ in range(layers):
        made = MADE(dim, hidden, hidden_layers, activation, input_degrees=degrees)
        steps.append(made)
        if batch_norm:
            steps.append(BatchNorm(dim))
        degrees = degrees.flip(0)
    return CompositeTransform(steps), degrees


def build_maf(
    dim: int,
    layers: int = 5,
    hidden: int = 100,
    hidden_layers: int = 1,
    activation: str = "relu",
    batch_norm: bool = True,
) -> Flow:
    """MAF(K) with a standard normal base (Papamakarios et al. 2017)."""
    transform, _ = _maf_transform(dim, layers, hidden, hidden_layers, activation, batch_norm)
    return Flow(transform, StandardNormal(dim), dim)


def build_maf_mog(
    dim: int,
    layers: int = 5,
    hidden: int = 100,
    hidden_layers: int = 1,
    activation: str = "relu",
    batch_norm: bool = True,
    components: int = 10,
) -> Flow:
    """MAF MoG(K): MAF(K) on a MADE MoG base density (Papamakarios et al. 2017)."""
    transform, next_degrees = _maf_transform(dim, layers, hidden, hidden_layers, activation, batch_norm)
    base = MADEMoG(dim, hidden, hidden_layers, activation, components, input_degrees=next_degrees)
    return Flow(transform, base, dim)
