"""Pseudo-invertible pairs: the loss terms, the data, and the λ trade-off."""

from __future__ import annotations

import torch
from torch import nn

from flowbench.sanity.pseudo_inverse import pair_losses, spline_data, train_pair


def test_pair_losses_match_hand_computation():
    x = torch.tensor([[0.0], [1.0], [2.0]])
    y = torch.tensor([[1.0], [3.0], [4.0]])
    f = lambda v: 2 * v + 1  # noqa: E731  f(x) = 2x + 1, g(y) = y: hand-computed terms below
    g = nn.Identity()
    t = pair_losses(f, g, x, y)
    assert torch.isclose(t["fit_f"], torch.tensor((0 + 0 + 1) / 3))  # f(x) = 1, 3, 5 vs 1, 3, 4
    assert torch.isclose(t["fit_g"], torch.tensor((1 + 4 + 4) / 3))  # g(y) = 1, 3, 4 vs 0, 1, 2
    assert torch.isclose(t["roundtrip_y"], torch.tensor((4 + 16 + 25) / 3))  # f(g(y)) = 3, 7, 9
    assert torch.isclose(t["roundtrip_x"], torch.tensor((1 + 4 + 9) / 3))  # g(f(x)) = 1, 3, 5


def test_spline_data_is_reproducible_and_shaped():
    x, y = spline_data(200, seed=4)
    x2, y2 = spline_data(200, seed=4)
    assert x.shape == y.shape == (200, 1) and torch.equal(y, y2)
    assert x.min() == -10 and x.max() == 10
    assert not torch.equal(y, spline_data(200, seed=5)[1])


def test_penalty_trades_fit_for_invertibility():
    x, y = spline_data(200, seed=0)
    _, _, free = train_pair(x, y, lam=0.0, steps=150, lr=3e-3)
    _, _, tied = train_pair(x, y, lam=10.0, steps=150, lr=3e-3)
    assert tied["roundtrip_x"] < free["roundtrip_x"] / 3
    assert tied["fit_f"] > free["fit_f"]
