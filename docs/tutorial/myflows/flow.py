"""My flow: alternating affine couplings — the user's flow of flowbench's tutorial (docs/your-own-flow.md)."""

import torch
from torch import nn

from flowbench.models import CompositeTransform, Flow, HParam, ModelSpec, StandardNormal, Transform


class Coupling(Transform):
    """Half of the coordinates scaled and shifted by a network of the other half (Dinh et al. 2017)."""

    def __init__(self, dim: int, hidden: int, parity: int):
        super().__init__()
        self.register_buffer("mask", (torch.arange(dim) % 2 == parity).float())  # 1: passed through
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * dim))

    def _scale_shift(self, x_kept):
        s, t = self.net(x_kept).chunk(2, dim=-1)
        return torch.tanh(s) * (1 - self.mask), t * (1 - self.mask)

    def forward(self, x):  # data -> latent, and log|det dz/dx| per row
        s, t = self._scale_shift(x * self.mask)
        return x * torch.exp(s) + t, s.sum(-1)

    def inverse(self, z):
        s, t = self._scale_shift(z * self.mask)
        return (z - t) * torch.exp(-s), -s.sum(-1)


def build(dim, layers=4, hidden=64):
    steps = [Coupling(dim, hidden, i % 2) for i in range(layers)]
    return Flow(CompositeTransform(steps), StandardNormal(dim), dim)


SPEC = ModelSpec(name="my-coupling", build=build, label="My coupling ({layers})", paper="flowbench tutorial",
                 lr=1e-3, match_knob="hidden",
                 hparams={"layers": HParam(4, "coupling layers", low=1), "hidden": HParam(64, "hidden units", low=1)})
