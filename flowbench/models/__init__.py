"""The model zoo: an explicit registry of every density model flowbench can train.

``build_model(name, dim, **hparams)`` is the only constructor the rest of flowbench uses. Adding a model
means one new file exposing ``<NAME>_HPARAMS`` (defaults) and ``build_<name>(dim, **hparams) -> Flow``, plus
one line in :data:`MODELS`; the generic contract tests (tests/test_models_contract.py) pick it up.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from flowbench.errors import ConfigError
from flowbench.models.base import CompositeTransform, Flow, StandardNormal, Transform, check_input
from flowbench.models.gaussian import GAUSSIAN_HPARAMS, build_gaussian
from flowbench.models.made import MADE_HPARAMS, MADE_MOG_HPARAMS, build_made, build_made_mog
from flowbench.models.maf import MAF_HPARAMS, MAF_MOG_HPARAMS, build_maf, build_maf_mog
from flowbench.models.realnvp import REALNVP_HPARAMS, build_realnvp

from flowbench.models.relgrad import RELGRAD_HPARAMS, build_relgrad

__all__ = [
    "MODELS",
    "ModelInfo",
    "build_model",
    "model_hparams",
    "resolve_hparams",
    "display_name",
    "Flow",
    "Transform",
    "CompositeTransform",
    "StandardNormal",
    "check_input",
]


@dataclass(frozen=True)
class ModelInfo:
    """One registry entry: builder, accepted hyperparameters with defaults, table label, paper."""

    build: Callable[..., Flow]
    hparams: Mapping[str, Any]
    label: str  # str.format template over the resolved hyperparameters
    paper: str
    choices: Mapping[str, tuple] = field(default_factory=dict)


_ACT = {"activation": ("relu", "tanh")}
_MAF = "Papamakarios et al. 2017, Masked Autoregressive Flow for Density Estimation"

MODELS: dict[str, ModelInfo] = {
    "gaussian": ModelInfo(build_gaussian, GAUSSIAN_HPARAMS, "Gaussian", _MAF),
    "made": ModelInfo(build_made, MADE_HPARAMS, "MADE", "Germain et al. 2015, MADE", _ACT),
    "made-mog": ModelInfo(build_made_mog, MADE_MOG_HPARAMS, "MADE MoG", _MAF, _ACT),
    "realnvp": ModelInfo(build_realnvp, REALNVP_HPARAMS, "Real NVP ({layers})", "Dinh et al. 2017, Real NVP"),
    "maf": ModelInfo(build_maf, MAF_HPARAMS, "MAF ({layers})", _MAF, _ACT),
    "maf-mog": ModelInfo(build_maf_mog, MAF_MOG_HPARAMS, "MAF MoG ({layers})", _MAF, _ACT),
    "relgrad": ModelInfo(
        build_relgrad,
        RELGRAD_HPARAMS,
        "Relgrad dense flow",
        "Gresele et al. 2020, Relative gradient optimization of the Jacobian term in unsupervised deep learning",
    ),
}


def _info(name: str) -> ModelInfo:
    if name in MODELS:
        return MODELS[name]
    raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def model_hparams(name: str) -> dict:
    """The hyperparameters ``name`` accepts, with their defaults (a fresh dict)."""
    return dict(_info(name).hparams)


def _check_value(name: str, key: str, value: Any, default: Any, choices: tuple | None) -> Any:
    bad = ConfigError(f"model {name!r}: {key}={value!r} has the wrong type; expected {type(default).__name__}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
    elif isinstance(default, numbers.Integral):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise bad
        value = int(value)
    elif isinstance(default, numbers.Real):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad
        value = float(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise bad
    if choices is not None and value not in choices:
        raise ConfigError(f"model {name!r}: {key}={value!r} is not allowed; choose one of {list(choices)}")
    return value


def resolve_hparams(name: str, **hparams: Any) -> dict:
    """Defaults overridden by ``hparams`` (``None`` means "use the default"), type- and choice-checked."""
    info = _info(name)
    unknown = sorted(set(hparams) - set(info.hparams))
    if unknown:
        accepted = ", ".join(info.hparams) or "none"
        raise ConfigError(f"model {name!r} does not accept hyperparameter(s) {unknown}; it accepts: {accepted}")
    out = dict(info.hparams)
    for key, value in hparams.items():
        if value is not None:
            out[key] = _check_value(name, key, value, info.hparams[key], info.choices.get(key))
    return out


def build_model(name: str, dim: int, **hparams: Any) -> Flow:
    """Build a fresh model ``name`` for ``dim``-dimensional data (float32, CPU; move it with ``.to()``)."""
    info = _info(name)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ConfigError(f"dim must be a positive integer; got {dim!r}")
    return info.build(int(dim), **resolve_hparams(name, **hparams))


def display_name(name: str, **hparams: Any) -> str:
    """The row label used in the published tables, e.g. ``MAF (5)``, ``Real NVP (10)``, ``MADE MoG``."""
    return _info(name).label.format(**resolve_hparams(name, **hparams))
