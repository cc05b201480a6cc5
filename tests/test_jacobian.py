"""flowbench.jacobian against explicit autograd Jacobians (float64, small networks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowbench.errors import ConfigError, InputError
from flowbench.jacobian import jacobian_spectral_norm, lipschitz_bound, logdet_autograd


def _net(d_in: int, d_out: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, 12), nn.Tanh(), nn.Linear(12, 12), nn.Softplus(), nn.Linear(12, d_out)
    ).double()


def _explicit(fn, x: torch.Tensor) -> torch.Tensor:
    """(batch, D_out, D_in): one autograd Jacobian per example."""
    return torch.stack([torch.autograd.functional.jacobian(lambda v: fn(v.unsqueeze(0)).squeeze(0), xi) for xi in x])


@pytest.mark.parametrize("d_in,d_out,seed", [(3, 3, 0), (5, 2, 1), (2, 4, 2)])
@pytest.mark.parametrize("method", ["vmap", "batched"])
def test_power_iteration_matches_largest_singular_value(d_in, d_out, seed, method):
    net = _net(d_in, d_out, seed)
    x = torch.randn(7, d_in, dtype=torch.float64)
    expected = torch.linalg.matrix_norm(_explicit(net, x), ord=2)
    got = jacobian_spectral_norm(net, x, n_iter=100, method=method)
    assert got.shape == (7,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    # Power iteration approaches σ_max from below; a few iterations never overshoot.
    assert (jacobian_spectral_norm(net, x, n_iter=2, method=method) <= expected * (1 + 1e-9)).all()


def test_auto_falls_back_for_data_dependent_control_flow():
    lin = nn.Linear(3, 3).double()

    def fn(x):
        if not torch.isfinite(x).all():  # vmap cannot trace this; the batched form can
            raise ValueError("non-finite")
        return torch.tanh(lin(x))

    x = torch.randn(4, 3, dtype=torch.float64)
    expected = torch.linalg.matrix_norm(_explicit(fn, x), ord=2)
    torch.testing.assert_close(jacobian_spectral_norm(fn, x, n_iter=100), expected, rtol=1e-6, atol=1e-9)


def test_lipschitz_bound_of_linear_map_is_its_spectral_norm():
    torch.manual_seed(0)
    w = torch.randn(4, 6, dtype=torch.float64)
    x = torch.randn(10, 6, dtype=torch.float64)
    assert lipschitz_bound(lambda v: v @ w.t(), x, n_iter=200) == pytest.approx(
        float(torch.linalg.matrix_norm(w, 2)), rel=1e-8
    )


def test_zero_jacobian_gives_zero():
    x = torch.randn(3, 2, dtype=torch.float64)
    assert torch.equal(
        jacobian_spectral_norm(lambda v: torch.zeros_like(v) + 1.0, x), torch.zeros(3, dtype=torch.float64)
    )


def test_logdet_autograd_matches_slogdet_of_explicit_jacobian():
    net = _net(4, 4, 3)
    x = torch.randn(6, 4, dtype=torch.float64)
    expected = torch.linalg.slogdet(_explicit(net, x)).logabsdet
    torch.testing.assert_close(logdet_autograd(net, x), expected)
    # Closed form: an elementwise map x ↦ x³ + x has log|det| = Σ log(3x² + 1).
    torch.testing.assert_close(logdet_autograd(lambda v: v**3 + v, x), torch.log(3 * x**2 + 1).sum(1))


def test_bad_input_is_a_clear_error():
    with pytest.raises(InputError):  # unusable tensors
        jacobian_spectral_norm(lambda v: v, torch.zeros(3))
    with pytest.raises(ConfigError):  # unusable options
        jacobian_spectral_norm(lambda v: v, torch.zeros(2, 2), n_iter=0)
    with pytest.raises(InputError, match="square"):
        logdet_autograd(lambda v: v[:, :1], torch.zeros(2, 2))


def _registered_models() -> list[str]:
    from flowbench.models import MODELS

    return sorted(MODELS)


@pytest.mark.parametrize("name", _registered_models())
def test_spectral_norm_and_logdet_on_every_registered_flow(name):
    """What the trainer records (``spectral_norm_summary``): ‖∂z/∂x‖₂ of each flow's transform in eval mode, and
    its log-det vs autograd; a class-conditional flow at each point's own label (rows ``[x, onehot(y)]``)."""
    from flowbench.models import build_model, get_spec
    from flowbench.training.evaluate import spectral_norm_summary

    k = 3 if get_spec(name).conditional else 0
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ctx = torch.nn.functional.one_hot(torch.arange(30) % 3, 3).double() if k else None
    flow = build_model(name, 3, **({"classes": k} if k else {})).double()
    rows = torch.cat([x, ctx], 1) if k else x
    flow.initialize(rows)  # the conditional Gaussian: one fit per label, 10 rows each
    flow.eval()

    def fn_at(i):
        def fn(v):
            return (flow.transform(v, ctx[i : i + 1]) if k else flow.transform(v))[0]

        return fn

    def row_jacobian(i):
        fn = fn_at(i)
        return torch.autograd.functional.jacobian(lambda v: fn(v.unsqueeze(0)).squeeze(0), x[i])

    jac = torch.stack([row_jacobian(i) for i in range(5)])
    expected = torch.linalg.matrix_norm(jac, ord=2)
    # 30 iterations (the trainer uses 20): a lower bound within 1% here; the exact check is the test above.
    summary, note = spectral_norm_summary(flow, rows[:5], n_iter=30)
    assert note is None
    assert expected.max() * 0.99 <= summary["max"] <= expected.max() * (1 + 1e-9)
    assert summary["mean"] <= expected.mean() * (1 + 1e-9) and summary["n_points"] == 5
    with torch.no_grad():
        analytic = (flow.transform(x[:5], ctx[:5]) if k else flow.transform(x[:5]))[1]
    torch.testing.assert_close(torch.linalg.slogdet(jac)[1], analytic)
