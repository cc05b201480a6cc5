"""Neural spline flows: the generic model contract (through the specs), the architecture against the
reference implementation (nflows, weights copied across), autoregressive structure, counts and the spec."""

from __future__ import annotations

import inspect
import io
import math
from pathlib import Path

import pytest
import torch

from flowbench.data import DATASETS
from flowbench.errors import ConfigError, FlowbenchError
from flowbench.models.lu import LULinear, Permutation
from flowbench.models.nsf import (
    NSF_AR_SPEC,
    NSF_C_SPEC,
    AutoregressiveSpline,
    CouplingSpline,
    ResidualNet,
)
from flowbench.models.params import count_params
from flowbench.training.trainer import _check_schedule_options

SPECS = [NSF_AR_SPEC, NSF_C_SPEC]
IDS = [s.name for s in SPECS]
SMALL = {"hidden": 8, "layers": 2, "blocks": 2, "bins": 4}


def build(spec, dim: int, **hp) -> torch.nn.Module:
    return spec.build(dim, **spec.resolve({**SMALL, **hp}))


def train_data(dim: int, n: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.5 + torch.eye(dim, dtype=torch.float64)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ a.T + 0.3


def make_model(spec, dim: int, scale: float = 0.1, **hp):
    """Small float64 model with perturbed parameters (LU layers away from the identity), in eval mode."""
    model = build(spec, dim, **hp).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.eval()
    return model, train_data(dim)


# -- the generic contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("dim", [2, 3, 5])
def test_logdet_matches_autograd_jacobian(spec, dim):
    model, x = make_model(spec, dim, scale=0.2)
    xs = 1.5 * x[:5]  # some coordinates beyond the tail bound after the linear layers
    z, logdet = model.transform(xs)
    assert z.shape == xs.shape and logdet.shape == (5,)
    for i in range(xs.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: model.transform(v.unsqueeze(0))[0].squeeze(0), xs[i])
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(logdet[i], logabs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_inverse_roundtrip_and_samples(spec):
    model, x = make_model(spec, 3)
    z, logdet = model.transform(x[:32])
    x_back, logdet_inv = model.transform.inverse(z)
    torch.testing.assert_close(x_back, x[:32], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-9, atol=1e-9)
    samples = model.sample(7)
    assert samples.shape == (7, 3) and samples.dtype == torch.float64 and torch.isfinite(samples).all()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_density_integrates_to_one_in_2d(spec):
    # Perturbed splines have ridges a few hundredths wide: the grid must be finer than the generic
    # contract's (at 500² on ±16, a scale-0.3 nsf-ar integrates to 0.84; at 2000² to 1.0005).
    model, _ = make_model(spec, 2, scale=0.3)
    n, lim = 700, 7.0
    edges = torch.linspace(-lim, lim, n + 1, dtype=torch.float64)
    mid = 0.5 * (edges[1:] + edges[:-1])
    grid = torch.cartesian_prod(mid, mid)
    with torch.no_grad():
        logp = model.log_prob(grid)
    total = torch.exp(torch.logsumexp(logp, 0) + math.log((2 * lim / n) ** 2)).item()
    assert abs(total - 1.0) < 0.01, total
    stats = lambda v: torch.stack([torch.tanh(v[:, 0]), torch.tanh(v[:, 1]), torch.tanh(v[:, 0] * v[:, 1])], 1)
    on_grid = (stats(grid) * torch.softmax(logp, 0)[:, None]).sum(0)
    from_samples = stats(model.sample(20_000)).mean(0)
    assert (from_samples - on_grid).abs().max() < 0.03


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_parameter_gets_a_gradient(spec):
    model, x = make_model(spec, 3, dropout=0.2)
    model.train()
    loss = -model.train_log_prob(x[:64]).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_eval_is_deterministic_and_batch_independent_training_is_not(spec):
    model, x = make_model(spec, 3, dropout=0.5)
    full = model.log_prob(x[:6])
    torch.testing.assert_close(
        full, torch.cat([model.log_prob(x[i : i + 1]) for i in range(6)]), rtol=1e-12, atol=1e-12
    )
    model.train()  # dropout is on only in training mode
    assert not torch.allclose(model.log_prob(x[:6]), full)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_save_load_restores_permutations_and_weights(spec):
    torch.manual_seed(1)
    model, x = make_model(spec, 4)
    expected = model.log_prob(x[:8])
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(2)  # another seed draws other permutations: the state dict must bring them back
    fresh = build(spec, 4).double()
    perms = lambda m: [p.perm.tolist() for p in m.modules() if isinstance(p, Permutation)]
    assert perms(fresh) != perms(model)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh.eval()
    assert perms(fresh) == perms(model)
    torch.testing.assert_close(fresh.log_prob(x[:8]), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_float32_far_points_and_bad_input(spec):
    model = build(spec, 3)
    model.eval()
    x = torch.tensor([[0.1, -0.2, 0.3], [1e6, -1e6, 3.0], [-40.0, 7.0, 1e15]])
    lp = model.log_prob(x)
    assert lp.dtype == torch.float32 and lp.shape == (3,) and torch.isfinite(lp).all()
    # beyond float32's range for z²/2 the density underflows to −inf, never NaN
    assert model.log_prob(torch.tensor([[1e30, 0.0, -1e30]])).isneginf().all()
    with pytest.raises(FlowbenchError, match=r"shape \(batch, 3\)"):
        model.log_prob(torch.zeros(4, 2))
    with pytest.raises(FlowbenchError, match="NaN"):
        model.log_prob(torch.tensor([[0.0, float("nan"), 0.0]]))


# -- structure --------------------------------------------------------------------------------------------
def test_autoregressive_step_has_a_triangular_jacobian():
    step = AutoregressiveSpline(5, hidden=16, blocks=2, bins=4, tail_bound=3.0, dropout=0.0).double()
    with torch.no_grad():
        for p in step.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: step(v[None])[0][0], x)
    assert torch.equal(torch.triu(jac, 1), torch.zeros_like(jac))  # z_i depends on x_{≤i} only
    assert (torch.tril(jac, -1).abs() > 0).sum() >= 8  # ... and does depend on earlier ones


def test_coupling_step_conditions_on_the_pass_through_half():
    transformed = torch.tensor([True, False, True, False, True])
    for unconditional in (False, True):
        step = CouplingSpline(
            transformed, hidden=16, blocks=1, bins=4, tail_bound=3.0, dropout=0.0, unconditional=unconditional
        ).double()
        with torch.no_grad():
            for p in step.parameters():
                p.add_(0.3 * torch.randn_like(p))
        x = torch.randn(5, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v, step=step: step(v[None])[0][0], x)
        ident = ~transformed
        # the pass-through half depends on itself only (identity, or its own elementwise spline)
        block = jac[ident][:, ident]
        assert torch.equal(block, torch.diag(torch.diagonal(block)))
        assert torch.equal(jac[ident][:, transformed], torch.zeros(2, 3, dtype=torch.float64))
        assert torch.allclose(torch.diagonal(block), torch.ones(2, dtype=torch.float64)) != unconditional
        tt = jac[transformed][:, transformed]
        assert torch.equal(tt, torch.diag(torch.diagonal(tt)))  # elementwise given the other half
        assert (jac[transformed][:, ident].abs() > 0).all()


def test_linear_layers_start_at_the_identity():
    torch.manual_seed(0)
    flow = NSF_AR_SPEC.build(6, **NSF_AR_SPEC.resolve({"hidden": 16, "layers": 3}))
    lus = [m for m in flow.modules() if isinstance(m, LULinear)]
    assert len(lus) == 4 and sum(isinstance(m, Permutation) for m in flow.modules()) == 4
    for lu in lus:
        torch.testing.assert_close(lu.weight(), torch.eye(6))
        assert lu.logabsdet().abs() < 1e-6
    for net in (m for m in flow.modules() if isinstance(m, ResidualNet)):
        for _, last in net.blocks:
            assert last.weight.abs().max() <= 1e-3 and last.bias.abs().max() <= 1e-3


def test_lu_linear_matches_its_dense_matrix():
    lu = LULinear(5).double()
    with torch.no_grad():
        for p in lu.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(7, 5, dtype=torch.float64)
    z, logdet = lu(x)
    w = lu.weight()
    torch.testing.assert_close(z, x @ w.T + lu.bias)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(w)[1].expand(7))
    assert torch.equal(torch.triu(torch.linalg.cholesky(w @ w.T), 1), torch.zeros(5, 5, dtype=torch.float64))
    back, logdet_inv = lu.inverse(z)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(logdet_inv, -logdet)


# -- the reference implementation -------------------------------------------------------------------------
def _copy_net(ours: ResidualNet, theirs) -> None:
    theirs.initial_layer.load_state_dict(ours.initial.state_dict(), strict=False)
    for (a, b), block in zip(ours.blocks, theirs.blocks):
        block.linear_layers[0].load_state_dict(a.state_dict(), strict=False)
        block.linear_layers[1].load_state_dict(b.state_dict(), strict=False)
    theirs.final_layer.load_state_dict(ours.final.state_dict(), strict=False)


def nflows_mirror(flow, hp: dict):
    """The same flow built from nflows' classes (as bayesiains/nsf experiments/uci.py does), our weights copied.

    Coupling masks come from the reference's own construction, ``create_alternating_binary_mask(D, even=(i % 2
    == 0))`` for coupling step i, not from our flow: a flow whose masks do not alternate differs from its mirror.
    """
    import torch.nn.functional as F
    from nflows import transforms
    from nflows.nn.nets import ResidualNet as RefResNet
    from nflows.utils import create_alternating_binary_mask

    k = hp["bins"]
    steps = []
    couplings = 0
    for t in flow.transform.transforms:
        if isinstance(t, Permutation):
            steps.append(transforms.Permutation(t.perm.clone()))
        elif isinstance(t, LULinear):
            ref = transforms.LULinear(t.dim, identity_init=True).double()  # float64 before copying in
            ref.lower_entries.data.copy_(t.lower_entries.data)
            ref.upper_entries.data.copy_(t.upper_entries.data)
            ref.unconstrained_upper_diag.data.copy_(t.unconstrained_diag.data)
            ref.bias.data.copy_(t.bias.data)
            steps.append(ref)
        elif isinstance(t, AutoregressiveSpline):
            ref = transforms.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                features=t.dim,
                hidden_features=hp["hidden"],
                num_bins=k,
                tails="linear",
                tail_bound=hp["tail_bound"],
                num_blocks=hp["blocks"],
                use_residual_blocks=True,
                random_mask=False,
                activation=F.relu,
                dropout_probability=hp["dropout"],
                use_batch_norm=False,
            ).double()
            _copy_net(t.net, ref.autoregressive_net)
            steps.append(ref)
        elif isinstance(t, CouplingSpline):
            mask = create_alternating_binary_mask(flow.dim, even=couplings % 2 == 0)
            couplings += 1
            ref = transforms.PiecewiseRationalQuadraticCouplingTransform(
                mask=mask,
                num_bins=k,
                tails="linear",
                tail_bound=hp["tail_bound"],
                apply_unconditional_transform=hp["unconditional"],
                transform_net_create_fn=lambda n_in, n_out: RefResNet(
                    n_in,
                    n_out,
                    hidden_features=hp["hidden"],
                    num_blocks=hp["blocks"],
                    activation=F.relu,
                    dropout_probability=hp["dropout"],
                    use_batch_norm=False,
                ),
            ).double()
            _copy_net(t.net, ref.transform_net)
            if t.unconditional is not None:
                u = ref.unconditional_transform
                u.unnormalized_widths.data.copy_(t.unconditional.data[:, :k])
                u.unnormalized_heights.data.copy_(t.unconditional.data[:, k : 2 * k])
                u.unnormalized_derivatives.data.copy_(t.unconditional.data[:, 2 * k :])
            steps.append(ref)
        else:  # pragma: no cover - a new step type needs a mirror
            raise TypeError(type(t))
    return transforms.CompositeTransform(steps).eval()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("dim", [2, 5])
