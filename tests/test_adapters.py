"""Bring your own flow: zuko and nflows flow classes and factory functions as flowbench models (adapters).

Each adapted flow must be the peer's own density on the same weights, have the log-determinant its Jacobian
has, train, round-trip its state and sample; the specs read the peers' constructors (forwarded ``**kwargs``
included) and the stacked trainer's vmap path must work where the spec says it does.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowbench.errors import ConfigError
from flowbench.models import Flow
from flowbench.models.adapters import PeerFlow, spec_for
from flowbench.models.params import match_params
from flowbench.models.spec import ANY

D = 3


def _zuko():
    return pytest.importorskip("zuko")


def _nflows():
    return pytest.importorskip("nflows.flows")


# -- the flows under test: (reference, spec object, hyperparameters, the peer built independently) ---------
def zuko_nsf_coupling(features, passes: int = 2, hidden: int = 16, bins: int = 6):
    """zuko's NSF with coupling transforms (a factory function: plain arguments for what the class hides)."""
    import zuko

    return zuko.flows.NSF(features, passes=passes, bins=bins, hidden_features=(hidden, hidden))


def _cases():
    return {
        "zuko-maf": (
            lambda: _zuko().flows.MAF,
            {"transforms": 2, "hidden_features": "8,8"},
            lambda: _zuko().flows.MAF(features=D, transforms=2, hidden_features=(8, 8)),
        ),
        "zuko-nsf": (
            lambda: _zuko().flows.NSF,
            {"transforms": 2, "hidden_features": [8], "bins": 4},
            lambda: _zuko().flows.NSF(features=D, transforms=2, hidden_features=(8,), bins=4),
        ),
        "nflows-maf": (
            lambda: _nflows().MaskedAutoregressiveFlow,
            {"hidden_features": "8", "num_layers": 2, "num_blocks_per_layer": 1},
            lambda: _nflows().MaskedAutoregressiveFlow(D, 8, 2, 1),
        ),
        "nflows-realnvp": (
            lambda: _nflows().SimpleRealNVP,
            {"hidden_features": 8, "num_layers": 2, "num_blocks_per_layer": 1},
            lambda: _nflows().SimpleRealNVP(D, 8, 2, 1),
        ),
        "factory": (lambda: (_zuko(), zuko_nsf_coupling)[1], {"hidden": 8}, lambda: zuko_nsf_coupling(D, hidden=8)),
    }


CASES = list(_cases())


def _build(case, seed=0):
    get, hp, _ = _cases()[case]
    obj = get()
    spec = spec_for(obj, case)
    torch.manual_seed(seed)
    return spec, spec.build(D, **spec.resolve(hp)).double()


def _peer_log_prob(peer, x):
    """The peer's own density: nflows ``flow.log_prob(x)``, zuko ``flow().log_prob(x)``."""
    return peer.log_prob(x) if hasattr(peer, "_transform") else peer().log_prob(x)


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.3, 0.5, 0.4]], dtype=torch.float64)
    return torch.randn(n, D, generator=g, dtype=torch.float64) @ a.T


