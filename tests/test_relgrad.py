"""relgrad dense flow: relative gradient vs an explicit float64 computation, exact log-det, inverse, bases."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_fused_cpu_adam

from flowbench.errors import ConfigError, InputError
from flowbench.models import build_model
from flowbench.models.relgrad import RELGRAD_HPARAMS


def build_relgrad(dim, **hp):
    return build_model("relgrad", dim, **hp)


D, B = 5, 32


def _flow(**hp):
    f = build_relgrad(D, **hp).double()
    with torch.no_grad():  # move away from the orthogonal init so WᵀW ≠ I and biases ≠ 0 matter
        for w in f.transform.weights:
            w.add_(0.3 * torch.randn_like(w))
        for b in f.transform.biases or []:
            b.normal_(0, 0.5)
    return f


def _data_loss(f, x):
    """−mean of the data terms (base + activation log-derivatives, no log|det W|), written independently."""
    t = f.transform
    h, ld = x, torch.zeros(x.shape[0], dtype=x.dtype)
    n = len(t.weights)
    for k in range(n):
        y = h @ t.weights[k].t() + (t.biases[k] if t.biases is not None else 0)
        if k < n - 1:
            if t.activation == "tanh":
                h = torch.tanh(y) + 0.1 * y
                ld = ld + torch.log(1 - torch.tanh(y) ** 2 + 0.1).sum(-1)
            else:
                a = t.alpha
                h = a * y + (1 - a) * F.softplus(y)
                ld = ld + torch.log(a + (1 - a) * torch.sigmoid(y)).sum(-1)
        else:
            h = y
    return -(f.base.log_prob(h) + ld).mean()


def _expected(f, x):
    """Projected relative gradient via the augmented matrix (appendix F, column convention), minus W."""
    t = f.transform
    params = list(t.weights) + (list(t.biases) if t.biases is not None else [])
    grads = torch.autograd.grad(_data_loss(f, x), params)
    n = len(t.weights)
    out_w, out_b = [], []
    for k, w in enumerate(t.weights):
        gw = grads[k]
        b = t.biases[k].detach() if t.biases is not None else torch.zeros(D, dtype=x.dtype)
        gb = grads[n + k] if t.biases is not None else torch.zeros(D, dtype=x.dtype)
        A = torch.eye(D + 1, dtype=x.dtype)
        A[:D, :D], A[:D, D] = w.detach(), b
        G = torch.zeros(D + 1, D + 1, dtype=x.dtype)
        G[:D, :D], G[:D, D] = gw, gb
        R = G @ A.t() @ A
        out_w.append(R[:D, :D] - w.detach())  # log|det W| adds −W to W only (reference code)
        out_b.append(R[:D, D])
        # the reference code's row-convention formulas (docs/sources/relgrad.md) must agree
        W_, G_ = w.detach().t(), gw.t()
        ref_w = W_ @ W_.t() @ G_ + W_ @ b[:, None] @ gb[None, :]
        ref_b = b[None, :] @ W_.t() @ G_ + (1 + b @ b) * gb[None, :]
        assert torch.allclose(ref_w.t(), R[:D, :D], atol=1e-12) and torch.allclose(ref_b[0], R[:D, D], atol=1e-12)
    return out_w, out_b


@pytest.mark.parametrize(
    "hp",
    [
        {},
        {"bias": False},
        {"activation": "tanh", "base": "logistic"},
        {"layers": 3, "alpha": 0.01, "base": "hyperbolic-secant"},
    ],
)
def test_relative_gradient_matches_explicit_float64(hp):
    f = _flow(**hp)
    x = torch.randn(B, D, dtype=torch.float64)
    exp_w, exp_b = _expected(f, x)
    f.zero_grad()
    (-f.train_log_prob(x).mean()).backward()
    for k, w in enumerate(f.transform.weights):
        torch.testing.assert_close(w.grad, exp_w[k], atol=1e-10, rtol=0)
        if f.transform.biases is not None:
            torch.testing.assert_close(f.transform.biases[k].grad, exp_b[k], atol=1e-10, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_bias_logdet_switch_gives_the_full_augmented_rule(fused):
    f = _flow()
    f.transform.bias_logdet = True
    x = torch.randn(B, D, dtype=torch.float64)
    exp_w, exp_b = _expected(f, x)
    lp = f.train_log_prob(x) if fused else f.log_prob(x)  # fused training path / per-layer path
    (-lp.mean()).backward()
    for k, (w, b) in enumerate(zip(f.transform.weights, f.transform.biases)):
        torch.testing.assert_close(w.grad, exp_w[k], atol=1e-10, rtol=0)
        torch.testing.assert_close(b.grad, exp_b[k] - b.detach(), atol=1e-10, rtol=0)


def test_training_path_gradient_wrt_input_is_the_ordinary_one():
    f = _flow()
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    (g_fused,) = torch.autograd.grad(f.train_log_prob(x).sum(), x)
    f.relative = False
    (g_plain,) = torch.autograd.grad(f.log_prob(x).sum(), x)
    torch.testing.assert_close(g_fused, g_plain, atol=1e-10, rtol=0)


def test_relative_gradient_is_ordinary_gradient_times_WtW_and_scales_with_the_loss():
    f = _flow(bias=False)
    x = torch.randn(B, D, dtype=torch.float64)
    (-f.log_prob(x).sum()).backward()  # sum, not mean: the direction must scale with the loss
    rel = [w.grad.clone() for w in f.transform.weights]
    f.zero_grad()
    f.relative = False
    (-f.log_prob(x).sum()).backward()
    for w, r in zip(f.transform.weights, rel):
        torch.testing.assert_close(r, w.grad @ w.detach().t() @ w.detach(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("activation", ["smooth-leaky-relu", "tanh"])
def test_logdet_matches_autograd_jacobian(relative, activation):
    f = _flow(activation=activation)
    f.relative = relative
    x = torch.randn(6, D, dtype=torch.float64)
    _, logdet = f.transform(x)
    for i in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda v: f.transform(v[None])[0][0], x[i])
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(J)[1], atol=1e-10, rtol=0)


def test_inverse_round_trip_and_sampling():
    f = _flow()
    f.eval()
    x = torch.randn(50, D, dtype=torch.float64) * 3
    z, ld = f.transform(x)
    xr, ldi = f.transform.inverse(z)
    torch.testing.assert_close(xr, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(ldi, -ld, atol=1e-9, rtol=0)
    s = f.sample(7)
    assert s.shape == (7, D) and torch.isfinite(s).all()


@pytest.mark.parametrize("activation", ["smooth-leaky-relu", "tanh"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_activation_inverse_reaches_stated_tolerance(activation, dtype, rtol):
    t = build_relgrad(3, activation=activation, alpha=0.05).transform.to(dtype)
    target = torch.cat([torch.linspace(-60, 60, 1001), torch.tensor([0.0, 1e-8, -1e-8])]).to(dtype)
    y = t._act_inverse(target)
    h, _ = t._act(y)
    assert ((h - target).abs() <= rtol * (1 + target.abs())).all()


def test_logistic_base_normalises_and_matches_scipy():
    from scipy.stats import logistic

    f = build_relgrad(1, base="logistic").double()
    s = torch.linspace(-40, 40, 200_001, dtype=torch.float64)[:, None]
    lp = f.base.log_prob(s)
    assert abs(torch.trapezoid(lp.exp(), s[:, 0]).item() - 1) < 1e-8
    torch.testing.assert_close(lp, torch.from_numpy(logistic(scale=0.5).logpdf(s[:, 0].numpy())), atol=1e-12, rtol=0)
    big = f.base.log_prob(torch.tensor([[1e4]], dtype=torch.float64))  # stable far in the tails
    assert math.isclose(big.item(), math.log(2) - 2e4, rel_tol=1e-12)


def test_training_increases_likelihood_without_any_slogdet(monkeypatch):
    teacher = _flow()
    with torch.no_grad():
        data = teacher.sample(512)
    student = build_relgrad(D).double()
    student.eval()
    before = student.log_prob(data).mean().item()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    student.train()

    def _forbidden(*a, **k):
        raise AssertionError("slogdet called during training")

    with monkeypatch.context() as m:
        m.setattr(torch.linalg, "slogdet", _forbidden)
        for step in range(60):
            xb = data[(step * 64) % 512 :][:64]
            opt.zero_grad()
            (-student.train_log_prob(xb).mean()).backward()
            opt.step()
    student.eval()
    after = student.log_prob(data).mean().item()
    assert after > before + 0.5, (before, after)
    assert after <= teacher.log_prob(data).mean().item() + 0.5  # cannot beat the true density by much


def test_logdet_cache_is_reused_and_invalidated(monkeypatch):
    f = _flow()
    f.eval()
    calls = []
    real = torch.linalg.slogdet
    monkeypatch.setattr(torch.linalg, "slogdet", lambda w: calls.append(1) or real(w))
    x = torch.randn(4, D, dtype=torch.float64)
    f.log_prob(x)
    before = f.transform.logabsdet()
    f.log_prob(x)
    assert len(calls) == 2  # once per layer, then cached
    with torch.no_grad():
        f.transform.weights[0].mul_(2.0)  # an optimiser-style in-place update
    f.log_prob(x)
    assert len(calls) == 4
    assert math.isclose(f.transform.logabsdet() - before, D * math.log(2.0), rel_tol=1e-12)
    torch.testing.assert_close(f.transform.logabsdet(), sum(real(w)[1].item() for w in f.transform.weights))


def test_near_singular_weight_warns():
    f = _flow()
    with torch.no_grad():
        f.transform.weights[1][0] = f.transform.weights[1][1] * (1 + 1e-15)
    with pytest.warns(RuntimeWarning, match="relgrad layer 1"):
        f.prepare_for_eval(None)
    g = _flow()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g.prepare_for_eval(None)  # a healthy flow stays silent


def test_state_dict_round_trip_and_errors():
    f = _flow()
    g = build_relgrad(D).double()
    g.load_state_dict(f.state_dict())
    x = torch.randn(3, D, dtype=torch.float64)
    torch.testing.assert_close(g.log_prob(x), f.log_prob(x))
    assert f.num_params() == 2 * (D * D + D)
    assert set(RELGRAD_HPARAMS) == {"layers", "bias", "activation", "alpha", "base", "bias_logdet"}
    for bad in [{"depth": 2}, {"activation": "relu"}, {"base": "cauchy"}, {"alpha": 0.0}]:
        with pytest.raises(ConfigError):
            build_relgrad(D, **bad)
    with pytest.raises(InputError):
        f.log_prob(torch.randn(3, D + 1, dtype=torch.float64))


def test_bias_logdet_is_a_hyperparameter_and_defaults_to_the_reference_rule():
    from flowbench.models import build_model

    assert build_model("relgrad", 3).transform.bias_logdet is False
    assert build_model("relgrad", 3, bias_logdet=True).transform.bias_logdet is True


@needs_fused_cpu_adam
def test_logdet_is_not_stale_after_a_fused_adam_step_in_training_mode():
    # fused Adam updates weights without bumping their version counter; the cache must not be trusted then.
    from flowbench.models import build_model

    torch.manual_seed(0)
    f = build_model("relgrad", 4).double()
    f.train()
    x = torch.randn(32, 4, dtype=torch.float64)
    f.log_prob(x)  # fills the cache
    opt = torch.optim.Adam(f.parameters(), lr=0.1, fused=True)
    (-f.train_log_prob(x).mean()).backward()
    opt.step()
    fresh = sum(torch.linalg.slogdet(w)[1].item() for w in f.transform.weights)
    assert abs(f.transform.logabsdet() - fresh) < 1e-10
