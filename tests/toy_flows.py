"""The smallest flows the trainer tests use (imported by several test modules; not a test file)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowbench.models.base import CompositeTransform, Flow, StandardNormal, Transform


class ShiftScale(Transform):
    """z = (x − m)·exp(−s): the smallest trainable flow."""

    def __init__(self, dim: int):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(dim))
        self.s = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x - self.m) * torch.exp(-self.s), (-self.s).sum().expand(x.shape[0])


def tiny_flow(dim: int = 2) -> Flow:
    """A standard-normal flow through one :class:`ShiftScale`."""
    return Flow(CompositeTransform([ShiftScale(dim)]), StandardNormal(dim), dim)