@pytest.mark.parametrize("case", CASES)
def test_log_prob_is_the_peers_own_on_the_same_weights(case):
    spec, flow = _build(case)
    assert isinstance(flow, PeerFlow) and isinstance(flow, Flow)
    flow.eval()
    peer = _cases()[case][2]().double().eval()
    peer.load_state_dict({k.removeprefix("peer."): v for k, v in flow.state_dict().items()})
    x = _data(16)
    with torch.no_grad():
        want = _peer_log_prob(peer, x)
        got = flow.log_prob(x)
        z, logdet = flow.transform(x)
        parts = flow.base.log_prob(z) + logdet
    assert got.shape == (16,) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flow.train_log_prob(x).detach(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_logdet_is_log_abs_det_of_the_jacobian(case):
    _, flow = _build(case)
    flow.eval()
    x = _data(4)
    _, logdet = flow.transform(x)
    assert logdet.shape == (4,)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda r: flow.transform(r[None])[0][0], x[i])
        assert jac.shape == (D, D)
        torch.testing.assert_close(logdet[i].detach(), torch.linalg.slogdet(jac)[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_trains_round_trips_and_samples(case):
    spec, flow = _build(case)
    x = _data(256)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    flow.train()
    with torch.no_grad():
        before = -flow.train_log_prob(x).mean().item()
    for _ in range(30):
        opt.zero_grad()
        (-flow.train_log_prob(x).mean()).backward()
        opt.step()
    flow.eval()
    flow.prepare_for_eval(x)  # no flowbench batch norm inside: nothing to do, nothing to fail
    after = -flow.log_prob(x).mean().item()
    assert math.isfinite(after) and after < before - 0.05, (before, after)
    _, other = _build(case, seed=123)  # other initial weights
    other.eval()
    assert not torch.equal(other.log_prob(x), flow.log_prob(x))
    other.load_state_dict(flow.state_dict())
    torch.testing.assert_close(other.log_prob(x), flow.log_prob(x), rtol=0, atol=0)
    assert other.num_params() == flow.num_params() == sum(p.numel() for p in flow.peer.parameters()) > 0
    s = flow.sample(7)
    assert s.shape == (7, D) and s.dtype == torch.float64 and torch.isfinite(s).all()


def test_zuko_specs_follow_forwarded_keyword_arguments():
    zuko = _zuko()
    maf = spec_for(zuko.flows.MAF, "zuko.flows:MAF")
    assert (maf.name, maf.label, maf.lr, maf.match_knob) == (
        "zuko-maf",
        "zuko MAF ({transforms})",
        1e-4,
        "hidden_features",
    )
    assert maf.display_name({}) == "zuko MAF (3)"
    assert maf.paper.startswith(f"zuko {zuko.__version__} MAF") and "no batch norm" in maf.paper
    # MAF's own arguments, then MaskedAutoregressiveTransform's and MaskedMLP's through **kwargs; features,
    # context (fixed 0) and the unrepresentable ones (passes=None, order, univariate, activation) left out
    assert list(maf.hparams) == ["transforms", "randperm", "hidden_features", "residual"]
    hf = maf.hparams["hidden_features"]
    assert (hf.type, hf.item, hf.default) == (tuple, int, (64, 64)) and "hidden features" in hf.help
    nsf = spec_for(zuko.flows.NSF, "zuko.flows:NSF")
    assert nsf.name == "zuko-nsf" and {"bins", "slope", "transforms", "hidden_features"} <= set(nsf.hparams)
    assert not {"univariate", "shapes", "passes", "context", "features"} & set(nsf.hparams)  # NSF sets them
    assert nsf.hparams["slope"].type is float
    naf = spec_for(zuko.flows.NAF, "zuko.flows:NAF")
    assert naf.label == "zuko NAF ({transforms})" and "signal" in naf.hparams and "network" not in naf.hparams  # a dict
    assert spec_for(zuko.flows.MAF, "zuko.flows.autoregressive:MAF") is maf  # one class, one spec
    flow = maf.build(4, **maf.resolve({"hidden_features": "[5, 7]", "transforms": 1}))
    assert flow.num_params() == sum(
        p.numel() for p in zuko.flows.MAF(4, transforms=1, hidden_features=(5, 7)).parameters()
    )


def test_nflows_specs_have_required_hyperparameters():
    nflows = _nflows()
    spec = spec_for(nflows.MaskedAutoregressiveFlow, "nflows.flows:MaskedAutoregressiveFlow")
    assert (spec.name, spec.label) == (
        "nflows-maskedautoregressiveflow",
        "nflows MaskedAutoregressiveFlow ({num_layers})",
    )
    assert spec.required() == ["hidden_features", "num_layers", "num_blocks_per_layer"]
    assert all(spec.hparams[k].type is ANY for k in spec.required())
    assert spec.defaults()["hidden_features"] is None and spec.defaults()["use_residual_blocks"] is True
    assert "activation" not in spec.hparams  # a function: left out
    with pytest.raises(ConfigError, match="--hidden-features, --num-layers, --num-blocks-per-layer.*command line"):
        spec.resolve({})
    hp = spec.resolve({"hidden_features": "32", "num_layers": "2", "num_blocks_per_layer": 1})
    assert (hp["hidden_features"], hp["num_layers"]) == (32, 2)  # command-line text read as literals
    with pytest.raises(ConfigError, match="Residual blocks can't be used with random masks"):
        spec.build(D, **spec.resolve({**hp, "use_random_masks": True}))
    rnvp = spec_for(nflows.SimpleRealNVP, "nflows.flows:SimpleRealNVP")
    assert (
        rnvp.name == "nflows-simplerealnvp"
        and rnvp.label == "nflows SimpleRealNVP ({num_layers})"
        and "Dinh" in rnvp.paper
    )


def test_nflows_batch_norm_keeps_its_running_averages():
    nflows = _nflows()
    spec = spec_for(nflows.MaskedAutoregressiveFlow, "m")
    flow = spec.build(
        D,
        **spec.resolve(
            {"hidden_features": 8, "num_layers": 2, "num_blocks_per_layer": 1, "batch_norm_between_layers": True}
        ),
    ).double()
    x = _data(128)
    flow.train()
    flow.train_log_prob(x).sum().backward()  # a training step updates nflows' running averages
    flow.eval()
    flow.prepare_for_eval(x)  # flowbench's whole-set statistics do not apply to nflows' layers: no error
    assert torch.isfinite(flow.log_prob(x)).all()
    flow.train()
    assert flow.sample(5).shape == (5, D) and flow.training  # nflows inverts batch norm in eval mode only
    hp = spec.resolve({"hidden_features": 8, "num_layers": 2, "num_blocks_per_layer": 1})
    assert "batch norm" in spec.unstackable({**hp, "batch_norm_between_layers": True})
    assert "--dropout-probability 0.1" in spec.unstackable({**hp, "dropout_probability": 0.1})


def _stacked_grads_match(spec, hp):
    """Two runs through vmap over functional_call (the stacked trainer's path for peers) give each run's
    own log-density and gradients."""
    from flowbench.models.stacking import split_buffers, stacked_objective

    flows = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        flows.append(spec.build(D, **spec.resolve(hp)).double())
    x = torch.stack([_data(10, seed=2), _data(10, seed=3)])
    names = [k for k, _ in flows[0].named_parameters()]
    params = {k: torch.stack([dict(f.named_parameters())[k].detach() for f in flows]).requires_grad_() for k in names}
    shared, per_run = split_buffers(flows)
    out = stacked_objective(flows[0], shared, run_buffers=per_run, use_vmap=True)(params, x)
    out.sum().backward()
    for r, f in enumerate(flows):
        own = f.train_log_prob(x[r])
        torch.testing.assert_close(out[r].detach(), own.detach(), rtol=1e-10, atol=1e-10)
        own.sum().backward()
        for k, p in f.named_parameters():
            torch.testing.assert_close(params[k].grad[r], p.grad, rtol=1e-8, atol=1e-10)


def test_zuko_maf_and_nflows_maf_stack_under_vmap():
    zuko, nflows = _zuko(), _nflows()
    maf = spec_for(zuko.flows.MAF, "zuko.flows:MAF")
    hp = {"transforms": 2, "hidden_features": (8, 8), "randperm": True}  # random orders: per-run buffers
    assert maf.unstackable(maf.resolve(hp)) is None
    _stacked_grads_match(maf, hp)
    nmaf = spec_for(nflows.MaskedAutoregressiveFlow, "nflows.flows:MaskedAutoregressiveFlow")
    hp = {"hidden_features": 8, "num_layers": 2, "num_blocks_per_layer": 1}
    assert nmaf.unstackable(nmaf.resolve(hp)) is None
    _stacked_grads_match(nmaf, hp)
    naf = spec_for(zuko.flows.NAF, "zuko.flows:NAF")  # its transform differentiates inside: vmap refuses
    assert "vmap" in naf.unstackable(naf.resolve({"hidden_features": (8,), "transforms": 1, "signal": 4}))


def test_factory_functions():
    _zuko()
    spec = spec_for(zuko_nsf_coupling, "tests/test_adapters.py:zuko_nsf_coupling")
    assert (spec.name, spec.label, spec.match_knob) == ("zuko_nsf_coupling", "zuko_nsf_coupling", "hidden")
    assert list(spec.hparams) == ["passes", "hidden", "bins"] and spec.paper.startswith("user factory")
    assert spec.hparams["passes"].type is int

    def ours(dim, layers: int = 2, *, widths: tuple[int, ...] = (4, 4), scale: float = 1):
        from flowbench.models.maf import build_maf

        return build_maf(
            dim, layers=layers, hidden=widths[0], hidden_layers=len(widths), activation="relu", batch_norm=False
        )

    s = spec_for(ours, "f.py:ours")
    assert (s.hparams["widths"].type, s.hparams["scale"].type, s.hparams["scale"].default) == (tuple, float, 1.0)
    flow = s.build(5, **s.resolve({"widths": "6,6,6"}))
    assert type(flow) is Flow and flow.dim == 5  # a flowbench Flow is used as it is

    def needs(features, width: int, depth=2):
        return ours(features, depth, widths=(width,))

    n = spec_for(needs, "f.py:needs")
    assert n.required() == ["width"] and n.hparams["width"].type is int
    with pytest.raises(ConfigError, match="needs --width"):
        n.resolve({})

    def wrong_dim(features):
        return ours(features + 1)

    with pytest.raises(ConfigError, match="dimension 4, not 3"):
        spec_for(wrong_dim, "f.py:wrong_dim").build(3)

    def not_a_flow(features):
        return torch.nn.Linear(features, features)

    with pytest.raises(ConfigError, match="returned a Linear, not a flow"):
        spec_for(not_a_flow, "f.py:not_a_flow").build(3)


def test_not_adapted():
    def spec_factory():  # no dimension argument: the resolver's "function returning a spec"
        return None

    def other(x, y=1):
        return x

    for obj in (spec_factory, other, torch.nn.Linear, 3, "maf", [1], None):
        assert spec_for(obj, "ref") is None
    zuko = _zuko()
    with pytest.raises(ConfigError, match="no `features` argument.*factory function"):
        spec_for(zuko.flows.Flow, "zuko.flows:Flow")


def test_match_params_sizes_adapted_flows():
    _zuko()
    res = match_params("zuko.flows:MAF", 6, 20_000, transforms=2)
    assert res["knob"] == "hidden_features"
    w = res["hparams"]["hidden_features"]
    assert len(w) == 2 and w[0] == w[1]  # the default's length, one width
    assert abs(res["relative_error"]) < 0.02
    deeper = match_params("zuko.flows:MAF", 6, 20_000, transforms=2, hidden_features=(8, 8, 8))
    assert len(deeper["hparams"]["hidden_features"]) == 3
    _nflows()
    res = match_params("nflows.flows:MaskedAutoregressiveFlow", 6, 20_000, num_layers=2, num_blocks_per_layer=1)
    assert res["knob"] == "hidden_features" and isinstance(res["hparams"]["hidden_features"], int)
    assert abs(res["relative_error"]) < 0.02
    with pytest.raises(ConfigError, match="needs --num-blocks-per-layer"):
        match_params("nflows.flows:MaskedAutoregressiveFlow", 6, 20_000, num_layers=2)


def maf_with(features, **kwargs):
    """A factory that passes its keyword arguments on to zuko."""
    import zuko

    return zuko.flows.MAF(features, **kwargs)


class AffineFlow(Flow):
    """A flowbench Flow subclass whose constructor starts with the dimension: a factory too."""

    def __init__(self, dim, layers: int = 1):
        from flowbench.models.maf import build_maf

        inner = build_maf(dim, layers=layers, hidden=4, hidden_layers=1, activation="relu", batch_norm=False)
        super().__init__(inner.transform, inner.base, dim)


def test_factories_that_forward_keyword_arguments_and_flow_classes():
    _zuko()
    spec = spec_for(maf_with, "f.py:maf_with")
    assert list(spec.hparams) == ["transforms", "randperm", "hidden_features", "residual"]
    flow = spec.build(4, **spec.resolve({"hidden_features": "6", "transforms": 1}))
    assert flow.num_params() == sum(p.numel() for p in maf_with(4, transforms=1, hidden_features=(6,)).parameters())
    cls = spec_for(AffineFlow, "f.py:AffineFlow")
    assert (cls.name, cls.label, list(cls.hparams)) == ("affineflow", "AffineFlow", ["layers"])
    built = cls.build(3, layers=2)
    assert type(built) is AffineFlow and len(built.transform.transforms) == 2
