"""The rational-quadratic spline: the reference implementation's numbers, derivatives, boundaries, constraints.

Float64 throughout. The reference is nflows (bayesiains/nflows, the authors' packaged code); those tests
are skipped where it is not installed, the others check the spline against autograd and its definition.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flowbench.errors import ConfigError
from flowbench.models.splines import MIN_DERIVATIVE, rational_quadratic_spline

K, B = 8, 3.0
DT = torch.float64


def params(shape: tuple[int, ...], k: int = K, scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: scale * torch.randn(*s, generator=g, dtype=DT)
    return rnd(*shape, k), rnd(*shape, k), rnd(*shape, k - 1)


def knots(unnormalized: torch.Tensor, min_size: float = 1e-3) -> torch.Tensor:
    """Knot positions straight from the definition (floored softmax fractions of [−B, B])."""
    k = unnormalized.shape[-1]
    frac = min_size + (1 - min_size * k) * torch.softmax(unnormalized, -1)
    return torch.cat([torch.zeros_like(frac[..., :1]), frac.cumsum(-1)], -1) * 2 * B - B


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    """Points in the interval and beyond both tails (std 2.5 on B = 3: about a quarter lie outside)."""
    return 2.5 * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT)


# -- the reference ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0])
def test_equals_nflows_reference(scale):
    ref = pytest.importorskip("nflows.transforms.splines.rational_quadratic")
    n, d = 500, 4
    w, h, der = params((n, d), scale=scale)
    x = inputs(n * d).view(n, d)
    y, ld = rational_quadratic_spline(x, w, h, der, tail_bound=B)
    y_ref, ld_ref = ref.unconstrained_rational_quadratic_spline(x, w, h, der.clone(), tail_bound=B, tails="linear")
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld, ld_ref, rtol=0, atol=1e-12)
    xi, ldi = rational_quadratic_spline(y, w, h, der, inverse=True, tail_bound=B)
    xi_ref, ldi_ref = ref.unconstrained_rational_quadratic_spline(
        y, w, h, der.clone(), inverse=True, tail_bound=B, tails="linear"
    )
    torch.testing.assert_close(xi, xi_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(ldi, ldi_ref, rtol=0, atol=1e-12)


def test_gradients_equal_nflows_reference():
    ref = pytest.importorskip("nflows.transforms.splines.rational_quadratic")
    w, h, der = params((300,))
    x = inputs(300)
    grads = []
    for fn in (
        lambda *a: rational_quadratic_spline(*a, tail_bound=B),
        lambda x, w, h, d: ref.unconstrained_rational_quadratic_spline(x, w, h, d, tail_bound=B, tails="linear"),
    ):
        leaves = [t.clone().requires_grad_() for t in (x, w, h, der)]
        y, ld = fn(*leaves)
        (y.sum() + ld.sum()).backward()
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-11)


# -- against its own definition and autograd --------------------------------------------------------------
def test_logdet_is_log_derivative_and_inverse_round_trips():
    w, h, der = params((2000,))
    x = inputs(2000).requires_grad_()
    y, ld = rational_quadratic_spline(x, w, h, der, tail_bound=B)
    (dydx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(ld, torch.log(dydx), rtol=0, atol=1e-10)
    assert (dydx > 0).all()
    back, ld_inv = rational_quadratic_spline(y.detach(), w, h, der, inverse=True, tail_bound=B)
    torch.testing.assert_close(back, x.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(ld_inv, -ld.detach(), rtol=0, atol=1e-10)


def test_inverse_logdet_is_log_derivative_of_inverse():
    w, h, der = params((1000,), seed=3)
    y = inputs(1000, seed=4).requires_grad_()
    x, ld = rational_quadratic_spline(y, w, h, der, inverse=True, tail_bound=B)
    (dxdy,) = torch.autograd.grad(x.sum(), y)
    torch.testing.assert_close(ld, torch.log(dxdy), rtol=0, atol=1e-10)


def test_gradcheck_forward_and_inverse():
    w, h, der = params((6,), k=4, seed=5)
    x = torch.tensor([-3.5, -2.9, -0.4, 0.7, 2.2, 4.0], dtype=DT)
    for inverse in (False, True):

        def fn(x, w, h, d, inverse=inverse):
            return rational_quadratic_spline(x, w, h, d, inverse=inverse, tail_bound=B)

        assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (x, w, h, der)))


def test_monotone_on_a_fine_grid():
    w, h, der = params((1,), scale=2.0, seed=6)
    x = torch.linspace(-4, 4, 20_001, dtype=DT)
    y, _ = rational_quadratic_spline(
        x, w.expand(len(x), -1), h.expand(len(x), -1), der.expand(len(x), -1), tail_bound=B
    )
    assert (y.diff() > 0).all()


# -- knots, bins and tails --------------------------------------------------------------------------------
def test_knots_map_to_knots_with_the_constrained_derivatives():
    n = 50
    w, h, der = params((n,), scale=2.0, seed=7)
    xk, yk = knots(w), knots(h)
    for j in range(K + 1):
        y, ld = rational_quadratic_spline(xk[:, j], w, h, der, tail_bound=B)
        torch.testing.assert_close(y, yk[:, j], rtol=0, atol=1e-12)
        # the slope at a knot is the knot's derivative: 1 at both ends, min_derivative + softplus inside
        want = torch.zeros(n, dtype=DT) if j in (0, K) else torch.log(MIN_DERIVATIVE + F.softplus(der[:, j - 1]))
        torch.testing.assert_close(ld, want, rtol=0, atol=1e-10)
        back, _ = rational_quadratic_spline(yk[:, j], w, h, der, inverse=True, tail_bound=B)
        torch.testing.assert_close(back, xk[:, j], rtol=0, atol=1e-12)


def test_identity_outside_the_tail_bound_and_continuous_at_it():
    n = 8
    w, h, der = params((n,), scale=2.0, seed=8)
    far = torch.tensor([-1e30, -1e6, -3.0000001, 3.0000001, 7.0, 1e6, 1e30, -50.0], dtype=DT)
    for inverse in (False, True):
        y, ld = rational_quadratic_spline(far, w, h, der, inverse=inverse, tail_bound=B)
        assert torch.equal(y, far) and torch.equal(ld, torch.zeros(n, dtype=DT))
    # ±B are fixed points with slope 1: value and slope are continuous across the bound
    edge = torch.tensor([-B, B] * 4, dtype=DT)
    y, ld = rational_quadratic_spline(edge, w, h, der, tail_bound=B)
    torch.testing.assert_close(y, edge, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld, torch.zeros(n, dtype=DT), rtol=0, atol=1e-10)
    eps = 1e-8
    inner = edge - eps * torch.sign(edge)
    y, _ = rational_quadratic_spline(inner, w, h, der, tail_bound=B)
    assert ((y - inner).abs() < 1e-3 * eps).all()  # slope 1 at the bound: the deviation is O(eps²), not O(eps)


def test_far_points_give_finite_zero_gradients():
    w, h, der = (t.requires_grad_() for t in params((4,), seed=9))
    x = torch.tensor([-1e300, 1e300, float("inf"), -float("inf")], dtype=DT, requires_grad=True)
    y, ld = rational_quadratic_spline(x, w, h, der, tail_bound=B)
    (y.sum() + ld.sum()).backward()
    assert torch.equal(x.grad, torch.ones(4, dtype=DT))
    for p in (w, h, der):
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_extreme_parameters_respect_bin_and_derivative_floors():
    # ±1e3 logits: softmax weights 0 or 1, softplus 0 or 1e3; the floors must keep everything finite
    n = 400
    g = torch.Generator().manual_seed(10)
    pick = lambda *s: torch.where(torch.rand(*s, generator=g) < 0.5, -1e3, 1e3).to(DT)
    w, h, der = pick(n, K), pick(n, K), pick(n, K - 1)
    xk = knots(w)
    assert (xk.diff(dim=-1) >= 2 * B * 1e-3 - 1e-12).all()  # every bin at least min_bin_width · 2B
    x = inputs(n, seed=11).clamp(-B, B)
    y, ld = rational_quadratic_spline(x, w, h, der, tail_bound=B)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    assert (y >= -B).all() and (y <= B).all()
    back, ld_inv = rational_quadratic_spline(y, w, h, der, inverse=True, tail_bound=B)
    assert torch.isfinite(back).all() and torch.isfinite(ld_inv).all()
    # slopes as low as ~1e-6 (thin bin, min derivative) make the inverse ill-conditioned; still within 1e-6
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6)


def test_stable_root_on_a_linear_bin():
    # Identity spline: equal bins and unit derivatives make a = 0 in every bin, where (−b + √Δ)/(2a) is 0/0.
    n = 11
    zeros = torch.zeros(n, K, dtype=DT)
    unit = torch.full((n, K - 1), math.log(math.expm1(1 - MIN_DERIVATIVE)), dtype=DT)
    y = torch.linspace(-B, B, n, dtype=DT)
    x, ld = rational_quadratic_spline(y, zeros, zeros, unit, inverse=True, tail_bound=B)
    torch.testing.assert_close(x, y, rtol=0, atol=1e-14)
    torch.testing.assert_close(ld, torch.zeros(n, dtype=DT), rtol=0, atol=1e-12)


def test_float32_is_finite_and_round_trips():
    w, h, der = (t.float() for t in params((5000,), scale=1.5, seed=12))
    x = inputs(5000, seed=13).float()
    y, ld = rational_quadratic_spline(x, w, h, der, tail_bound=B)
    back, ld_inv = rational_quadratic_spline(y, w, h, der, inverse=True, tail_bound=B)
    assert y.dtype == torch.float32 and torch.isfinite(ld).all() and torch.isfinite(ld_inv).all()
    # the error of an inverse is that of y divided by the slope: measure it in y (float32 rounding of ±3)
    assert ((back - x).abs() * torch.exp(ld)).max() < 1e-5


def test_bad_parameter_shapes_are_config_errors():
    w, h, _ = params((3,))
    with pytest.raises(ConfigError, match="K, K and K − 1"):
        rational_quadratic_spline(torch.zeros(3, dtype=DT), w, h, w)
    big = torch.zeros(3, 2000, dtype=DT)
    with pytest.raises(ConfigError, match="2000 bins"):
        rational_quadratic_spline(torch.zeros(3, dtype=DT), big, big, big[:, 1:])
