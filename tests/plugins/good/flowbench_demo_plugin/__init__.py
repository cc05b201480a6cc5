"""A tiny out-of-tree flowbench plugin: one model and one dataset (test fixture)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flowbench.data import DatasetSpec, maf_split
from flowbench.models import CompositeTransform, Flow, HParam, ModelSpec, StandardNormal, Transform


class Affine(Transform):
    """z = (x − m)·exp(−s), elementwise."""

    def __init__(self, dim: int):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(dim))
        self.s = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return (x - self.m) * torch.exp(-self.s), (-self.s).sum().expand(x.shape[0])

    def inverse(self, z):
        return z * torch.exp(self.s) + self.m, self.s.sum().expand(z.shape[0])


def build(dim: int, layers: int = 1) -> Flow:
    return Flow(CompositeTransform([Affine(dim) for _ in range(layers)]), StandardNormal(dim), dim)


MODEL = ModelSpec(
    name="demo-affine",
    build=build,
    hparams={"layers": HParam(1, "affine layers", low=1)},
    label="Demo affine ({layers})",
    paper="a test fixture",
    lr=1e-2,
)


def _blobs(root):
    rng = np.random.RandomState(0)
    x = np.concatenate([rng.randn(300, 3) - 2.0, rng.randn(300, 3) + 2.0])
    return maf_split(x, seed=1)


DATA = DatasetSpec(
    name="demo_blobs",
    dim=3,
    sizes=(486, 54, 60),
    raw_files=(),
    source="generated (test fixture)",
    description="two Gaussian blobs in 3-D",
    recipe_version=1,
    prepare=_blobs,
)
