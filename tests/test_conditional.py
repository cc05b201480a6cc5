"""Class-conditional models (issue 22, MAF paper Table 2) and MADE's random degrees, against the MAF code's
definitions (gpapamak/maf: ml/models/mades.py, mafs.py, nvps.py; experiments.py) in float64 on CPU."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from flowbench.errors import ConfigError, DataIntegrityError, InputError
from flowbench.models import build_model
from flowbench.models.base import ConditionalFlow
from flowbench.models.layers import BatchNorm, MaskedLinear
from flowbench.models.made import MADE, MADEMoG, create_degrees
from flowbench.models.realnvp import CouplingLayer

K = 3
SMALL = {"hidden": 8, "hidden_layers": 2, "components": 3, "layers": 2}
FLOWS = ["made-cond", "made-mog-cond", "realnvp-cond", "maf-cond", "maf-mog-cond"]
ALL = ["gaussian-cond", *FLOWS]


def one_hot(labels, k: int = K) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(labels).long(), k).double()


def labelled_data(n: int = 300, d: int = 3, seed: int = 0) -> torch.Tensor:
    """Rows [x, onehot(y)] whose x depends on y (class means apart, class scales differ)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * (1 + 0.3 * y[:, None]) + y[:, None].double()
    return torch.cat([x, one_hot(y)], 1)


def fitted(name: str, d: int = 3, seed: int = 0, perturb: float = 0.2, **hp) -> ConditionalFlow:
    """A small float64 build, weights perturbed (densities not trivial), initialised and prepared, eval mode."""
    torch.manual_seed(seed)
    kw = {k: v for k, v in SMALL.items() if k in _hparams(name)}
    model = build_model(name, d, classes=K, **{**kw, **hp}).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    xy = labelled_data(d=d)
    model.initialize(xy)
    model.prepare_for_eval(xy)
    return model.eval()


def _hparams(name: str) -> dict:
    from flowbench.models import model_hparams

    return model_hparams(name)


