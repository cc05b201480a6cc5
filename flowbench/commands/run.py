"""``flowbench run``: train one model on one dataset with the MAF protocol and write its record.

With no arguments it trains the relative-gradient dense flow on the bundled ``digits`` data
(``configs/digits/relgrad.toml``): offline, about 30 s on two CPU cores. The flags are generated from the
option declarations (:data:`flowbench.config.OPTIONS`) and the model specs' hyperparameters.
"""

from __future__ import annotations

import argparse

from flowbench.commands._hparams import add_hparam_flags, flag_value, resolve_model_flag


def prepare(argv: list[str]) -> None:
    """Resolve a plugged-in model (``--model REF``, or the ``model`` of ``--config FILE``) before the parser is
    built, so that its hyperparameters are flags like a built-in's. A ``--seeds`` value that argparse would
    take for a flag (``-1-2``) is refused here with the rule, not argparse's "expected one argument"."""
    from flowbench.config import load_config, parse_seeds

    for flag, value in zip(argv, argv[1:]):
        if flag == "--seeds" and value[:2] in {f"-{d}" for d in "0123456789"}:
            parse_seeds(value)  # a leading '-' is a negative seed: a ConfigError that says so
    model, config = flag_value(argv, "--model"), flag_value(argv, "--config")
    if model is not None:
        resolve_model_flag(argv)
    elif config is not None:
        try:
            load_config(config)
        except Exception:  # reported with the rest of the options, after parsing
            pass


def configure(parser: argparse.ArgumentParser) -> None:
    from flowbench.config import OPTIONS
    from flowbench.models import MODELS

    # Every default is None so that resolve_options can tell an explicit flag from an unset one
    # (explicit flags override the config file, which overrides the defaults shown in the help).
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in OPTIONS.values():
        group = groups.setdefault(opt.group, parser.add_argument_group(opt.group))
        help_text = opt.help + (f" (default {opt.default})" if opt.default not in (None, False) else "")
        if opt.name == "model":
            help_text += ": " + ", ".join(MODELS) + ", or MODULE:ATTR / FILE.py:ATTR (your own; `flowbench models`)"
        if bool in opt.types:
            group.add_argument(opt.flag, action="store_true", default=None, help=help_text)
        else:
            kind = int if opt.types == (int,) else float if float in opt.types else str
            # choices shown, not enforced by argparse: resolve_options checks them with a message that says more
            metavar = opt.metavar or ("{" + ",".join(opt.choices) + "}" if opt.choices else None)
            group.add_argument(opt.flag, type=kind, metavar=metavar, default=None, help=help_text)
    add_hparam_flags(parser)


def main(args: argparse.Namespace) -> int:
    from flowbench.config import OPTIONS, hparam_declarations, resolve_options
    from flowbench.training.experiment import run_and_report

    keys = set(OPTIONS) | set(hparam_declarations())
    return run_and_report(resolve_options({k: v for k, v in vars(args).items() if k in keys and v is not None}))
