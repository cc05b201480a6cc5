"""``flowbench sweep``: run a sweep file's grid of runs, locally (sequential or N processes) or on Ray.

Examples::

    flowbench sweep configs/sweeps/tiny-digits.toml --dry-run
    flowbench sweep configs/sweeps/tiny-digits.toml --workers 2
    flowbench sweep configs/sweeps/maf-table1.toml --executor ray --address auto --gpus-per-run 1
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowbench.sweep.spec import Sweep


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", metavar="SWEEP.toml", help="sweep file (see configs/sweeps/)")
    _configure_executor(parser)
    _configure_runs(parser)


def _configure_executor(parser: argparse.ArgumentParser) -> None:
    """Where the runs go and with what: --executor, --workers, --address, --cpus-per-run, --gpus-per-run."""
    parser.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: this machine (default); ray: Ray tasks on a cluster or a local Ray instance",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="local: N worker processes (default 1: sequential, in this process); "
        "ray: at most N runs at a time (default: as many as the cluster fits), and a local Ray "
        "instance started for the sweep gets N x --cpus-per-run CPUs",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="ray: cluster to connect to (auto, HOST:PORT or ray://HOST:10001); default: start a local Ray instance",
    )
    parser.add_argument(
        "--cpus-per-run",
        type=int,
        default=1,
        metavar="C",
        help="CPU cores (torch threads) per run: Ray resource request / local worker threads (default 1)",
    )
    parser.add_argument(
        "--gpus-per-run",
        type=float,
        default=0,
        metavar="G",
        help="ray: GPUs per run (Ray resource request; fractions share a GPU; default 0)",
    )


def _configure_runs(parser: argparse.ArgumentParser) -> None:
    """What the sweep does with its runs: --out, --retries, --max-stack, --dry-run."""
    parser.add_argument(
        "--out",
        default="results",
        metavar="DIR",
        help="results folder: records go to DIR/runs/..., the sweep report to DIR/sweeps/ (default results/)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="retries of a run that crashed before it is reported as failed (default 2); a flowbench "
        "error in a run (a record or lock in the way, bad data) fails it at once",
    )
    parser.add_argument(
        "--max-stack",
        type=int,
        default=None,
        metavar="R",
        help="train at most R runs of one shape (differing in seed, lr, weight decay, patience or "
        "max-epochs) together as one stack, one record each; 1: no stacking (default: as many "
        "as fit in 1/workers of a quarter of the free memory, at most 32)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the runs and which are already recorded (skipped) or to be made again (a non-finite "
        "record), then stop",
    )


def dry_run_text(sweep: Sweep, out: str) -> str:
    """The ``--dry-run`` listing: :func:`flowbench.sweep.runner.dry_run_text`."""
    from flowbench.sweep.runner import dry_run_text as listing

    return listing(sweep, out)


def main(args: argparse.Namespace) -> int:
    from flowbench.sweep import load_sweep, run_sweep, summary
    from flowbench.sweep.runner import check_resources

    check_resources(args.workers, args.retries, args.cpus_per_run, args.gpus_per_run)
    sweep = load_sweep(args.sweep_file)
    if args.dry_run:
        print(dry_run_text(sweep, args.out))
        return 0
    if args.executor == "ray":  # fail before anything starts, with the install command
        from flowbench.sweep.ray_backend import import_ray

        import_ray()
    report = run_sweep(
        sweep,
        args.out,
        executor=args.executor,
        workers=args.workers,
        retries=args.retries,
        address=args.address,
        cpus_per_run=args.cpus_per_run,
        gpus_per_run=args.gpus_per_run,
        stream=sys.stderr,
        max_stack=args.max_stack,
    )
    print(summary(report, sweep, args.out))
    if report.interrupted:
        return 143 if report.terminated else 130
    return 0 if report.ok else 1