# -- the density of each label --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_log_prob_is_the_change_of_variables_at_every_label(name):
    """log p(x|y) = log N(z; 0, I) (or the MoG base at y) + log|det ∂z/∂x| from autograd's Jacobian of x ↦ z."""
    model = fitted(name)
    x = labelled_data(6, seed=3)[:, :3]
    for y in range(K):
        c = one_hot([y] * 6)
        lp = model.log_prob(torch.cat([x, c], 1))
        for i in range(6):
            jac = torch.autograd.functional.jacobian(
                lambda v, ci=c[i : i + 1]: model.transform(v[None], ci)[0][0], x[i]
            )
            z = model.transform(x[i : i + 1], c[i : i + 1])[0]
            base = (
                model.base.log_prob(z, c[i : i + 1])
                if getattr(model.base, "conditional", False)
                else model.base.log_prob(z)
            )
            torch.testing.assert_close(lp[i], base[0] + torch.linalg.slogdet(jac).logabsdet, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_each_label_density_integrates_to_one(name):
    """∫ p(x|y) dx = 1 for every y, on a 2-D grid (D = 2, midpoint rule over ±25)."""
    model = fitted(name, d=2, perturb=0.1)
    n, lim = 901, 25.0
    t = torch.linspace(-lim, lim, n, dtype=torch.float64)
    grid = torch.cartesian_prod(t, t)
    cell = (t[1] - t[0]) ** 2
    with torch.no_grad():
        for y in range(K):
            total = float(torch.exp(model.log_prob(torch.cat([grid, one_hot([y] * grid.shape[0])], 1))).sum() * cell)
            assert abs(total - 1) < 5e-3, (name, y, total)


@pytest.mark.parametrize("name", ALL)
def test_marginal_classes_and_the_label_is_used(name):
    model = fitted(name)
    x = labelled_data(10, seed=4)[:, :3]
    with torch.no_grad():
        table = model.class_log_probs(x)
        cols = torch.stack([model.log_prob(torch.cat([x, one_hot([y] * 10)], 1)) for y in range(K)], 1)
        torch.testing.assert_close(table, cols, rtol=0, atol=0)
        want = logsumexp(cols.numpy(), axis=1) - math.log(K)
        np.testing.assert_allclose(model.marginal_log_prob(x).numpy(), want, rtol=1e-12, atol=1e-12)
    assert (cols[:, 1:] - cols[:, :1]).abs().min() > 1e-4, "changing the label must change the density"
    assert model.in_features == 3 + K and model.classes == K and model.dim == 3


@pytest.mark.parametrize("name", ALL)
def test_inverse_and_samples_follow_the_label(name):
    model = fitted(name)
    xy = labelled_data(12, seed=5)
    x, c = xy[:, :3], xy[:, 3:]
    with torch.no_grad():
        z, ld = model.transform(x, c)
        back, ld_inv = model.transform.inverse(z, c)
    torch.testing.assert_close(back, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-8, atol=1e-8)
    torch.manual_seed(0)
    s = model.sample(6)
    assert s.shape == (6, 3) and torch.isfinite(s).all()
    torch.manual_seed(1)
    a = model.sample(4000, labels=torch.zeros(4000, dtype=torch.long))
    with pytest.raises(InputError, match="labels must be integers"):
        model.sample(2, labels=torch.tensor([0.7, 1.0]))  # not silently truncated to 0
    torch.manual_seed(1)
    b = model.sample(4000, labels=torch.full((4000,), 2))
    # the label changes what the same noise becomes (not the first coordinate of a lone MADE: as in the MAF code,
    # its output of degree 1 sees no hidden unit, so neither x nor the label)
    assert (a - b).abs().max() > 1e-2
    # samples at label y have higher density at y than under the other labels, on average (the data's classes)
    with torch.no_grad():
        own = model.log_prob(torch.cat([b, one_hot([2] * 4000)], 1)).mean()
        other = model.log_prob(torch.cat([b, one_hot([0] * 4000)], 1)).mean()
    assert own > other


def test_bad_labels_are_clear_errors():
    model = fitted("maf-cond")
    xy = labelled_data(4)
    with pytest.raises(InputError, match=r"shape \(batch, 6\)"):
        model.log_prob(xy[:, :3])
    soft = xy.clone()
    soft[:, 3:] = 0.5
    with pytest.raises(InputError, match="one-hot"):
        model.log_prob(soft)
    with pytest.raises(InputError, match="labels must be"):
        model.sample(2, labels=torch.tensor([0, 3]))
    with pytest.raises(InputError, match="context"):
        model.transform(xy[:, :3])  # a conditional MADE without its label
    with pytest.raises(ConfigError, match="classes ≥ 2"):
        ConditionalFlow(model.transform, model.base, 3, 1)


@pytest.mark.parametrize("mog", [False, True])
@pytest.mark.parametrize("degrees", ["sequential", "random"])
def test_conditional_made_is_autoregressive_in_x(mog, degrees):
    dim = 5
    torch.manual_seed(2)
    order = torch.arange(dim, 0, -1)
    kw = {"components": 2} if mog else {}
    made = (MADEMoG if mog else MADE)(
        dim, 12, 2, "tanh", input_degrees=order, degrees=degrees, context_features=K, **kw
    ).double()
    x = torch.randn(4, dim, dtype=torch.float64, requires_grad=True)
    c = one_hot([0, 1, 2, 1])
    for p in made._params(x, c):
        flat = p.reshape(4, -1)
        out_deg = order.repeat_interleave(flat.shape[1] // dim)
        for k in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, k].sum(), x, retain_graph=True)
            assert (g.abs().sum(0)[order >= out_deg[k]] == 0).all(), "an output sees an input of equal/later degree"


# -- equal to the MAF code on the same weights ----------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def maf_code_cond_made(made: MADE, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ConditionalGaussianMade (mades.py): (u, L); n_inputs = the labels, n_outputs = the data, weights (in, out)."""
    f = np.tanh if made.activation == "tanh" else (lambda a: np.maximum(a, 0))
    Ws = [_np(lin.weight).T for lin in made.hidden]
    Ms = [_np(lin.mask).T for lin in made.hidden]
    bs = [_np(lin.bias) for lin in made.hidden]
    Wx = _np(made.context_weight).T
    d = x.shape[1]
    Wm, Wp = _np(made.out.weight[:d]).T, _np(made.out.weight[d:]).T
    Mmp = _np(made.out.mask[:d]).T
    bm, bp = _np(made.out.bias[:d]), _np(made.out.bias[d:])
    h = f(np.dot(y, Wx) + np.dot(x, Ms[0] * Ws[0]) + bs[0])
    for M, W, b in zip(Ms[1:], Ws[1:], bs[1:]):
        h = f(np.dot(h, M * W) + b)
    m = np.dot(h, Mmp * Wm) + bm
    logp = np.dot(h, Mmp * Wp) + bp
    u = np.exp(0.5 * logp) * (x - m)
    return u, -0.5 * (d * np.log(2 * np.pi) + np.sum(u**2 - logp, axis=1))


