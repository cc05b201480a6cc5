"""``flowbench table``: the run records beside the published numbers, as Markdown, LaTeX, CSV or JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowbench.commands._lists import add_names

#: ``--out`` suffixes that choose the format when ``--format`` is not given.
_SUFFIX_FORMATS = {".md": "markdown", ".tex": "latex", ".csv": "csv", ".json": "json"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results", default="results", metavar="DIR", help="results folder holding runs/ (default results/)"
    )
    parser.add_argument("--out", metavar="FILE", help="write the table to FILE instead of printing it")
    parser.add_argument(
        "--published",
        default="maf,relgrad",
        metavar="LIST",
        help="published rows to show: comma-separated from maf, relgrad, beyond; 'none' for ours only "
        "(default maf,relgrad)",
    )
    parser.add_argument(
        "--format",
        choices=("markdown", "latex", "csv", "json"),
        help="markdown (GitHub table), latex (booktabs, bold, \\pm, footnotes), csv or json (one row per cell: "
        "mean, ± 2 SE, sd, n, source, marks in columns of their own); default: from --out's suffix "
        "(.md, .tex, .csv, .json), else markdown",
    )
    add_names(
        parser,
        "dataset",
        "only these columns: dataset names, <dataset>-cond for a class-conditional column (MAF Table 2), e.g. "
        "mnist,mnist-cond (default: every column with a number)",
        dest="datasets",
    )
    parser.add_argument(
        "--select",
        choices=("best-val", "all"),
        default="best-val",
        help="several configurations (tags) of one model and dataset: keep the best by mean validation LL "
        "(default), or show all as separate rows",
    )


def _check_out(out: str) -> None:
    """``--out FILE`` must name a file that can be (re)written; checked before the records are read."""
    from flowbench.errors import ConfigError

    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {out} is a directory; --out takes the table's file name, e.g. {path / 'table.md'}")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"--out {out}: {blocker} is a file, not a folder; choose another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create its folder {path.parent} ({e.strerror or e})") from e


def main(args: argparse.Namespace) -> int:
    from flowbench.errors import ConfigError
    from flowbench.results import iter_records, runs_without_record
    from flowbench.tables import build_table, parse_sources
    from flowbench.utils import atomic_write

    if args.out:
        _check_out(args.out)
    suffix = Path(args.out).suffix.lower() if args.out else ""
    fmt = args.format or _SUFFIX_FORMATS.get(suffix, "markdown")
    datasets = args.datasets or None
    records = list(iter_records(args.results))
    text = build_table(records, parse_sources(args.published), args.select, fmt=fmt, datasets=datasets)
    if args.out:
        try:
            with atomic_write(args.out, "w") as f:
                f.write(text)
        except (PermissionError, IsADirectoryError, NotADirectoryError) as e:
            raise ConfigError(f"--out {args.out} cannot be written ({e.strerror or e}); choose another file") from e
        print(f"table written to {args.out}")
    else:
        print(text, end="")
    pending = _pending(runs_without_record(args.results), datasets)
    if not records and not pending:  # a run refused before training leaves its empty folder: runs/ alone says little
        print(
            f"flowbench table: note: no run records under {Path(args.results) / 'runs'}, so the table holds the "
            "published rows only; train with `flowbench run` (records go to results/, or to --out), or pass "
            "--results DIR",
            file=sys.stderr,
        )
    if pending:  # on stderr: the table itself may be piped into a paper
        now = sum(run.holder() is not None for run in pending)
        print(
            f"flowbench table: note: {_runs(len(pending))} a checkpoint and no record yet and are not in the "
            f"table: {now} training now, {len(pending) - now} stopped before their end (run their command or "
            f"sweep again to resume them); `flowbench report --results {args.results}` shows where they stand",
            file=sys.stderr,
        )
    return 0


def _pending(runs: list, columns: list[str] | None) -> list:
    """The runs in progress that belong to the columns asked for: a column ``mnist-cond`` holds the conditional
    models' runs on mnist, ``mnist`` the others'."""
    if not columns:
        return runs
    from flowbench.errors import ConfigError
    from flowbench.models import get_spec

    def conditional(model: str) -> bool:
        try:
            return bool(getattr(get_spec(model), "conditional", False))
        except ConfigError:  # a model no longer registered: its name says it (conditional_spec's <name>-cond)
            return model.endswith("-cond")

    wanted = {(c.removesuffix("-cond"), c.endswith("-cond")) for c in columns}
    return [r for r in runs if (r.dataset, conditional(r.model)) in wanted]


def _runs(n: int) -> str:
    return "1 run has" if n == 1 else f"{n} runs have"
