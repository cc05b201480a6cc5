"""Family-specific checks against the MAF code's definitions (float64, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from flowbench.errors import ConfigError, DataIntegrityError
from flowbench.models import build_model
from flowbench.models.base import CompositeTransform, Flow, StandardNormal
from flowbench.models.layers import BatchNorm, MaskedLinear, recompute_batchnorm_stats
from flowbench.models.made import MADE, MADEMoG
from flowbench.models.realnvp import CouplingLayer


def maf_code_masks(dim: int, hidden: list[int], order: np.ndarray) -> list[np.ndarray]:
    """Independent re-statement of gpapamak/maf create_degrees('sequential') + create_masks, (in, out)."""
    degrees = [order] + [np.arange(n) % max(1, dim - 1) + min(1, dim - 1) for n in hidden]
    masks = [d0[:, None] <= d1 for d0, d1 in zip(degrees[:-1], degrees[1:])]
    return masks + [degrees[-1][:, None] < degrees[0]]


def made_masks(made: MADE | MADEMoG) -> list[torch.Tensor]:
    return [m.mask for m in made.modules() if isinstance(m, MaskedLinear)]


@pytest.mark.parametrize("hidden_layers", [1, 2])
@pytest.mark.parametrize("reverse", [False, True])
def test_masks_equal_the_maf_code(hidden_layers, reverse):
    dim, hidden = 5, 7
    order = np.arange(1, dim + 1)[::-1].copy() if reverse else np.arange(1, dim + 1)
    made = MADE(dim, hidden, hidden_layers, "relu", input_degrees=torch.from_numpy(order))
    ours = made_masks(made)
    ref = maf_code_masks(dim, [hidden] * hidden_layers, order)
    for m, r in zip(ours[:-1], ref[:-1]):
        np.testing.assert_array_equal(m.T.numpy(), r)
    out = ours[-1].T.numpy()  # (hidden, 2D): [means | log precisions]
    np.testing.assert_array_equal(out[:, :dim], ref[-1])
    np.testing.assert_array_equal(out[:, dim:], ref[-1])


def _dependence(outputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|∂ output_k / ∂ x_j| summed over a batch, by backprop from each output k: (K, D)."""
    rows = []
    for k in range(outputs.shape[1]):
        (g,) = torch.autograd.grad(outputs[:, k].sum(), x, retain_graph=True)
        rows.append(g.abs().sum(0))
    return torch.stack(rows)


@pytest.mark.parametrize("hidden_layers", [1, 2])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mog", [False, True])
def test_made_is_autoregressive(hidden_layers, reverse, mog):
    dim = 5
    deg = torch.arange(dim, 0, -1) if reverse else torch.arange(1, dim + 1)
    cls = MADEMoG if mog else MADE
    kw = {"components": 2} if mog else {}
    made = cls(dim, 12, hidden_layers, "tanh", input_degrees=deg, **kw).double()
    x = torch.randn(3, dim, dtype=torch.float64, requires_grad=True)
    params = made._params(x)
    out_deg = deg.repeat_interleave(params[0].numel() // (3 * dim))  # degree of each flattened output
    for p in params:
        dep = _dependence(p.reshape(3, -1), x)
        allowed = deg[None, :] < out_deg[:, None]
        assert (dep[~allowed] == 0).all(), "an output depends on an input of equal or later degree"
        assert (dep[allowed] > 0).all(), "an output ignores an earlier input (tanh units: should not happen)"


def test_made_density_is_the_maf_formula():
    dim = 4
    made = MADE(dim, 10, 2, "relu").double()
    flow = Flow(CompositeTransform([made]), StandardNormal(dim), dim)
    x = torch.randn(6, dim, dtype=torch.float64)
    m, logp = made._params(x)
    u = torch.exp(0.5 * logp) * (x - m)
    expected = -0.5 * (dim * math.log(2 * math.pi) + (u**2 - logp).sum(1))
    torch.testing.assert_close(flow.log_prob(x), expected)


def test_made_mog_in_one_dimension_is_a_plain_mixture():
    # D = 1: no input reaches the outputs, so the density is the mixture given by the output biases.
    mog = MADEMoG(1, 4, 1, "relu", components=3).double()
    b = mog.out.bias.detach().view(3, 3)  # (means, log precisions, logits) × components
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=b[2]),
        torch.distributions.Normal(b[0], torch.exp(-0.5 * b[1])),
    )
    x = torch.linspace(-3, 3, 11, dtype=torch.float64)
    torch.testing.assert_close(mog.log_prob(x[:, None]), mix.log_prob(x))


def test_made_mog_samples_follow_the_density():
    torch.manual_seed(3)
    mog = MADEMoG(1, 4, 1, "relu", components=3).double()
    s = mog.sample(40_000)[:, 0]
    b = mog.out.bias.detach().view(3, 3)
    w = torch.softmax(b[2], 0)
    mean = (w * b[0]).sum()
    var = (w * (torch.exp(-b[1]) + b[0] ** 2)).sum() - mean**2
    assert abs(s.mean() - mean) < 5 * math.sqrt(var / s.numel())
    assert abs(s.var() / var - 1) < 0.05


def test_initialisation_follows_the_maf_code():
    torch.manual_seed(0)
    made = MADE(20, 400, 2, "relu")
    for lin in [m for m in made.modules() if isinstance(m, MaskedLinear)]:
        fan_in = lin.weight.shape[1]
        assert abs(lin.weight.std().item() * math.sqrt(fan_in + 1) - 1) < 0.05
        assert (lin.bias == 0).all()
    mog = MADEMoG(20, 400, 1, "relu", components=10)
    assert abs(mog.out.bias.std().item() - 1) < 0.1 and abs(mog.out.bias.mean().item()) < 0.1


