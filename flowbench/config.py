"""Run options for ``flowbench run``: defaults, TOML config files, and their merge with explicit flags.

Precedence (lowest first): built-in defaults < the config file < explicit command-line flags. The config
file is ``--config FILE`` or, when none is given, ``configs/<dataset>/<model>.toml`` if it exists (the
paper's settings for that pair; MAF paper section 4 and Gresele et al. 2020, appendix H). Config keys are the
``flowbench run`` flag names (``max-epochs``; ``max_epochs`` is accepted too); an unknown key is an error
that names it, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from flowbench.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "CONFIG_DIR",
    "DEFAULTS",
    "MODEL_OPTIONS",
    "default_lr",
    "default_config_path",
    "load_config",
    "resolve_options",
    "model_hparams_from_options",
]

#: The repository's ``configs/`` folder (the package is installed in editable mode from the checkout).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

#: Every run option (argparse dest) with its default. ``None`` means "not set": per-model defaults apply.
DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "model": "relgrad",
    "config": None,
    "seed": 0,
    "device": "auto",
    "max_epochs": None,  # the MAF protocol has no cap: patience alone stops training
    "patience": 30,
    "lr": None,  # per model, see default_lr
    "batch_size": 100,
    "hidden": None,
    "hidden_layers": None,
    "layers": None,
    "activation": None,
    "components": None,
    "batch_norm": None,
    "alpha": None,
    "base": None,
    "bias": None,
    "bias_logdet": None,
    "match_params": None,
    "weight_decay": 1e-6,  # MAF: L2 penalty (1e-6/2)·Σ‖w‖², i.e. gradient 1e-6·w
    "out": "results",
    "resume": False,
    "force": False,
    "tag": None,
    "data_root": None,
    "eval_batch_size": 2000,
    "compile": False,
}

#: Run options that are model hyperparameters (passed to ``build_model`` under the same name, only when set).
MODEL_OPTIONS: tuple[str, ...] = (
    "hidden",
    "hidden_layers",
    "layers",
    "activation",
    "components",
    "batch_norm",
    "alpha",
    "base",
    "bias",
    "bias_logdet",
)

# Expected value types, so a config file with ``lr = "fast"`` fails here and not deep inside Adam.
_TYPES: dict[str, tuple[type, ...]] = {
    "dataset": (str,),
    "model": (str,),
    "config": (str,),
    "seed": (int,),
    "device": (str,),
    "max_epochs": (int,),
    "patience": (int,),
    "lr": (float, int),
    "batch_size": (int,),
    "hidden": (int,),
    "hidden_layers": (int,),
    "layers": (int,),
    "activation": (str,),
    "components": (int,),
    "batch_norm": (bool,),
    "alpha": (float, int),
    "base": (str,),
    "bias": (bool,),
    "bias_logdet": (bool,),
    "match_params": (int, str),
    "weight_decay": (float, int),
    "out": (str,),
    "resume": (bool,),
    "force": (bool,),
    "tag": (str,),
    "data_root": (str,),
    "eval_batch_size": (int,),
    "compile": (bool,),
}

_POSITIVE = ("max_epochs", "patience", "batch_size", "hidden", "hidden_layers", "layers", "components", "eval_batch_size")

# MAF paper section 4: 1e-3 for MADE / MADE MoG, 1e-4 for the flows. relgrad: 1e-3, the reference code's
# default (fissoreg/relative-gradient-jacobian, experiments/args.py); the paper's per-dataset table 4 values
# are not legible in our copy of the paper (unverified), so the per-dataset configs state theirs explicitly.
_LR = {"made": 1e-3, "made-mog": 1e-3, "relgrad": 1e-3}
_FLOW_LR = 1e-4


def default_lr(model: str) -> float:
    """The MAF-protocol learning rate for ``model``."""
    return _LR.get(model, _FLOW_LR)


def _key(raw: str, source: str) -> str:
    """Map a flag-style key (``max-epochs``) or its underscore synonym to the option name."""
    key = raw.strip().lstrip("-").replace("-", "_")
    if key not in DEFAULTS:
        known = ", ".join(k.replace("_", "-") for k in DEFAULTS)
        raise ConfigError(f"unknown option {raw!r} in {source}; valid keys (the `flowbench run` flags): {known}")
    return key


def _check_value(key: str, value: Any, source: str) -> Any:
    types = _TYPES[key]
    if isinstance(value, bool) and bool not in types:  # bool is an int subclass: `seed = true` is a mistake
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        want = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"option {key.replace('_', '-')!r} in {source} must be {want}; got {value!r}")
    if key in ("lr", "alpha", "weight_decay") and isinstance(value, int):
        value = float(value)
    if key in _POSITIVE and value <= 0:
        raise ConfigError(f"option {key.replace('_', '-')!r} in {source} must be positive; got {value!r}")
    if key == "lr" and value <= 0:
        raise ConfigError(f"option 'lr' in {source} must be positive; got {value!r}")
    if key == "weight_decay" and value < 0:
        raise ConfigError(f"option 'weight-decay' in {source} must be >= 0; got {value!r}")
    return value


def normalize(options: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate keys and value types of a partial option dict; returns it with underscore keys."""
    out: dict[str, Any] = {}
    for raw, value in options.items():
        key = _key(raw, source)
        if key in out:
            raise ConfigError(f"option {key.replace('_', '-')!r} is given twice in {source}")
        out[key] = _check_value(key, value, source) if value is not None else None
    return out


