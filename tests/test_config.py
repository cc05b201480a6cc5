"""Run options: defaults < config file < explicit flags; bad keys and values are errors that name them."""

from __future__ import annotations

import pytest

from flowbench.config import CONFIG_DIR, OPTIONS, load_config, resolve_options
from flowbench.errors import ConfigError


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_precedence_defaults_file_flags(tmp_path):
    cfg = write(tmp_path, 'dataset = "power"\nmodel = "maf"\nmax-epochs = 7\nhidden_layers = 2\npatience = 5\n')
    opts = resolve_options({"config": str(cfg), "patience": 9})
    assert opts.max_epochs == 7 and opts.hparams["hidden_layers"] == 2  # file over defaults, underscores accepted
    assert opts.patience == 9  # flag over file
    assert opts.batch_size == OPTIONS["batch_size"].default == 100  # default
    assert opts.lr == 1e-4  # flows: MAF protocol default
    assert opts.config == str(cfg)
    assert resolve_options({"config": str(cfg), "lr": 0.5}).lr == 0.5


def test_per_model_lr_and_bundled_default(tmp_path):
    assert resolve_options({"model": "made", "dataset": "nowhere"}).lr == 1e-3
    assert resolve_options({"model": "made-mog", "dataset": "nowhere"}).lr == 1e-3
    assert resolve_options({"model": "realnvp", "dataset": "nowhere"}).lr == 1e-4
    # no arguments: relgrad on digits with its bundled config
    opts = resolve_options({})
    assert (opts.dataset, opts.model) == ("digits", "relgrad")
    assert opts.config.endswith("configs/digits/relgrad.toml")
    assert opts.max_epochs is not None and opts.lr == load_config(opts.config)["lr"]


def test_unknown_key_is_named(tmp_path):
    cfg = write(tmp_path, "max-epoch = 3\n")
    with pytest.raises(ConfigError, match="'max-epoch'"):
        resolve_options({"config": str(cfg)})
    with pytest.raises(ConfigError, match="unknown option 'epochs'"):
        resolve_options({"epochs": 3})


