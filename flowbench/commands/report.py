"""``flowbench report``: one page (Markdown + PNGs, or a single HTML file) with the comparison table, the
training curves per dataset, sample grids and every run's status, seeds and wall time."""

from __future__ import annotations

import argparse

from flowbench.commands._lists import add_names


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results", default="results", metavar="DIR", help="results folder holding runs/ (default results/)"
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="report.html (one file, images embedded) or report.md "
        "(PNGs in report_files/ beside it); default <results>/report.html",
    )
    add_names(parser, "dataset", "only these datasets")
    add_names(parser, "model", "only these models (registry names)")
    parser.add_argument(
        "--published",
        default="maf,relgrad",
        metavar="LIST",
        help="published rows and reference lines: comma-separated from maf, relgrad, beyond, or none",
    )
    parser.add_argument(
        "--select",
        choices=("best-val", "all"),
        default="best-val",
        help="several tags of one model: keep the best by mean validation LL (default), or all",
    )
    parser.add_argument("--no-samples", action="store_true", help="leave out the sample figures (no model is rebuilt)")
    parser.add_argument("--data-root", metavar="DIR", help="data root for the sample figures (default: each record's)")


def main(args: argparse.Namespace) -> int:
    from flowbench.plots.report import build_report
    from flowbench.tables import parse_sources

    out = build_report(
        args.results,
        args.out,
        sources=parse_sources(args.published),
        select=args.select,
        datasets=args.dataset,
        models=args.model,
        samples=not args.no_samples,
        data_root=args.data_root,
    )
    print(f"report written to {out}")
    return 0
