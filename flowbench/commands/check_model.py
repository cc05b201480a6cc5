"""``flowbench check-model REF``: flowbench's model contract checks on any model, as a pass/fail table.

The checks live in :mod:`flowbench.testing`; exit status 0 when every check passes (or is skipped or warns),
1 when one fails, 2 for a bad reference or hyperparameter.
"""

from __future__ import annotations

import argparse

from flowbench.commands._hparams import add_hparam_flags, hparams_from_args, resolve_model_flag


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ref",
        metavar="REF",
        help="the model: a registered name, MODULE:ATTR or FILE.py:ATTR (a ModelSpec or adapted flow)",
    )
    parser.add_argument("--dim", type=int, default=3, help="data dimension D (≤ 2: normalisation on a grid; default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the builds, perturbations and draws (default 0)")
    parser.add_argument(
        "--perturb",
        type=float,
        default=0.1,
        help="noise added to every parameter so that densities are not trivial (default 0.1; 0: none)",
    )
    parser.add_argument(
        "--check", action="append", default=None, metavar="NAME", help="run only this check (repeatable); see --list"
    )
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    # the model's hyperparameters, spelled as `flowbench run` spells them; unset size knobs are shrunk for speed
    add_hparam_flags(parser)


def prepare(argv: list[str]) -> None:
    """``check-model REF``: resolve a plugged-in model first, so that its hyperparameters are flags."""
    rest = argv[argv.index("check-model") + 1 :] if "check-model" in argv else []
    ref = next((a for a in rest if not a.startswith("-")), None)
    if ref is not None and ":" in ref:
        resolve_model_flag(["--model", ref])


def _typed(args: argparse.Namespace) -> dict:
    """The given hyperparameters; text (lists, per-model types) read by the model's own spec."""
    from flowbench.testing import parse_hparam_items

    given = hparams_from_args(args, args.ref)
    text = {k: v for k, v in given.items() if isinstance(v, str)}
    return {**given, **parse_hparam_items(args.ref, [f"{k}={v}" for k, v in text.items()])}


def main(args: argparse.Namespace) -> int:
    from flowbench.testing import check_model, describe_checks

    if args.list:
        for name, doc in describe_checks("model").items():
            print(f"{name:22s} {doc}")
        return 0
    report = check_model(
        args.ref,
        dim=args.dim,
        hparams=_typed(args),
        seed=args.seed,
        checks=args.check,
        perturb=args.perturb,
    )
    print(report)
    return 0 if report.ok else 1
