"""``flowbench models``: every model flowbench can train, where it comes from, and its hyperparameters."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "refs", nargs="*", metavar="REF", help="also show these models named by reference (MODULE:ATTR or FILE.py:ATTR)"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="one block per model, every hyperparameter's help")


def _hparam_text(spec: object) -> str:
    return (
        ", ".join(
            f"{key}={hp.default_text}" if not hp.required else f"{key} (required)" for key, hp in spec.hparams.items()
        )
        or "—"
    )  # type: ignore[attr-defined]


def main(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from flowbench.models import MODELS, get_spec

    for ref in args.refs:
        get_spec(ref)  # a bad reference: exit 2 with what is wrong
    rows = []
    for _, spec, origin in MODELS.every():
        rows.append(
            [
                spec.name,
                spec.label if spec.required() else spec.display_name(spec.defaults()),
                origin.text() if origin.kind != "module" else f"module: {origin.reference}",
                f"{spec.lr:g}",
                spec.match_knob or "—",
                _hparam_text(spec),
            ]
        )
        if args.verbose:
            print(f"{spec.name}  [{origin.text()}]  {spec.paper}")
            for key, hp in spec.hparams.items():
                print(f"    --{key.replace('_', '-')}: {hp.help} (default {hp.default_text})")
    if args.verbose:
        print()
    print(tabulate(rows, headers=["model", "label (defaults)", "origin", "lr", "match knob", "hyperparameters"]))
    if MODELS.broken:
        print("\nnot usable:")
        for why in dict.fromkeys(MODELS.broken.values()):
            print(f"  {why}")
    print(
        "\nUse any of them with `flowbench run --model NAME`; your own flow as `--model MODULE:ATTR` or "
        "`--model FILE.py:ATTR` (a ModelSpec, a zuko or nflows flow class, or a function building a flow)."
    )
    return 0
