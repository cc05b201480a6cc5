"""List options shared by ``table``, ``report`` and ``plot``: ``--datasets power,mnist``, ``--dataset power
mnist`` and ``--dataset power --dataset mnist`` all mean the same, so a selection copied from one command works
in the others."""

from __future__ import annotations

import argparse
from typing import Any, Sequence


class _CommaList(argparse.Action):
    """Extend the option's list with each value, split at commas (dataset and model names have none)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        for value in values if isinstance(values, Sequence) and not isinstance(values, str) else [values]:
            items += [v.strip() for v in value.split(",") if v.strip()]
        setattr(namespace, self.dest, items)


def add_names(parser: argparse.ArgumentParser, singular: str, help: str, dest: str | None = None) -> None:
    """``--<singular>s`` and ``--<singular>``, one or more names, space- or comma-separated, repeatable."""
    parser.add_argument(
        f"--{singular}s",
        f"--{singular}",
        dest=dest or singular,
        nargs="+",
        action=_CommaList,
        metavar=singular[0].upper(),
        help=f"{help} (names separated by spaces or commas)",
    )
