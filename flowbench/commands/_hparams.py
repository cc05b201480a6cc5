"""Model hyperparameters as command-line flags, one spelling for every command that builds a model (``run``,
``bench train``, ``sanity toy2d``): ``--hidden 100 --hidden-layers 2``, generated from the model specs'
declarations (:func:`flowbench.config.hparam_declarations`), a plugged-in model's included."""

from __future__ import annotations

import argparse
from typing import Any

from flowbench.errors import ConfigError

_BOOL = argparse.BooleanOptionalAction


def _hparam_help(models: dict) -> str:
    """One help text for a hyperparameter shared by several models: who takes it, what it means, its values."""
    parts: dict[str, list[str]] = {}
    for name, hp in models.items():
        text = hp.help
        if hp.choices:
            text += f": {hp.choices_text()}"
        text += f" (default {hp.default})"
        parts.setdefault(text, []).append(name)
    return "; ".join(f"{', '.join(names)}: {text}" for text, names in parts.items())


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``--flag V`` or ``--flag=V`` in ``argv`` (the last one wins, as argparse does)."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def resolve_model_flag(argv: list[str]) -> None:
    """Resolve a plugged-in model named by ``--model REF`` before the parser is built, so that its
    hyperparameters become flags like a built-in's (a bad reference is a ConfigError here)."""
    from flowbench.config import resolve_references  # lazy: see hparam_declarations

    model = flag_value(argv, "--model")
    if model is not None and ":" in model:
        resolve_references({"model": model})


def add_hparam_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per hyperparameter any registered model takes, default None (unset: the config's or the spec's
    default applies); the model's spec checks and converts the values."""
    m = parser.add_argument_group("model hyperparameters (only those the model takes; see its spec)")
    taken, shadowed = set(parser._option_string_actions), []
    for key, decl in hparam_declarations().items():
        flag = "--" + key.replace("_", "-")
        if flag in taken or "--no-" + flag[2:] in taken:
            shadowed.append(key)  # a plugged-in model's knob named like the command's own option: the option wins
            continue
        kind = decl["type"]
        if kind not in (bool, int, float):
            kind = str  # lists, untyped or per-model types: the model's spec parses the text
        if kind is bool:
            m.add_argument(flag, action=_BOOL, default=None, help=_hparam_help(decl["models"]))
        else:
            m.add_argument(flag, type=kind, metavar=key.upper(), default=None, help=_hparam_help(decl["models"]))
    parser.set_defaults(_shadowed_hparams=tuple(shadowed))


def hparams_from_args(args: argparse.Namespace, model: str | None = None) -> dict[str, Any]:
    """The hyperparameters given on the command line (the flags :func:`add_hparam_flags` made, unset ones left
    out). With ``model``: a ConfigError when one of its hyperparameters is named like the command's own option
    (that flag sets the option, so the hyperparameter could not be set here)."""
    shadowed = set(getattr(args, "_shadowed_hparams", ()))
    if model is not None and shadowed:
        from flowbench.models import get_spec  # lazy: see hparam_declarations

        clash = sorted(shadowed & set(get_spec(model).hparams))
        if clash:
            flags = ", ".join("--" + k.replace("_", "-") for k in clash)
            raise ConfigError(
                f"model {model}: its hyperparameter(s) {', '.join(clash)} have the name of this command's own "
                f"option(s) {flags}, so they cannot be set here; rename them in the model's spec (flowbench run "
                "takes them as flags)"
            )
    return {k: v for k in hparam_declarations() if k not in shadowed and (v := getattr(args, k, None)) is not None}


def hparam_declarations() -> dict[str, Any]:
    # imported here, not at the top: the model registry behind it imports torch, which `flowbench --help` and
    # the commands that build no model should not pay for
    from flowbench.config import hparam_declarations as declarations

    return declarations()