def read_toml(path: str | Path, kind: str, hint: str) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a ConfigError naming it (``hint`` says what to do)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} {str(path)!r} does not exist; {hint}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{kind} {str(path)!r} is not valid TOML: {e}") from e


def _check_provenance(table: Any, path: str | Path) -> None:
    """A ``[provenance]`` table: ``verified`` (bool, true only if every value is the paper's) and ``source``."""
    where = f"config file {str(path)!r}, [provenance]"
    if not isinstance(table, dict) or set(table) != {"verified", "source"}:
        raise ConfigError(f"{where} must have exactly the keys verified (true/false) and source (text)")
    if not isinstance(table["verified"], bool) or not isinstance(table["source"], str) or not table["source"]:
        raise ConfigError(f"{where}: verified must be true or false and source a non-empty string")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file (flat table; keys = run flag names) into validated options.

    An optional ``[provenance]`` table (where the values come from) is validated and left out of the options.
    """
    raw = read_toml(path, "config file", "pass an existing TOML file to --config")
    if "provenance" in raw:
        _check_provenance(raw.pop("provenance"), path)
    nested = [k for k, v in raw.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"config file {str(path)!r} has tables {nested}; use flat keys named like the run flags")
    return normalize(raw, f"config file {path}")


def default_config_path(dataset: str, model: str) -> Path | None:
    """``configs/<dataset>/<model>.toml`` when it exists, else None."""
    path = CONFIG_DIR / dataset / f"{model}.toml"
    return path if path.is_file() else None


def resolve_options(cli: dict[str, Any], config_path: str | Path | None = None) -> dict[str, Any]:
    """Merge defaults < config file < explicit options (``cli``: only the flags the user gave, non-None).

    The config file is ``config_path``, else ``cli['config']``, else the bundled
    ``configs/<dataset>/<model>.toml`` for the dataset and model chosen by the flags (or defaults). The
    resolved ``config`` option records the file actually used. ``lr`` left unset gets the model's default.
    """
    explicit = normalize({k: v for k, v in cli.items() if v is not None}, "the command line")
    path = config_path if config_path is not None else explicit.get("config")
    file_opts: dict[str, Any] = {}
    if path is not None:
        file_opts = load_config(path)
        file_opts.pop("config", None)
    else:
        dataset = explicit.get("dataset", DEFAULTS["dataset"])
        model = explicit.get("model", DEFAULTS["model"])
        found = default_config_path(dataset, model)
        if found is not None:
            file_opts = load_config(found)
            file_opts.pop("config", None)
            path = found
            # A bundled config is for exactly this dataset/model pair; it must not switch either.
            for k in ("dataset", "model"):
                if k in file_opts and file_opts[k] != (dataset if k == "dataset" else model):
                    raise ConfigError(f"bundled config {found} sets {k} = {file_opts[k]!r}; fix the file")
    options = dict(DEFAULTS)
    options.update({k: v for k, v in file_opts.items() if v is not None})
    options.update(explicit)
    options["config"] = str(path) if path is not None else None
    if options["lr"] is None:
        options["lr"] = default_lr(options["model"])
    options["match_params"] = parse_match_params(options["match_params"])
    return options


def parse_match_params(value: int | str | None) -> int | str | None:
    """``--match-params`` is a parameter count (``5000``) or a model name (``maf``)."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    return text


def model_hparams_from_options(options: dict[str, Any], accepted: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``build_model`` keyword arguments for the model options that are set.

    ``accepted`` is ``flowbench.models.model_hparams(model)`` (looked up when not given). An option that was
    set but that the model does not take is an error rather than being silently ignored.
    """
    model = options["model"]
    if accepted is None:
        from flowbench.models import model_hparams

        accepted = model_hparams(model)
    hparams: dict[str, Any] = {}
    for key in MODEL_OPTIONS:
        value = options.get(key)
        if value is None:
            continue
        if key not in accepted:
            takes = ", ".join("--" + k.replace("_", "-") for k in accepted) or "no hyperparameters"
            raise ConfigError(
                f"--{key.replace('_', '-')} does not apply to model {model!r} (it takes {takes}); "
                "remove it from the command line or the config file"
            )
        hparams[key] = value
    return hparams
