"""Parameter counts against the MAF paper's counts (docs/sources/maf-protocol.md#parameter-counts), and parameter
matching."""

from __future__ import annotations

import pytest

from flowbench.errors import ConfigError
from flowbench.models import MODELS, build_model, display_name, model_hparams
from flowbench.models.params import count_params, match_params, param_count


def test_published_example_counts_power():
    # docs/sources/maf-protocol.md, parameter counts: POWER (D = 6, H = 100), MAF(5) with batch norm
    assert count_params(build_model("maf", 6, layers=5, hidden=100, hidden_layers=1)) == 9_620
    assert count_params(build_model("maf", 6, layers=5, hidden=100, hidden_layers=2)) == 60_120


def test_relgrad_count_is_L_times_D2_plus_D():
    assert count_params(build_model("relgrad", 6, layers=2)) == 84
    assert count_params(build_model("relgrad", 5, layers=3)) == 3 * (25 + 5)


@pytest.mark.parametrize("hl", [1, 2, 3])
@pytest.mark.parametrize("bn", [True, False])
def test_formulas_match_built_models(hl, bn):
    d, h, k, c = 5, 7, 3, 4
    made = 3 * d * h + (hl - 1) * h * h + hl * h + 2 * d
    mog = d * h + (hl - 1) * h * h + hl * h + 3 * c * (h * d + d)
    bnp = 2 * k * d if bn else 0
    expected = {
        "made": (dict(hidden=h, hidden_layers=hl), made),
        "made-mog": (dict(hidden=h, hidden_layers=hl, components=c), mog),
        "maf": (dict(layers=k, hidden=h, hidden_layers=hl, batch_norm=bn), k * made + bnp),
        "maf-mog": (dict(layers=k, hidden=h, hidden_layers=hl, batch_norm=bn, components=c), k * made + bnp + mog),
        "realnvp": (
            dict(layers=k, hidden=h, hidden_layers=hl, batch_norm=bn),
            k * (4 * d * h + 2 * (hl - 1) * h * h + 2 * hl * h + 2 * d) + bnp,
        ),
    }
    for name, (hp, count) in expected.items():
        assert count_params(build_model(name, d, **hp)) == count, name
        assert param_count(name, d, **hp) == count, name
    assert count_params(build_model("gaussian", d)) == param_count("gaussian", d) == d + d * (d + 1) // 2
    # class-conditional (K classes): + one K × H label weight Wx per MADE, + K inputs to both nets of each coupling
    # layer; the conditional Gaussian is K Gaussians
    n = 4
    extra = {"made": n * h, "made-mog": n * h, "maf": k * n * h, "maf-mog": (k + 1) * n * h, "realnvp": 2 * k * n * h}
    for name, (hp, count) in expected.items():
        assert count_params(build_model(f"{name}-cond", d, classes=n, **hp)) == count + extra[name], name
        assert param_count(f"{name}-cond", d, classes=n, **hp) == count + extra[name], name
    assert (
        param_count("gaussian-cond", d, classes=n)
        == count_params(build_model("gaussian-cond", d, classes=n))
        == n * (d + d * (d + 1) // 2)
    )
    res = match_params("maf-cond", d, 5_000, classes=n, layers=2)
    assert res["achieved"] == count_params(build_model("maf-cond", d, classes=n, **res["hparams"]))


@pytest.mark.parametrize("name", ["made", "made-mog", "maf", "maf-mog", "realnvp"])
def test_match_params_reaches_one_percent(name):
    fixed = {"layers": 5} if "layers" in model_hparams(name) else {}
    target = 120_000
    res = match_params(name, 21, target, **fixed)
    assert set(res) >= {"hparams", "target", "achieved"}
    assert res["target"] == target
    assert res["achieved"] == count_params(build_model(name, 21, **res["hparams"]))
    assert abs(res["achieved"] - target) <= 0.01 * target
    assert res["hparams"].get("layers", 5) == 5  # fixed values are kept


@pytest.mark.parametrize("name", ["maf", "realnvp", "made-mog"])
@pytest.mark.parametrize("target", [500, 2_345, 7_777])
def test_match_params_is_the_closest_achievable(name, target):
    res = match_params(name, 6, target, layers=2) if "layers" in model_hparams(name) else match_params(name, 6, target)
    knob = res["knob"]
    best = abs(res["achieved"] - target)
    others = [abs(param_count(name, 6, **{**res["hparams"], knob: v}) - target) for v in range(1, 400)]
    assert best == min(others)
    assert res["relative_error"] == pytest.approx((res["achieved"] - target) / target)


def test_baselines_matched_to_a_relgrad_model():
    # the relative-gradient paper's use: size a baseline to the dense flow's L(D² + D) parameters
    target = count_params(build_model("relgrad", 43, layers=10))
    assert target == 10 * (43 * 43 + 43)
    res = match_params("maf", 43, target, layers=5, hidden_layers=1)
    assert abs(res["relative_error"]) < 0.05  # the count moves by 5·(3D + 1) = 650 per hidden unit
    assert match_params("relgrad", 43, target)["hparams"]["layers"] == 10
    tiny = match_params("maf", 6, 84, layers=5)  # below the smallest MAF(5): closest achievable, reported
    assert tiny["hparams"]["hidden"] == 1 and tiny["achieved"] == 215 and tiny["relative_error"] > 1


def test_match_params_exact_tie_goes_to_the_smaller_model():
    """relgrad on D = 3 has 12 parameters a layer (D² + D): a target of 18 lies exactly between 1 layer (12) and
    2 (24), and so does 30 between 2 and 3; the smaller size wins, as the docstring states."""
    assert param_count("relgrad", 3, layers=1) == 12 and param_count("relgrad", 3, layers=2) == 24
    for target, layers in [(18, 1), (30, 2), (19, 2), (17, 1)]:
        res = match_params("relgrad", 3, target)
        assert res["hparams"]["layers"] == layers, target
        assert res["achieved"] == 12 * layers
    # a width knob: MADE's count at width w and w + 1 around their midpoint
    lo, hi = param_count("made", 3, hidden=10), param_count("made", 3, hidden=11)
    assert (lo + hi) % 2 == 0, "the fixture needs an integer midpoint"
    assert match_params("made", 3, (lo + hi) // 2)["hparams"]["hidden"] == 10


def test_match_params_errors():
    with pytest.raises(ConfigError, match="unknown model"):
        match_params("nope", 3, 100)
    with pytest.raises(ConfigError, match="positive integer"):
        match_params("maf", 3, 0)
    with pytest.raises(ConfigError, match="does not accept"):
        match_params("maf", 3, 1000, widht=3)
    assert match_params("gaussian", 4, 10) == {
        "hparams": {},
        "target": 10,
        "achieved": 14,
        "knob": None,
        "relative_error": 0.4,
    }
    assert MODELS["maf"].match_knob == "hidden"


def test_registry_errors_and_labels():
    with pytest.raises(ConfigError, match="choose one of"):
        build_model("maff", 3)
    with pytest.raises(ConfigError, match="activation"):
        build_model("maf", 3, activation="sigmoid")
    with pytest.raises(ConfigError, match="wrong type"):
        build_model("maf", 3, hidden="100")
    with pytest.raises(ConfigError, match="wrong type"):
        build_model("maf", 3, batch_norm=1)
    with pytest.raises(ConfigError, match="dim"):
        build_model("maf", 0)
    with pytest.raises(ConfigError, match="≥ 1"):
        build_model("maf", 3, layers=0)
    assert display_name("maf", layers=10) == "MAF (10)"
    assert display_name("maf-mog") == "MAF MoG (5)"
    assert display_name("realnvp", layers=10) == "Real NVP (10)"
    assert (display_name("gaussian"), display_name("made"), display_name("made-mog")) == (
        "Gaussian",
        "MADE",
        "MADE MoG",
    )
    assert model_hparams("maf") == {
        "layers": 5,
        "hidden": 100,
        "hidden_layers": 1,
        "activation": "relu",
        "degrees": "sequential",
        "batch_norm": True,
    }
    assert model_hparams("made-mog")["components"] == 10
    assert build_model("maf", 3, hidden=None).transform.transforms[0].out.weight.shape[1] == 100  # None → default


def test_match_params_with_a_named_knob():
    # relgrad-style depth matching for MAF: solve for the number of MADEs at a fixed width
    res = match_params("maf", 6, 40_000, knob="layers", hidden=50)
    assert res["knob"] == "layers" and res["hparams"]["hidden"] == 50
    best = abs(res["achieved"] - 40_000)
    assert best == min(abs(param_count("maf", 6, layers=k, hidden=50) - 40_000) for k in range(1, 60))
    assert match_params("maf", 6, 40_000, knob=None)["knob"] == "hidden"  # None: the spec's own knob
    with pytest.raises(ConfigError, match="'widht' is not a hyperparameter of model 'maf'; choose one of layers"):
        match_params("maf", 6, 40_000, knob="widht")
    with pytest.raises(ConfigError, match="--activation of model 'maf' is not a size"):
        match_params("maf", 6, 40_000, knob="activation")
    with pytest.raises(ConfigError, match="--batch-norm of model 'maf' is not a size"):
        match_params("maf", 6, 40_000, knob="batch_norm")


def _widths_spec():
    """MAF whose hidden layers are a list of widths (as zuko's ``hidden_features``), one width per list."""
    from flowbench.models.maf import MAF_SPEC, build_maf
    from flowbench.models.spec import HParam, ModelSpec

    def build(dim, *, layers, widths):
        return build_maf(
            dim, layers=layers, hidden=widths[0], hidden_layers=len(widths), activation="relu", batch_norm=True
        )

    return ModelSpec(
        name="widths",
        build=build,
        label="W",
        paper="test",
        lr=1e-4,
        match_knob="widths",
        hparams={"layers": MAF_SPEC.hparams["layers"], "widths": HParam((8, 8), "widths", low=1)},
    )


def test_match_params_with_a_list_knob(monkeypatch):
    monkeypatch.setitem(MODELS, "widths", _widths_spec())
    for fixed, length in [({}, 2), ({"widths": (3, 3, 3)}, 3), ({"widths": "5"}, 1)]:
        res = match_params("widths", 6, 30_000, layers=2, **fixed)
        w = res["hparams"]["widths"]
        assert res["knob"] == "widths" and len(w) == length and len(set(w)) == 1  # same width, length kept
        twin = match_params("maf", 6, 30_000, layers=2, hidden_layers=length)  # the scalar knob's answer
        assert w[0] == twin["hparams"]["hidden"] and res["achieved"] == twin["achieved"]
    with pytest.raises(ConfigError, match="empty list"):
        match_params("widths", 6, 30_000, widths=[])
    with pytest.raises(ConfigError, match="not a list of integers"):
        match_params("widths", 6, 30_000, widths="a,b")