def test_flow_equals_reference_implementation(spec, dim):
    pytest.importorskip("nflows")
    hp = spec.resolve({"hidden": 16, "layers": 3, "blocks": 2, "bins": 5, "tail_bound": 2.5, "dropout": 0.1})
    torch.manual_seed(3)
    flow = spec.build(dim, **hp).double()
    with torch.no_grad():  # the networks' last layers start near zero: move every weight off its init
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    flow.eval()
    ref = nflows_mirror(flow, hp)
    x = 1.5 * train_data(dim)[:64]
    z, logdet = flow.transform(x)
    with torch.no_grad():
        z_ref, logdet_ref = ref(x)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=1e-11)
    # and the parameter counts agree (ours stores exactly the reference's parameters)
    assert count_params(flow) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("dim", [2, 3, 6, 7])
def test_coupling_masks_alternate(dim):
    """RQ-NSF (C)'s step i transforms the even coordinates (0, 2, …) when i is even and the odd ones when i is
    odd (bayesiains/nsf experiments/uci.py: create_alternating_binary_mask(features, even=(i % 2 == 0))), so
    every coordinate is transformed by every other step; written out here, not read from the flow."""
    flow = build(NSF_C_SPEC, dim, layers=4)
    couplings = [t for t in flow.transform.transforms if isinstance(t, CouplingSpline)]
    assert len(couplings) == 4
    for i, t in enumerate(couplings):
        assert t.trans.tolist() == list(range(i % 2, dim, 2)), i
        assert t.ident.tolist() == list(range(1 - i % 2, dim, 2)), i


