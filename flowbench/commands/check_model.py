"""``flowbench check-model REF``: flowbench's model contract checks on any model, as a pass/fail table.

The checks live in :mod:`flowbench.testing`; exit status 0 when every check passes (or is skipped or warns),
1 when one fails, 2 for a bad reference or hyperparameter.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ref",
        metavar="REF",
        help="the model: a registered name, MODULE:ATTR or FILE.py:ATTR (a ModelSpec or adapted flow)",
    )
    parser.add_argument("--dim", type=int, default=3, help="data dimension D (≤ 2: normalisation on a grid; default 3)")
    parser.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyperparameter (repeatable); unset size knobs are shrunk for speed",
    )
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


def main(args: argparse.Namespace) -> int:
    from flowbench.testing import check_model, describe_checks, parse_hparam_items

    if args.list:
        for name, doc in describe_checks("model").items():
            print(f"{name:22s} {doc}")
        return 0
    report = check_model(
        args.ref,
        dim=args.dim,
        hparams=parse_hparam_items(args.ref, args.hparam),
        seed=args.seed,
        checks=args.check,
        perturb=args.perturb,
    )
    print(report)
    return 0 if report.ok else 1