@pytest.mark.parametrize(
    "text, match",
    [
        ('lr = "fast"\n', "'lr'.*must be float"),
        ("seed = true\n", "'seed'.*must be int"),
        ("patience = 0\n", "positive"),
        ("[train]\nlr = 1\n", "tables"),
        ("lr = = 1\n", "not valid TOML"),
        ("max-epochs = 3\nmax_epochs = 4\n", "twice"),
    ],
)
def test_bad_values(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        resolve_options({"config": str(write(tmp_path, text))})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_options({"config": str(tmp_path / "nope.toml")})


def test_hparams_only_set_and_accepted():
    opts = resolve_options({"model": "relgrad", "dataset": "nowhere", "layers": 3, "alpha": None})
    assert opts.hparams == {"layers": 3}  # unset options are not passed
    with pytest.raises(ConfigError, match="--hidden does not apply to model 'relgrad'"):
        resolve_options({"model": "relgrad", "dataset": "nowhere", "layers": 3, "hidden": 10})


def test_bundled_configs_are_valid():
    """Every file under configs/<dataset>/ parses and sets only hyperparameters its model accepts."""
    models = pytest.importorskip("flowbench.models")
    files = sorted(p for p in CONFIG_DIR.glob("*/*.toml") if p.parent.name != "sweeps")
    assert len(files) >= 7 * 7
    for path in files:
        opts = resolve_options({"config": str(path)})
        assert opts.dataset == path.parent.name and opts.model == path.stem, path
        if opts.model in models.MODELS:
            models.resolve_hparams(opts.model, **opts.hparams)  # types and choices checked by the registry
    # the paper's settings for a few cells
    gas = resolve_options({"dataset": "gas", "model": "maf"})
    hp = gas.hparams
    assert (hp["hidden"], hp["activation"], gas.lr, hp["layers"]) == (100, "tanh", 1e-4, 5)
    hep = resolve_options({"dataset": "hepmass", "model": "made"})
    assert (hep.hparams["hidden"], hep.hparams["activation"], hep.lr) == (512, "relu", 1e-3)
    assert resolve_options({"dataset": "mnist", "model": "maf"}).hparams["hidden_layers"] == 2
    rg = resolve_options({"dataset": "bsds300", "model": "relgrad"})
    assert (rg.hparams["base"], rg.hparams["bias"]) == ("hyperbolic-secant", False)


def _provenance(path):
    from flowbench.config import tomllib  # tomli on Python 3.10

    with open(path, "rb") as f:
        return tomllib.load(f).get("provenance")


def test_every_bundled_config_states_its_provenance():
    """Issue 16: each config says whether its values are the paper's (verified, with a source) or ours."""
    files = sorted(p for p in CONFIG_DIR.glob("*/*.toml") if p.parent.name != "sweeps")
    for path in files:
        prov = _provenance(path)
        assert prov is not None and set(prov) == {"verified", "source"}, path
        assert "provenance" not in load_config(path)  # not a run option
    # The relgrad paper's table 4 is not legible in our copy: no relgrad config can claim to be the paper's.
    for path in CONFIG_DIR.glob("*/relgrad.toml"):
        prov = _provenance(path)
        assert prov["verified"] is False, path
        assert "unverified" in prov["source"] or path.parent.name == "digits", path
    assert _provenance(CONFIG_DIR / "gas" / "maf.toml")["verified"] is True
    assert _provenance(CONFIG_DIR / "digits" / "maf.toml")["verified"] is False  # digits is not in the papers


def test_tabular_relgrad_configs_carry_powers_budget_and_let_the_decay_end_the_run():
    """Issue 24: the tabular relgrad files carry POWER's chosen setting over with the same optimiser steps, and
    patience covers the whole budget, as on POWER (patience 30 = its 30 epochs): early stopping must not end a
    cosine-decayed run while its rate is still high, where the study saw single epochs fall by 1-3 nats."""
    import math

    from flowbench.data import get_info

    power = resolve_options({"dataset": "power", "model": "relgrad"})
    assert power.lr_schedule == "cosine" and power.max_steps is not None
    for ds in ("power", "gas", "hepmass", "miniboone", "bsds300"):
        opts = resolve_options({"dataset": ds, "model": "relgrad"})
        assert (opts.lr, opts.lr_schedule, opts.max_steps, opts.batch_size) == (
            power.lr,
            power.lr_schedule,
            power.max_steps,
            power.batch_size,
        ), ds
        assert opts.hparams["layers"] == power.hparams["layers"], ds
        steps_per_epoch = math.ceil(get_info(ds).sizes[0] / opts.batch_size)
        budget_epochs = math.ceil(opts.max_steps / steps_per_epoch)
        assert opts.patience >= budget_epochs, (ds, opts.patience, budget_epochs)


def test_no_bundled_config_lets_patience_cut_its_cosine_decay():
    """Every bundled config with a cosine schedule has a patience that covers its budget (flowbench run would
    warn otherwise: lifecycle.patience_within_decay)."""
    from flowbench.config import tomllib
    from flowbench.data import get_info
    from flowbench.training.lifecycle import patience_within_decay

    checked = 0
    for path in sorted(p for p in CONFIG_DIR.glob("*/*.toml") if p.parent.name != "sweeps"):
        with open(path, "rb") as f:
            if tomllib.load(f).get("lr-schedule") != "cosine":
                continue
        opts = resolve_options({"config": str(path)})
        assert patience_within_decay(opts, get_info(opts.dataset).sizes[0]) is None, path
        checked += 1
    assert checked == 17  # the 12 NSF configs (6 datasets x nsf-ar/nsf-c) and the 5 tabular relgrad ones


@pytest.mark.parametrize(
    "table",
    [
        'verified = "yes"\nsource = "x"\n',
        "verified = true\n",
        'verified = true\nsource = ""\n',
        'verified = false\nsource = "x"\nlr = 1\n',
    ],
)
def test_bad_provenance_tables_are_config_errors(tmp_path, table):
    with pytest.raises(ConfigError, match=r"\[provenance\]"):
        resolve_options({"config": str(write(tmp_path, 'model = "maf"\n\n[provenance]\n' + table))})


def test_provenance_table_is_accepted_and_ignored_as_options(tmp_path):
    cfg = write(tmp_path, 'model = "maf"\nlr = 0.5\n\n[provenance]\nverified = false\nsource = "ours"\n')
    opts = resolve_options({"config": str(cfg)})
    assert opts.lr == 0.5 and opts.provenance == {"verified": False, "source": "ours"}
    assert "provenance" not in opts.to_dict()  # not a run option


# -- options declared once (issue 23, item 2) ------------------------------------------------------------------
def test_every_run_option_default_is_its_declaration():
    import dataclasses

    from flowbench.config import RunOptions

    fields = {f.name: f for f in dataclasses.fields(RunOptions)}
    assert [n for n in fields if n in OPTIONS] == list(OPTIONS)  # every declared option is a field, in order
    extra = set(fields) - set(OPTIONS)
    assert extra == {"hparams", "provenance", "model_ref", "dataset_ref"}  # not general options
    for name, opt in OPTIONS.items():
        assert fields[name].default == opt.default, name  # lr included: None there and here
    # lr left None is the model's, as resolve_options sets it (was a fixed 1e-3, wrong for the flows)
    assert RunOptions().lr == resolve_options({"dataset": "nowhere"}).lr == 1e-3
    assert RunOptions(model="maf").lr == resolve_options({"model": "maf", "dataset": "nowhere"}).lr == 1e-4
    assert RunOptions(model="maf", lr=0.5).lr == 0.5


@pytest.mark.parametrize(
    ("key", "bad", "allowed"),
    [
        ("lr_schedule", "linear", "constant, cosine"),
        ("protocol", "nfs", "maf, nsf"),
    ],
)
def test_declared_choices_are_checked_wherever_the_value_comes_from(tmp_path, key, bad, allowed):
    assert OPTIONS[key].choices == tuple(allowed.split(", "))
    flag = key.replace("_", "-")
    with pytest.raises(ConfigError, match=f"--{flag} must be one of {allowed}; got '{bad}'"):
        resolve_options({key: bad, "dataset": "nowhere"})
    with pytest.raises(ConfigError, match=f"option '{flag}' in config file .*c.toml must be one of {allowed}"):
        resolve_options({"config": str(write(tmp_path, f'{flag} = "{bad}"\n'))})
    with pytest.raises(ConfigError, match=f"must be one of {allowed}"):
        resolve_options({"dataset": "nowhere"}).replace(**{key: bad})
    for good in allowed.split(", "):
        extra = {"max_steps": 10} if good == "cosine" else {}
        assert getattr(resolve_options({key: good, "dataset": "nowhere", **extra}), key) == good


def test_protocol_and_stacking_tables_come_from_the_declarations():
    from flowbench.config import MAF_PROTOCOL, NO_PROTOCOL_VALUE
    from flowbench.training.stacked import UNSTACKABLE

    assert MAF_PROTOCOL == {
        "batch_size": 100,
        "patience": 30,
        "weight_decay": 1e-6,
        "max_epochs": None,
        "max_steps": None,
        "lr_schedule": "constant",
        "grad_clip": None,
        "eval_every": None,
    }
    assert MAF_PROTOCOL == {n: o.maf for n, o in OPTIONS.items() if o.maf is not NO_PROTOCOL_VALUE}
    # the step-budget options (NSF protocol) stack since one loop serves single runs and stacks
    assert UNSTACKABLE == {"adam_epoch_step": False, "tensorboard": None}
    assert UNSTACKABLE == {n: o.default for n, o in OPTIONS.items() if not o.stackable}
