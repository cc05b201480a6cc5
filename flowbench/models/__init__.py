"""The model zoo: the registry of every density model flowbench can train, one line per model.

Each family module ends with its :class:`~flowbench.models.spec.ModelSpec` (hyperparameters, label, paper,
default learning rate, matching knob, parameter count); the registry below lists the specs, in the order of
the table's rows. Adding a model = one new module with a spec + one line here; ``flowbench run`` flags,
config files, sweep grids, ``--match-params``, the table and the contract tests then know it.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import re
from typing import Any, Mapping

from flowbench.errors import ConfigError
from flowbench.models import adapters
from flowbench.models.base import CompositeTransform, ConditionalFlow, Flow, StandardNormal, Transform, check_input
from flowbench.models.spec import HParam, ModelSpec
from flowbench.plugins import Origin, Registry

__all__ = [
    "MODELS",
    "ModelSpec",
    "HParam",
    "get_spec",
    "model_origin",
    "build_model",
    "model_hparams",
    "resolve_hparams",
    "display_name",
    "Flow",
    "ConditionalFlow",
    "check_classes",
    "Transform",
    "CompositeTransform",
    "StandardNormal",
    "check_input",
]

#: The registry: ``module:SPEC`` in ``flowbench.models``, one line per model, in the order of the table's rows.
#: Each class-conditional model (``<name>-cond``, MAF paper Table 2) follows its unconditional one.
REGISTRY = (
    "gaussian:GAUSSIAN_SPEC",
    "gaussian:GAUSSIAN_COND_SPEC",
    "made:MADE_SPEC",
    "made:MADE_COND_SPEC",
    "made:MADE_MOG_SPEC",
    "made:MADE_MOG_COND_SPEC",
    "realnvp:REALNVP_SPEC",
    "realnvp:REALNVP_COND_SPEC",
    "maf:MAF_SPEC",
    "maf:MAF_COND_SPEC",
    "maf:MAF_MOG_SPEC",
    "maf:MAF_MOG_COND_SPEC",
    "relgrad:RELGRAD_SPEC",
    "nsf:NSF_AR_SPEC",
    "nsf:NSF_C_SPEC",
)


def _load(entry: str) -> ModelSpec:
    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(f"flowbench.models.{module}"), attr)


#: A spec's name is a folder of ``results/runs/<dataset>/``: lower-case letters, digits and ``- _ .``.
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def _check_spec(spec: ModelSpec, where: str) -> ModelSpec:
    """A spec from outside the package, checked before anything trains it (ConfigError says what is wrong)."""
    bad = f"the model spec at {where!r} is not valid"
    if not isinstance(spec.name, str) or not _NAME.fullmatch(spec.name):
        raise ConfigError(
            f"{bad}: name {spec.name!r} must be lower-case letters, digits and - _ . (it names the records' folder)"
        )
    if not callable(spec.build):
        raise ConfigError(f"{bad}: build must be a function build(dim, **hparams) -> Flow")
    if not isinstance(spec.hparams, Mapping) or not all(
        isinstance(k, str) and k.isidentifier() and isinstance(h, HParam) for k, h in spec.hparams.items()
    ):
        raise ConfigError(f"{bad}: hparams must map identifier names to HParam(default, help)")
    if isinstance(spec.lr, bool) or not isinstance(spec.lr, numbers.Real) or not (0 < spec.lr < float("inf")):
        raise ConfigError(f"{bad}: lr must be a positive number (the default Adam learning rate); got {spec.lr!r}")
    if not isinstance(spec.label, str) or not isinstance(spec.paper, str):
        raise ConfigError(f"{bad}: label and paper must be text")
    try:
        spec.label.format(**{k: h.default for k, h in spec.hparams.items()})
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"{bad}: label {spec.label!r} must be a str.format template over its hyperparameters ({e})"
        ) from None
    return spec


def _coerce(obj: Any, ref: str) -> ModelSpec:
    """A loaded object as a ModelSpec: a spec, a zuko/nflows flow or flow factory, or a function returning a spec."""
    if isinstance(obj, ModelSpec):
        return _check_spec(obj, ref)
    spec = adapters.spec_for(obj, ref)
    if spec is not None:
        return _check_spec(spec, ref)
    if callable(obj) and not isinstance(obj, type):
        try:
            required = [
                p
                for p in inspect.signature(obj).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            required = []
        if not required:
            try:
                made = obj()
            except Exception as e:
                raise ConfigError(f"model {ref!r}: calling it to get its spec failed: {type(e).__name__}: {e}") from e
            if isinstance(made, ModelSpec):
                return _check_spec(made, ref)
            raise ConfigError(
                f"model {ref!r}: the function returned a {type(made).__name__}, not a ModelSpec; "
                "return flowbench.models.ModelSpec(...)"
            )
    raise ConfigError(
        f"model {ref!r} is a {type(obj).__name__}, not a model: point at a flowbench.models.ModelSpec, "
        "a function returning one, a zuko or nflows flow class, or a function that builds a flow from "
        "its first argument `features` (see the tutorial in docs/)"
    )


#: name → spec: the built-ins in registry order, then installed plugins (entry-point group ``flowbench.models``).
MODELS = Registry("model", "flowbench.models", {spec.name: spec for spec in map(_load, REGISTRY)}, _coerce)


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model, a plugin's, or a reference ``module:ATTR`` / ``file.py:ATTR``.

    Raises ConfigError for an unknown name (listing the registered ones) and for every bad reference.
    """
    return MODELS.resolve(name)[0]