def maf_code_cond_mog_made(mog: MADEMoG, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ConditionalMixtureOfGaussiansMade (mades.py): L, with Wm/Wp/Wa of shape (H, D, C)."""
    f = np.tanh if mog.activation == "tanh" else (lambda a: np.maximum(a, 0))
    d, c = mog.dim, mog.components
    h = f(
        np.dot(y, _np(mog.context_weight).T)
        + np.dot(x, _np(mog.hidden[0].mask).T * _np(mog.hidden[0].weight).T)
        + _np(mog.hidden[0].bias)
    )
    for lin in mog.hidden[1:]:
        h = f(np.dot(h, _np(lin.mask).T * _np(lin.weight).T) + _np(lin.bias))
    w = _np(mog.out.weight).reshape(3, d, c, -1).transpose(0, 3, 1, 2)  # (3, H, D, C)
    b = _np(mog.out.bias).reshape(3, d, c)
    mmp = (_np(mog.out.mask).reshape(3, d, c, -1)[0, :, 0, :].T)[:, :, None]  # Mmp (H, D) broadcast over C
    m = np.tensordot(h, mmp * w[0], axes=[1, 0]) + b[0]
    logp = np.tensordot(h, mmp * w[1], axes=[1, 0]) + b[1]
    loga = np.tensordot(h, mmp * w[2], axes=[1, 0]) + b[2]
    loga -= np.log(np.sum(np.exp(loga), axis=2, keepdims=True))
    u = np.exp(0.5 * logp) * (x[:, :, None] - m)
    L = np.log(np.sum(np.exp(loga - 0.5 * u**2 + 0.5 * logp), axis=2))
    return -0.5 * d * np.log(2 * np.pi) + np.sum(L, axis=1)


def maf_code_cond_coupling(layer: CouplingLayer, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ConditionalCouplingLayer (nvps.py): both nets read concatenate([y, mask·x]); (u, log|det|)."""
    mask = _np(layer.mask)

    def net(seq, act):
        h = np.concatenate([y, mask * x], axis=1)
        lins = [m for m in seq if isinstance(m, torch.nn.Linear)]
        for lin in lins[:-1]:
            h = act(np.dot(h, _np(lin.weight).T) + _np(lin.bias))
        return np.dot(h, _np(lins[-1].weight).T) + _np(lins[-1].bias)

    s, t = net(layer.scale_net, np.tanh), net(layer.translate_net, lambda a: np.maximum(a, 0))
    return mask * x + (1.0 - mask) * np.exp(-s) * (x - t), -np.sum((1.0 - mask) * s, axis=1)


def maf_code_batchnorm_eval(bn: BatchNorm, x: np.ndarray) -> tuple[np.ndarray, float]:
    """layers.BatchNorm in evaluation (the stored statistics; v includes eps)."""
    lg, beta, m, v = _np(bn.log_gamma), _np(bn.beta), _np(bn.stat_mean), _np(bn.stat_var)
    return np.exp(lg) * (x - m) / np.sqrt(v) + beta, float(np.sum(lg) - 0.5 * np.sum(np.log(v)))


def maf_code_log_prob(model: ConditionalFlow, xy: np.ndarray) -> np.ndarray:
    """ConditionalMaskedAutoregressiveFlow / _on_MADE / ConditionalRealNVP / Conditional(MoG)Made: L(x | y)."""
    d = model.dim
    u, y = xy[:, :d], xy[:, d:]
    logdet = np.zeros(xy.shape[0])
    for step in model.transform.transforms:
        if isinstance(step, MADE):
            # the MADE's L = −½(D log 2π + Σu²) + ½ Σ logp: its log-det ½ Σ logp is what the flow adds (mafs.py)
            u, L = maf_code_cond_made(step, y, u)
            logdet = logdet + L + 0.5 * (d * np.log(2 * np.pi) + np.sum(u**2, axis=1))
        elif isinstance(step, CouplingLayer):
            u, ld = maf_code_cond_coupling(step, y, u)
            logdet = logdet + ld
        else:
            u, ld = maf_code_batchnorm_eval(step, u)
            logdet = logdet + ld
    if isinstance(model.base, MADEMoG):
        return maf_code_cond_mog_made(model.base, y, u) + logdet
    return -0.5 * d * np.log(2 * np.pi) - 0.5 * np.sum(u**2, axis=1) + logdet


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("degrees", ["sequential", "random"])
def test_equal_to_the_maf_code_on_the_same_weights(name, degrees):
    hp = {"degrees": degrees} if "degrees" in _hparams(name) else {}
    if not hp and degrees == "random":
        pytest.skip("Real NVP has no MADE degrees")
    model = fitted(name, d=4, **hp)
    xy = labelled_data(9, d=4, seed=6)
    with torch.no_grad():
        ours = model.log_prob(xy).numpy()
    np.testing.assert_allclose(ours, maf_code_log_prob(model, xy.numpy()), rtol=1e-11, atol=1e-11)


def test_conditional_gaussian_is_the_per_class_mle():
    xy = labelled_data(600, d=3)
    model = build_model("gaussian-cond", 3, classes=K).double()
    assert model.trainable is False and model.num_params() == K * (3 + 6)
    model.initialize(xy.float())  # fitted in float64 whatever the input dtype
    x, y = xy.float().double().numpy()[:, :3], xy.numpy()[:, 3:].argmax(1)
    test = labelled_data(20, d=3, seed=9)
    tx, ty = test.numpy()[:, :3], test.numpy()[:, 3:].argmax(1)
    comps = [multivariate_normal(x[y == k].mean(0), np.cov(x[y == k].T, ddof=0)) for k in range(K)]
    want = np.array([comps[k].logpdf(row) for row, k in zip(tx, ty)])
    np.testing.assert_allclose(model.log_prob(test).numpy(), want, rtol=1e-10)
    # the MAF code's conditional Gaussian marginal: pdfs.MoG with a uniform prior over the per-class fits
    mix = logsumexp(np.stack([c.logpdf(tx) for c in comps], 1), axis=1) - np.log(K)
    np.testing.assert_allclose(model.marginal_log_prob(test[:, :3]).numpy(), mix, rtol=1e-10)
    bad = xy.clone()
    bad[:, 3:] = one_hot(torch.zeros(600))  # class 1 has no rows
    with pytest.raises(DataIntegrityError, match="class 1"):
        model.initialize(bad)


# -- random degrees (MAF code create_degrees mode='random') ---------------------------------------------------
def maf_code_random_degrees_ok(degrees: list[torch.Tensor], dim: int) -> bool:
    """Every hidden layer's degrees lie in [min(previous layer's degrees, D − 1), D − 1]."""
    for prev, cur in zip(degrees[:-1], degrees[1:]):
        low = min(int(prev.min()), dim - 1)
        if not ((cur >= low) & (cur <= dim - 1)).all():
            return False
    return True


def test_random_degrees_follow_the_maf_code_and_the_seed():
    torch.manual_seed(0)
    a = create_degrees(6, [50, 50, 50], mode="random")
    assert maf_code_random_degrees_ok(a, 6)
    # randint(low, D) draws every degree from low to D − 1 (50 units, 5 values: all present): an off-by-one at
    # either end (never D − 1, or from low + 1) leaves a value out
    assert set(a[1].tolist()) == set(range(1, 6))
    for k in (2, 3):
        assert set(a[k].tolist()) == set(range(int(a[k - 1].min()), 6))
    assert len(set(a[1].tolist())) > 1 and not torch.equal(a[1], create_degrees(6, [50], mode="sequential")[1])
    torch.manual_seed(0)
    assert all(torch.equal(u, v) for u, v in zip(a, create_degrees(6, [50, 50, 50], mode="random")))  # seeded
    torch.manual_seed(1)
    assert not torch.equal(a[1], create_degrees(6, [50, 50, 50], mode="random")[1])  # another seed, others
    assert create_degrees(1, [4], mode="random")[1].tolist() == [0, 0, 0, 0]  # D = 1: nothing to see
    with pytest.raises(ConfigError, match="degrees mode"):
        create_degrees(3, [4], mode="shuffled")


@pytest.mark.parametrize("name", ["maf", "maf-mog-cond", "made-mog"])
def test_random_degrees_reload_identically(name):
    cond = name.endswith("-cond")
    kw = dict(classes=K) if cond else {}
    hp = {k: v for k, v in SMALL.items() if k in _hparams(name)}
    torch.manual_seed(0)
    model = build_model(name, 4, degrees="random", **kw, **hp).double().eval()
    torch.manual_seed(1)
    other = build_model(name, 4, degrees="random", **kw, **hp).double().eval()
    masks = [m.mask for m in model.modules() if isinstance(m, MaskedLinear)]
    assert any(
        not torch.equal(a, b.mask) for a, b in zip(masks, [m for m in other.modules() if isinstance(m, MaskedLinear)])
    )
    xy = labelled_data(8, d=4) if cond else labelled_data(8, d=4)[:, :4]
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    with torch.no_grad():
        torch.testing.assert_close(other.log_prob(xy), model.log_prob(xy), rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(model).log_prob(xy), model.log_prob(xy), rtol=0, atol=0)
    assert all(
        torch.equal(a, m.mask) for a, m in zip(masks, [m for m in other.modules() if isinstance(m, MaskedLinear)])
    )
    assert any(k.endswith("degrees_1") for k in model.state_dict())
    # sequential degrees keep their state_dict (old checkpoints load as before)
    assert not any("degrees" in k for k in build_model(name, 4, **kw, **hp).state_dict())
