"""``flowbench table``: a Markdown table of the run records beside the published numbers."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="results", metavar="DIR", help="results folder holding runs/ (default results/)")
    parser.add_argument("--out", metavar="FILE", help="write the table to FILE instead of printing it")
    parser.add_argument(
        "--published",
        default="maf,relgrad",
        metavar="LIST",
        help="published rows to show: comma-separated from maf, relgrad, beyond; 'none' for ours only (default maf,relgrad)",
    )
    parser.add_argument(
        "--select",
        choices=("best-val", "all"),
        default="best-val",
        help="several configurations (tags) of one model and dataset: keep the best by mean validation LL "
        "(default), or show all as separate rows",
    )


def main(args: argparse.Namespace) -> int:
    from flowbench.results import iter_records
    from flowbench.tables import build_table, parse_sources
    from flowbench.utils import atomic_write

    text = build_table(list(iter_records(args.results)), parse_sources(args.published), args.select)
    if args.out:
        with atomic_write(args.out, "w") as f:
            f.write(text)
        print(f"table written to {args.out}")
    else:
        print(text, end="")
    return 0