def model_origin(name: str) -> Origin:
    """Where the spec of ``name`` (name or reference) comes from: built-in, plugin, module or file."""
    return MODELS.resolve(name)[1]


def model_hparams(name: str) -> dict[str, Any]:
    """The hyperparameters ``name`` accepts, with their defaults (a fresh dict)."""
    return get_spec(name).defaults()


def resolve_hparams(name: str, **hparams: Any) -> dict[str, Any]:
    """Defaults overridden by ``hparams`` (``None`` means "use the default"), type-, choice- and bound-checked."""
    return get_spec(name).resolve(hparams)


def check_classes(spec: ModelSpec, classes: Any) -> int:
    """The number of classes K a model of ``spec`` is built for: ≥ 2 for a class-conditional model, 0 otherwise
    (ConfigError where the model and the labels do not go together)."""
    if isinstance(classes, bool) or not isinstance(classes, numbers.Integral) or classes < 0:
        raise ConfigError(f"classes must be a non-negative integer; got {classes!r}")
    if spec.conditional and classes < 2:
        raise ConfigError(
            f"model {spec.name} is class-conditional: it needs a dataset with labels (mnist, cifar10, "
            f"digits)" + (f"; got {classes} class" if classes else "")
        )
    if not spec.conditional and classes:
        # refused rather than ignored: the rows of a conditional model carry K label columns, an unconditional
        # model's do not, so a caller passing classes has the wrong model or the wrong rows
        raise ConfigError(
            f"model {spec.name} is not class-conditional; to condition on the labels use {spec.name}-cond"
            if f"{spec.name}-cond" in MODELS
            else f"model {spec.name} is not class-conditional: build it without classes"
        )
    return int(classes)


def build_model(name: str, dim: int, *, classes: int = 0, **hparams: Any) -> Flow:
    """Build a fresh model ``name`` for ``dim``-dimensional data (float32, CPU; move it with ``.to()``).

    A class-conditional model (``spec.conditional``, e.g. ``maf-cond``) needs ``classes`` = K ≥ 2; it takes rows
    ``[x, onehot(y)]`` of width ``dim + K`` (:class:`ConditionalFlow`). Other models refuse ``classes``.
    """
    spec = get_spec(name)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ConfigError(f"dim must be a positive integer; got {dim!r}")
    k = check_classes(spec, classes)
    if spec.conditional:
        return spec.build(int(dim), classes=k, **spec.resolve(hparams))
    return spec.build(int(dim), **spec.resolve(hparams))


def display_name(name: str, **hparams: Any) -> str:
    """The row label used in the published tables, e.g. ``MAF (5)``, ``Real NVP (10)``, ``MADE MoG``."""
    return get_spec(name).display_name(hparams)
