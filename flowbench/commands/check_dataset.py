"""``flowbench check-dataset REF``: flowbench's dataset contract checks on any dataset, as a pass/fail table.

The checks live in :mod:`flowbench.testing`; exit status 0 when every check passes (or is skipped or warns),
1 when one fails, 2 for a bad reference or data root.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", metavar="REF", help="the dataset: a registered name, MODULE:ATTR or FILE.py:ATTR")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="data root with the raw files (default $FLOWBENCH_DATA or ./data); the processed "
        "cache is written there, as by any load",
    )
    parser.add_argument(
        "--check", action="append", default=None, metavar="NAME", help="run only this check (repeatable); see --list"
    )
    parser.add_argument("--list", action="store_true", help="list the checks and exit")


def main(args: argparse.Namespace) -> int:
    from flowbench.testing import check_dataset, describe_checks

    if args.list:
        for name, doc in describe_checks("dataset").items():
            print(f"{name:14s} {doc}")
        return 0
    report = check_dataset(args.ref, args.root, checks=args.check)
    print(report)
    return 0 if report.ok else 1