# -- counts and the spec ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("dim", [2, 3, 6, 11])
@pytest.mark.parametrize("hp", [{}, {"hidden": 7, "layers": 3, "blocks": 1, "bins": 5}, {"unconditional": False}])
def test_closed_form_count_matches_built_model(spec, dim, hp):
    if "unconditional" in hp and "unconditional" not in spec.hparams:
        pytest.skip("nsf-ar has no unconditional splines")
    resolved = spec.resolve({"hidden": 32, **hp})
    assert spec.count(dim, resolved) == count_params(spec.build(dim, **resolved))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_spec_declares_the_builders_arguments(spec):
    params = list(inspect.signature(spec.build).parameters)
    assert params == ["dim", *spec.hparams]
    assert all(p.default is inspect.Parameter.empty for p in inspect.signature(spec.build).parameters.values())
    assert spec.match_knob == "hidden" and spec.display_name() in ("RQ-NSF (AR)", "RQ-NSF (C)")
    with pytest.raises(ConfigError, match="does not apply"):
        spec.resolve({"components": 3})
    with pytest.raises(ConfigError, match="must be ≥ 2"):
        spec.resolve({"bins": 1})
    assert spec.resolve({"tail_bound": 5})["tail_bound"] == 5.0


def test_builders_reject_bad_values():
    with pytest.raises(ConfigError, match="dropout"):
        NSF_AR_SPEC.build(3, **NSF_AR_SPEC.resolve({**SMALL, "dropout": 0.99}) | {"dropout": 1.0})
    with pytest.raises(ConfigError, match="at least 2 dimensions"):
        NSF_C_SPEC.build(1, **NSF_C_SPEC.resolve(SMALL))


