"""The model zoo: the registry of every density model flowbench can train, one line per model.

Each family module ends with its :class:`~flowbench.models.spec.ModelSpec` (hyperparameters, label, paper,
default learning rate, matching knob, parameter count); the registry below lists the specs, in the order of
the table's rows. Adding a model = one new module with a spec + one line here; ``flowbench run`` flags,
config files, sweep grids, ``--match-params``, the table and the contract tests then know it.
"""

from __future__ import annotations

import importlib
import numbers
from typing import Any

from flowbench.errors import ConfigError
from flowbench.models.base import CompositeTransform, Flow, StandardNormal, Transform, check_input
from flowbench.models.spec import HParam, ModelSpec

__all__ = [
    "MODELS",
    "ModelSpec",
    "HParam",
    "get_spec",
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

#: The registry: ``module:SPEC`` in ``flowbench.models``, one line per model, in the order of the table's rows.
REGISTRY = (
    "gaussian:GAUSSIAN_SPEC",
    "made:MADE_SPEC",
    "made:MADE_MOG_SPEC",
    "realnvp:REALNVP_SPEC",
    "maf:MAF_SPEC",
    "maf:MAF_MOG_SPEC",
    "relgrad:RELGRAD_SPEC",
    "nsf:NSF_AR_SPEC",
    "nsf:NSF_C_SPEC",
)


def _load(entry: str) -> ModelSpec:
    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(f"flowbench.models.{module}"), attr)


#: name → spec, in registry order.
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in map(_load, REGISTRY)}


def get_spec(name: str) -> ModelSpec:
    """The spec of model ``name``, or a ConfigError listing the registered names."""
    if name in MODELS:
        return MODELS[name]
    raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def model_hparams(name: str) -> dict[str, Any]:
    """The hyperparameters ``name`` accepts, with their defaults (a fresh dict)."""
    return get_spec(name).defaults()


def resolve_hparams(name: str, **hparams: Any) -> dict[str, Any]:
    """Defaults overridden by ``hparams`` (``None`` means "use the default"), type-, choice- and bound-checked."""
    return get_spec(name).resolve(hparams)


def build_model(name: str, dim: int, **hparams: Any) -> Flow:
    """Build a fresh model ``name`` for ``dim``-dimensional data (float32, CPU; move it with ``.to()``)."""
    spec = get_spec(name)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ConfigError(f"dim must be a positive integer; got {dim!r}")
    return spec.build(int(dim), **spec.resolve(hparams))


def display_name(name: str, **hparams: Any) -> str:
    """The row label used in the published tables, e.g. ``MAF (5)``, ``Real NVP (10)``, ``MADE MoG``."""
    return get_spec(name).display_name(hparams)