def test_maf_orders_alternate_and_mog_base_reverses_the_last():
    flow = build_model("maf-mog", 4, layers=3, hidden=6)
    mades = [t for t in flow.transform.transforms if isinstance(t, MADE)]
    bns = [t for t in flow.transform.transforms if isinstance(t, BatchNorm)]
    assert len(mades) == 3 and len(bns) == 3
    assert isinstance(flow.transform.transforms[-1], BatchNorm)  # batch norm after the last MADE too
    seq, rev = [1, 2, 3, 4], [4, 3, 2, 1]
    assert [m.input_degrees.tolist() for m in mades] == [seq, rev, seq]
    assert flow.base.input_degrees.tolist() == rev
    assert not any(isinstance(t, BatchNorm) for t in build_model("maf", 4, batch_norm=False).transform.transforms)


def test_batchnorm_train_mode_formula_and_stats():
    bn = BatchNorm(3).double()
    with torch.no_grad():
        bn.log_gamma.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.beta.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x = torch.randn(50, 3, dtype=torch.float64) * 2 + 1
    y, logdet = bn(x)
    v = x.var(0, unbiased=False) + 1e-5
    torch.testing.assert_close(y, torch.exp(bn.log_gamma) * (x - x.mean(0)) / v.sqrt() + bn.beta)
    torch.testing.assert_close(logdet, (bn.log_gamma - 0.5 * v.log()).sum().expand(50))
    assert (bn.stat_mean == 0).all() and (bn.stat_var == 1).all()  # training never touches the stored stats
    bn.set_stats_from(x, chunk=7)
    torch.testing.assert_close(bn.stat_mean, x.mean(0))
    torch.testing.assert_close(bn.stat_var, v)
    bn.eval()
    torch.testing.assert_close(bn(x)[0], y)
    torch.testing.assert_close(bn.inverse(y)[0], x)


def test_recompute_sets_each_layer_from_its_own_input():
    flow = build_model("realnvp", 3, layers=2, hidden=5).double()
    x = torch.randn(101, 3, dtype=torch.float64)
    flow.train()
    recompute_batchnorm_stats(flow, x, batch_size=10)
    assert flow.training  # modes restored
    c1, bn1, c2, bn2 = flow.transform.transforms
    flow.eval()
    h1 = c1(x)[0]
    torch.testing.assert_close(bn1.stat_mean, h1.mean(0))
    torch.testing.assert_close(bn1.stat_var, h1.var(0, unbiased=False) + 1e-5)
    h2 = c2(bn1(h1)[0])[0]
    torch.testing.assert_close(bn2.stat_mean, h2.mean(0))
    torch.testing.assert_close(bn2.stat_var, h2.var(0, unbiased=False) + 1e-5)
    before = (bn2.stat_mean.clone(), bn2.stat_var.clone())
    recompute_batchnorm_stats(flow, x.float().numpy(), batch_size=1000)  # numpy / float32 input is converted
    torch.testing.assert_close(bn2.stat_mean, before[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn2.stat_var, before[1], rtol=1e-5, atol=1e-6)


def test_recompute_refuses_nested_batchnorm():
    inner = CompositeTransform([BatchNorm(2)])
    flow = Flow(CompositeTransform([inner]), StandardNormal(2), 2)
    with pytest.raises(ConfigError, match="direct steps"):
        flow.prepare_for_eval(torch.randn(10, 2))


def test_masked_linear():
    x = torch.randn(4, 3)
    lin = MaskedLinear(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(lin(x), x @ (lin.weight * lin.mask).T + lin.bias)


def test_coupling_layer_is_the_maf_code_formula():
    layer = CouplingLayer(torch.tensor([0, 1, 0, 1]), hidden=6, hidden_layers=1).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    s, t = layer.scale_net(b * x), layer.translate_net(b * x)
    u, ld = layer(x)
    torch.testing.assert_close(u, b * x + (1 - b) * torch.exp(-s) * (x - t))
    torch.testing.assert_close(ld, -((1 - b) * s).sum(1))
    assert isinstance(layer.scale_net[1], torch.nn.Tanh) and isinstance(layer.translate_net[1], torch.nn.ReLU)
    flow = build_model("realnvp", 4, layers=3)
    masks = [t.mask.tolist() for t in flow.transform.transforms if isinstance(t, CouplingLayer)]
    assert masks == [[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]


def test_gaussian_is_the_closed_form_mle():
    g = torch.Generator().manual_seed(0)
    x = (
        torch.randn(300, 3, generator=g, dtype=torch.float64)
        @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 0.3], [0.0, 0.0, 0.5]], dtype=torch.float64)
        + 1.0
    )
    model = build_model("gaussian", 3).double()
    assert model.trainable is False
    model.initialize(x.float())  # fitted in float64 whatever the input dtype
    xf = x.float().double().numpy()
    ref = multivariate_normal(xf.mean(0), np.cov(xf.T, ddof=0))
    np.testing.assert_allclose(model.log_prob(x).numpy(), ref.logpdf(x.numpy()), rtol=1e-10)
    assert model.num_params() == 3 + 6
    with pytest.raises(DataIntegrityError, match="singular"):
        model.initialize(torch.cat([x[:, :2], x[:, :1]], 1))