# -- the bundled configs ----------------------------------------------------------------------------------
CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*/nsf-*.toml"))


def test_every_paper_dataset_and_digits_has_both_configs():
    have = {(p.parent.name, p.stem) for p in CONFIGS}
    want = {(d, m) for d in ("power", "gas", "hepmass", "miniboone", "bsds300", "digits") for m in IDS}
    assert have == want


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_nsf_config_is_valid_for_the_spec_and_the_trainer(path):
    from flowbench.config import resolve_options

    opts = resolve_options({"config": str(path)})  # every key a run option or a hyperparameter of this model
    assert (opts.dataset, opts.model) == (path.parent.name, path.stem) and opts.dataset in DATASETS
    spec = {s.name: s for s in SPECS}[opts.model]
    assert set(opts.hparams) == set(spec.hparams)  # every hyperparameter stated
    _check_schedule_options(opts.max_steps, opts.lr_schedule, opts.grad_clip, opts.eval_every)
    assert opts.protocol == "nsf" and opts.lr_schedule == "cosine" and opts.weight_decay == 0.0
    # the NSF code never stops early: patience covers every evaluation of the budget
    assert opts.patience * opts.eval_every >= opts.max_steps
    assert "UNVERIFIED" in path.read_text() or opts.dataset == "digits"
    assert opts.provenance["verified"] is False


def test_protocol_maf_trains_the_same_model_under_the_maf_protocol():
    from flowbench.config import resolve_options

    nsf = resolve_options({"dataset": "power", "model": "nsf-ar"})
    maf = resolve_options({"dataset": "power", "model": "nsf-ar", "protocol": "maf"})
    assert maf.hparams == nsf.hparams  # the model is the same, dropout included
    assert (maf.lr, maf.batch_size, maf.patience, maf.weight_decay) == (NSF_AR_SPEC.lr, 100, 30, 1e-6)
    assert (maf.max_steps, maf.lr_schedule, maf.grad_clip, maf.eval_every, maf.max_epochs) == (
        None,
        "constant",
        None,
        None,
        None,
    )
    flags_win = resolve_options({"dataset": "power", "model": "nsf-ar", "protocol": "maf", "batch_size": 64})
    assert flags_win.batch_size == 64


def test_zuko_twin_for_the_throughput_benchmark_matches_the_count():
    pytest.importorskip("zuko")
    from flowbench.bench.train import ZUKO_TWINS

    hp = NSF_AR_SPEC.resolve({"hidden": 32, "layers": 3, "blocks": 1, "bins": 6})
    target = NSF_AR_SPEC.count(10, hp)
    flow, width, count = ZUKO_TWINS["nsf-ar"](10, hp, target)
    assert count == sum(p.numel() for p in flow.parameters()) and abs(count - target) / target < 0.02
    assert len(flow.transform.transforms) == 3 and width > 0
    assert flow().log_prob(torch.randn(4, 10)).shape == (4,)
