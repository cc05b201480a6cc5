"""The ``flowbench`` command line.

Each subcommand lives in ``flowbench/commands/<name>.py`` and exposes ``configure(parser)`` and
``main(args) -> int`` (and optionally ``prepare(argv)``, run before the parser is built); they only parse,
merge configuration and dispatch. Modules are imported lazily so
that ``flowbench --help`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from flowbench import __version__, interrupts
from flowbench.errors import ConfigError, FlowbenchError, Terminated, advice_format

# Explicit registry: subcommand -> (module, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("flowbench.commands.download", "fetch, verify and prepare the MAF datasets"),
    "datasets": ("flowbench.commands.datasets", "list datasets with dimension, split sizes, status and origin"),
    "models": (
        "flowbench.commands.models",
        "list models with their origin (built-in, plugin, file) and hyperparameters",
    ),
    "run": ("flowbench.commands.run", "train one model on one dataset and record the result"),
    "table": (
        "flowbench.commands.table",
        "table of run records beside the published numbers: Markdown, LaTeX, CSV, JSON",
    ),
    "bench": ("flowbench.commands.bench", "speed benchmarks: gradients, optim, train"),
    "sanity": ("flowbench.commands.sanity", "1-D and 2-D sanity tasks (JacNet, pseudo-inverse, toy2d, ...)"),
    "sweep": ("flowbench.commands.sweep", "run a grid of runs locally or on Ray"),
    "plot": ("flowbench.commands.plot", "figures from run records: training curves, samples"),
    "report": ("flowbench.commands.report", "one page (HTML or Markdown) with table, curves, samples and run status"),
    "check-model": ("flowbench.commands.check_model", "run flowbench's model contract checks on any model (yours too)"),
    "check-dataset": ("flowbench.commands.check_dataset", "run flowbench's dataset contract checks on any dataset"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported and configured."""
    parser = argparse.ArgumentParser(
        prog="flowbench",
        description="Normalizing-flow density estimation benchmarks (MAF and relative-gradient protocols).",
    )
    parser.add_argument("--version", action="version", version=f"flowbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    who = f"flowbench {command}" if command else "flowbench"
    shown = warnings.formatwarning
    try:
        # Ctrl-C and SIGTERM: a training loop ends its step and writes its checkpoints there first; from before
        # the command's imports (torch: a second or two), which a stop must neither break nor be lost in
        with interrupts.handling_signals():
            return _dispatch(argv, command)
    except FlowbenchError as e:
        print(f"{who}: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{who}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{who}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`, which closed early: not an error. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        warnings.formatwarning = shown


def installed_problem() -> str | None:
    """What in the installed packages keeps flowbench from working, or None. torch before 2.3 was built against
    numpy 1 and cannot hand arrays to numpy 2 ("RuntimeError: Numpy is not available" at a run's first
    evaluation, with torch 2.1.2); ``pip install -e .`` after such a torch installs numpy 2."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_v, numpy_v = version("torch"), version("numpy")
    except PackageNotFoundError:
        return None  # the import itself will say what is missing
    torch_mm, numpy_mm = _major_minor(torch_v), _major_minor(numpy_v)
    if torch_mm is not None and numpy_mm is not None and torch_mm < (2, 3) and numpy_mm >= (2, 0):
        return (
            f"torch {torch_v} was built for numpy 1 and cannot work with the numpy {numpy_v} installed here: "
            'install numpy 1 (pip install "numpy<2") or torch 2.3 or newer'
        )
    return None


def _major_minor(v: str) -> tuple[int, int] | None:
    parts = v.split(".")
    try:
        return int(parts[0]), int(parts[1].split("+")[0])
    except (IndexError, ValueError):
        return None


def _dispatch(argv: list[str], command: str | None) -> int:
    """Parse ``argv`` (``command``: its subcommand, if it names one) and run the subcommand."""
    if command is not None:
        problem = installed_problem()
        if problem is not None:
            raise ConfigError(problem)
        hook = getattr(importlib.import_module(COMMANDS[command][0]), "prepare", None)
        if hook is not None:  # e.g. `run` resolves a plugged-in model first, so that its flags exist
            hook(argv)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    warnings.formatwarning = advice_format(args.command, warnings.formatwarning)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
