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
from flowbench.models.spec import ANY, HParam, ModelSpec
from flowbench.sweep import parse_sweep

NAMES = list(models.MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_builder_keywords_are_exactly_the_spec(name):
    spec = models.MODELS[name]
    params = inspect.signature(spec.build).parameters
    dim, *rest = params.values()
    assert dim.name == "dim"
    if spec.conditional:  # build(dim, *, classes, **hparams)
        assert rest[0].name == "classes" and rest[0].default is inspect.Parameter.empty
        rest = rest[1:]
    assert [p.name for p in rest] == list(spec.hparams), "builder keywords must be the spec's, in its order"
    for p in rest:  # defaults live in the spec only (MADE's degrees, added later, keeps the spec's for old callers)
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
        assert p.default is inspect.Parameter.empty or (
            p.name == "degrees" and p.default == spec.hparams[p.name].default
        )
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
        for classes in (2, 5) if spec.conditional else (0,):  # a conditional model's label weights count
            assert param_count(name, dim, classes=classes, **hp) == count_params(
                models.build_model(name, dim, classes=classes, **hp)
            )


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

    def build_toy(dim, *, layers, hidden, hidden_layers, activation, degrees, batch_norm, wiggle):
        return build_maf(
            dim, layers=layers, hidden=hidden, hidden_layers=hidden_layers, activation=activation, batch_norm=batch_norm
        )

    return ModelSpec(
        name="toy",
        build=build_toy,
        label="Toy ({wiggle})",
        paper="test",
        lr=5e-4,
        match_knob="hidden",
        hparams={**MAF_HPARAMS, "wiggle": HParam(3, "a new knob", low=1, high=9)},
    )


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


def test_list_hyperparameters():
    hp = HParam((64, 64), "hidden widths", low=1)
    assert (hp.type, hp.item, hp.cli_type, hp.default_text) == (tuple, int, str, "64,64")
    for given in ("32,16", "[32, 16]", "(32, 16)", " 32 , 16 ", [32, 16], (32, 16)):  # command line, TOML/JSON
        assert hp.check("m", "hidden_features", given) == (32, 16)
    assert hp.check("m", "hidden_features", "8") == (8,) and hp.check("m", "hidden_features", "8,") == (8,)
    assert hp.from_text("m", "hidden_features", "4,4") == (4, 4)
    for bad, match in [
        ("64,x", "not a list of integers; write it as 64,64 or \\[64, 64\\]"),
        ("1.5,2", "not a list of integers"),
        ([64, 1.5], "not a list of integers"),
        ([True], "not a list of integers"),
        ("", "not a list"),
        ("64,,64", "not a list"),
        (64, "wrong type; expected a list of integers"),
        ("0,4", "--hidden-features entries must be ≥ 1"),
    ]:
        with pytest.raises(ConfigError, match=match):
            hp.check("m", "hidden_features", bad)
    fl = HParam((0.5, 1), "scales")
    assert (fl.item, fl.default) == (float, (0.5, 1.0)) and fl.check("m", "s", "1,2e-1") == (1.0, 0.2)
    with pytest.raises(ConfigError, match="finite"):
        fl.check("m", "s", [1, float("inf")])
    for bad_default in ((), (1, "a"), (True, False), [None]):
        with pytest.raises(TypeError):
            HParam(bad_default, "x")


def test_required_and_untyped_hyperparameters():
    n = HParam(None, "layers", kind=int, required=True, low=1)
    assert (n.type, n.cli_type, n.default_text) == (int, int, "required")
    assert n.check("m", "num_layers", 3) == 3 and n.from_text("m", "num_layers", "4") == 4
    for bad, match in [("4", "wrong type; expected int"), (0, "≥ 1"), (True, "wrong type")]:
        with pytest.raises(ConfigError, match=match):
            n.check("m", "num_layers", bad)
    with pytest.raises(ConfigError, match="'x' has the wrong type; expected int"):
        n.from_text("m", "num_layers", "x")
    anything = HParam(None, "an untyped argument", required=True)  # nflows' hidden_features
    assert anything.type is ANY and anything.cli_type is str
    for text, value in [
        ("64", 64),
        ("0.1", 0.1),
        ("true", True),
        ("False", False),
        ("64,64", (64, 64)),
        ("[1, 2.5]", (1, 2.5)),
        ("relu", "relu"),
        (7, 7),
        ([3, 4], (3, 4)),
        (0.5, 0.5),
    ]:
        got = anything.check("m", "hidden_features", text)
        assert got == value and type(got) is type(value), text
    for bad, match in [
        ({"a": 1}, "wrong type; expected a number, true/false, text or a list"),
        ([1, "a"], "numbers only"),
        ("nan", "finite"),
    ]:
        with pytest.raises(ConfigError, match=match):
            anything.check("m", "hidden_features", bad)
    with pytest.raises(TypeError):
        HParam(3, "a required one has no default", required=True)
    with pytest.raises(TypeError):
        HParam(None, "a required list needs its item type", kind=tuple, required=True)
    assert HParam(None, "w", kind=tuple, item=int, required=True).check("m", "w", "2,3") == (2, 3)
    assert HParam(1, "slope", kind=float).default == 1.0  # an int default of a float argument


def _list_spec() -> ModelSpec:
    """A model with a list-valued, a required typed and a required untyped hyperparameter."""
    from flowbench.models.maf import build_maf

    def build_listy(dim, *, widths, depth, anything):
        return build_maf(
            dim, layers=depth, hidden=widths[0], hidden_layers=len(widths), activation="relu", batch_norm=False
        )

    return ModelSpec(
        name="listy",
        build=build_listy,
        label="Listy ({depth})",
        paper="test",
        lr=1e-4,
        match_knob="widths",
        hparams={
            "widths": HParam((8, 8), "hidden widths", low=1),
            "depth": HParam(None, "flow depth", kind=int, required=True, low=1),
            "anything": HParam(None, "an untyped argument", required=True),
        },
    )


def test_required_hyperparameters_must_be_given(monkeypatch, tmp_path):
    spec = _list_spec()
    assert spec.defaults() == {"widths": (8, 8), "depth": None, "anything": None}
    assert spec.required() == ["depth", "anything"]
    assert spec.label.format(**spec.defaults())  # the lead's spec check formats the label with the defaults
    with pytest.raises(
        ConfigError,
        match="model 'listy' needs --depth, --anything: they have no default; give "
        "them on the command line .*, in the config file or in the sweep grid",
    ):
        spec.resolve({})
    with pytest.raises(ConfigError, match="needs --anything: it has no default; give it on the command line"):
        spec.resolve({"depth": 2})
    assert spec.resolve({"depth": 2, "anything": "0.5", "widths": "4,4,4"}) == {
        "widths": (4, 4, 4),
        "depth": 2,
        "anything": 0.5,
    }
    monkeypatch.setitem(models.MODELS, "listy", spec)
    opts = resolve_options({"model": "listy", "dataset": "nowhere", "widths": "16,16", "depth": 2, "anything": "1"})
    assert models.resolve_hparams("listy", **opts.hparams)["widths"] == (16, 16)
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "listy"\nwidths = [32, 32, 32]\ndepth = 3\nanything = "64,64"\n')
    opts = resolve_options({"config": str(cfg)})
    hp = models.resolve_hparams("listy", **opts.hparams)
    assert (hp["widths"], hp["depth"], hp["anything"]) == ((32, 32, 32), 3, (64, 64))
    assert models.build_model("listy", 4, **hp).num_params() > 0
    cfg.write_text('model = "listy"\nwidths = [32, "x"]\ndepth = 3\nanything = 1\n')
    with pytest.raises(ConfigError, match="--widths \\[32, 'x'\\] is not a list of integers"):
        resolve_options({"config": str(cfg)})
    with pytest.raises(ConfigError, match="needs --depth"):
        resolve_options({"model": "listy", "dataset": "nowhere", "anything": 1})
    args = build_parser("run").parse_args(["run", "--model", "listy", "--widths", "16,16", "--depth", "2"])
    assert (args.widths, args.depth) == ("16,16", 2)  # HParam.cli_type: str for lists, int for an int


def test_conditional_specs_are_derived_from_the_unconditional_ones():
    """Each ``<name>-cond`` has its model's label, hyperparameters, learning rate and knob, and needs labels."""
    conds = [n for n in NAMES if models.MODELS[n].conditional]
    assert conds == ["gaussian-cond", "made-cond", "made-mog-cond", "realnvp-cond", "maf-cond", "maf-mog-cond"]
    for name in conds:
        spec, base = models.MODELS[name], models.MODELS[name.removesuffix("-cond")]
        assert (spec.label, dict(spec.hparams), spec.lr, spec.match_knob, spec.trainable) == (
            base.label,
            dict(base.hparams),
            base.lr,
            base.match_knob,
            base.trainable,
        )
        assert NAMES.index(name) == NAMES.index(base.name) + 1  # beside its model in the registry
        with pytest.raises(
            ConfigError,
            match=f"model {name} is class-conditional: it needs a dataset with labels "
            r"\(mnist, cifar10, digits\)",
        ):
            models.build_model(name, 3)
        with pytest.raises(ConfigError, match="class-conditional"):
            param_count(name, 3, classes=1)
        with pytest.raises(ConfigError, match=f"use {name}"):
            models.build_model(base.name, 3, classes=3)
    assert not any(models.MODELS[n].conditional for n in NAMES if not n.endswith("-cond"))


@pytest.mark.parametrize("page", ["README.md", "docs/manual/models.md"])
def test_the_models_tables_list_every_hyperparameter_with_its_choices_and_default(page):
    # The README's and the manual's model tables are the account of the specs a reader sees first: a
    # hyperparameter added to a spec (maf's `degrees` was missing from both) or a changed default must show there.
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / page).read_text()
    shown: dict[str, dict[str, tuple[str | None, str]]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        name = re.fullmatch(r"`([\w-]+)`", cells[0]) if len(cells) >= 4 else None
        if name is None or name.group(1) not in models.MODELS:
            continue  # other rows, and the -cond row that refers to the six above
        hp = cells[3].replace("\\|", "|")
        base = re.match(r"as `([\w-]+)`, plus ", hp)
        params = dict(shown[base.group(1)]) if base else {}
        for key, choices, default in re.findall(r"`(\w+)`(?: ([\w.|-]+))?(?: \([^)]*\))? \[([^\]]+)\]", hp):
            params[key] = (choices or None, default)
        shown[name.group(1)] = params
    # every built-in model has its row (the -cond ones share the row "gaussian-cond … maf-mog-cond")
    unconditional = {n for n in _builtin_names() if not models.get_spec(n).conditional}
    assert set(shown) == unconditional, "a row per built-in model: add the new model's row (docs/extending.md)"
    assert "`gaussian-cond` … `maf-mog-cond`" in text

    def spelled(v):
        return str(v).lower() if isinstance(v, bool) else str(v)

    for name, params in shown.items():
        spec = models.get_spec(name)
        assert set(params) == set(spec.hparams), name
        for key, (choices, default) in params.items():
            h = spec.hparams[key]
            assert default == spelled(h.default), (name, key)
            assert choices == ("|".join(h.choices) if h.choices else None), (name, key)


def _builtin_names() -> set[str]:
    """The names the package's own REGISTRY declares (not plug-ins, not models a test registered)."""
    import importlib

    return {
        getattr(importlib.import_module(f"flowbench.models.{ref.split(':')[0]}"), ref.split(":")[1]).name
        for ref in models.REGISTRY
    }


@pytest.mark.parametrize("page", ["README.md", "docs/manual/data.md"])
def test_the_datasets_tables_have_a_row_per_builtin_dataset_with_its_dimension_and_sizes(page):
    import re
    from pathlib import Path

    from flowbench.data import _MODULES, DATASETS

    text = (Path(__file__).resolve().parents[1] / page).read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        name = re.fullmatch(r"`([\w-]+)`", cells[0]) if len(cells) >= 5 else None
        if name and name.group(1) in DATASETS:
            rows[name.group(1)] = [int(c.replace(",", "")) for c in cells[1:5]]
    assert set(rows) == set(_MODULES), "a row per built-in dataset: add the new dataset's row (docs/extending.md)"
    for name, (dim, *sizes) in rows.items():
        spec = DATASETS[name]
        assert (dim, tuple(sizes)) == (spec.dim, tuple(spec.sizes)), name
