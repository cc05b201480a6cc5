"""The model specs are the one declaration: builders, flags, configs, sweeps and matching all agree with them."""

from __future__ import annotations

import argparse
import inspect

import pytest

from flowbench import models
from flowbench.cli import build_parser
from flowbench.config import OPTIONS, hparam_declarations, resolve_options
from flowbench.errors import ConfigError
from flowbench.models.params import count_params, param_count
from flowbench.models.spec import HParam, ModelSpec
from flowbench.sweep import parse_sweep

NAMES = list(models.MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_builder_keywords_are_exactly_the_spec(name):
    spec = models.MODELS[name]
    params = inspect.signature(spec.build).parameters
    dim, *rest = params.values()
    assert dim.name == "dim"
    assert [p.name for p in rest] == list(spec.hparams), "builder keywords must be the spec's, in its order"
    for p in rest:  # defaults live in the spec only
        assert p.default is inspect.Parameter.empty and p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
    for key, hp in spec.hparams.items():
        assert hp.help and (hp.choices is None or hp.default in hp.choices), key
        assert hp.check(name, key, hp.default) == hp.default  # the default passes its own bounds
    assert spec.label.format(**spec.defaults())
    assert spec.lr > 0 and spec.paper
    assert spec.match_knob is None or spec.match_knob in spec.hparams


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_counts_agree_with_built_models(name):
    spec = models.MODELS[name]
    for dim in (2, 5):
        hp = spec.resolve({k: 3 for k in ("hidden", "layers") if k in spec.hparams})
        assert param_count(name, dim, **hp) == count_params(models.build_model(name, dim, **hp))


def test_a_shared_hyperparameter_has_one_type_and_one_flag():
    decl = hparam_declarations()
    for key, entry in decl.items():
        assert {hp.type for hp in entry["models"].values()} == {entry["type"]}, key
        assert key not in OPTIONS, f"{key} is both a run option and a model hyperparameter"
    parser = build_parser("run")
    run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    flags = {s for a in run._actions for s in a.option_strings}
    for key in [*decl, *OPTIONS]:
        assert "--" + key.replace("_", "-") in flags


def _toy_spec() -> ModelSpec:
    """A new model declared the documented way: one spec, one new hyperparameter."""
    from flowbench.models.maf import MAF_HPARAMS, build_maf

    def build_toy(dim, *, layers, hidden, hidden_layers, activation, batch_norm, wiggle):
        return build_maf(dim, layers=layers, hidden=hidden, hidden_layers=hidden_layers, activation=activation,
                         batch_norm=batch_norm)

    return ModelSpec(name="toy", build=build_toy, label="Toy ({wiggle})", paper="test", lr=5e-4,
                     match_knob="hidden",
                     hparams={**MAF_HPARAMS, "wiggle": HParam(3, "a new knob", low=1, high=9)})


def test_a_new_model_is_usable_from_flags_configs_sweeps_and_matching(monkeypatch, tmp_path):
    monkeypatch.setitem(models.MODELS, "toy", _toy_spec())
    opts = resolve_options({"model": "toy", "dataset": "nowhere", "wiggle": 4})
    assert opts.hparams == {"wiggle": 4} and opts.lr == 5e-4
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "toy"\nwiggle = 7\n')
    assert resolve_options({"config": str(cfg)}).hparams["wiggle"] == 7
    with pytest.raises(ConfigError, match="must be ≤ 9"):
        resolve_options({"model": "toy", "dataset": "nowhere", "wiggle": 10})
    with pytest.raises(ConfigError, match="--wiggle does not apply to model 'maf'"):
        resolve_options({"model": "maf", "dataset": "nowhere", "wiggle": 4})
    sweep = parse_sweep({"datasets": ["digits"], "models": ["toy", "maf"], "grid": {"wiggle": [2, 5]}})
    assert sorted(r.tag for r in sweep.runs if r.model == "toy") == ["wiggle=2", "wiggle=5"]
    assert sweep.ignored == {"maf": ["wiggle"]}
    args = build_parser("run").parse_args(["run", "--model", "toy", "--wiggle", "2"])
    assert args.wiggle == 2
    from flowbench.models.params import match_params

    assert match_params("toy", 6, 5000, wiggle=2)["hparams"]["wiggle"] == 2
    assert models.display_name("toy", wiggle=2) == "Toy (2)"


def test_hparam_checks():
    hp = HParam(0.3, "slope", low=0.0, low_open=True, high=1.0)
    assert hp.check("m", "alpha", 1) == 1.0
    for bad, match in [(0.0, "> 0"), (1.5, "≤ 1"), ("x", "wrong type"), (True, "wrong type"), (float("nan"), "finite")]:
        with pytest.raises(ConfigError, match=match):
            hp.check("m", "alpha", bad)
    base = HParam("normal", "base", choices=("normal", "logistic"), aliases={"hyperbolic-secant": "logistic"})
    assert base.check("relgrad", "base", "hyperbolic-secant") == "hyperbolic-secant"  # kept as written
    with pytest.raises(ConfigError, match="normal, logistic, hyperbolic-secant"):
        base.check("relgrad", "base", "cauchy")
