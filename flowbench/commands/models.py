"""``flowbench models``: every model flowbench can train, where it comes from, and its hyperparameters."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("refs", nargs="*", metavar="REF",
                        help="also show these models named by reference (MODULE:ATTR or FILE.py:ATTR)")
    parser.add_argument("--verbose", "-v", action="store_true", help="one block per model, every hyperparameter's help")


def _hparam_text(spec: object) -> str:
    parts = []
    for key, hp in spec.hparams.items():  # type: ignore[attr-defined]
        default = getattr(hp, "default", None)
        if getattr(hp, "required", False):
            parts.append(f"{key} (required)")
        else:
            parts.append(f"{key}={default!r}" if isinstance(default, str) else f"{key}={default}")
    return ", ".join(parts) or "—"


def main(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from flowbench.models import MODELS, get_spec

    for ref in args.refs:
        get_spec(ref)  # a bad reference: exit 2 with what is wrong
    rows = []
    for name, spec, origin in MODELS.every():
        rows.append([name if ":" not in name else spec.name, spec.display_name(spec.defaults())
                     if not any(getattr(h, "required", False) for h in spec.hparams.values()) else spec.label,
                     origin.text() if origin.kind != "module" else f"module: {origin.reference}",
                     f"{spec.lr:g}", spec.match_knob or "—", _hparam_text(spec)])
    if args.verbose:
        for (name, _, origin) in MODELS.every():
            spec = MODELS.resolve(name)[0]
            print(f"{spec.name}  [{origin.text()}]  {spec.paper}")
            for key, hp in spec.hparams.items():
                print(f"    --{key.replace('_', '-')}: {hp.help} (default {hp.default})")
        print()
    print(tabulate(rows, headers=["model", "label (defaults)", "origin", "lr", "match knob", "hyperparameters"]))
    broken = {**MODELS.broken}
    if broken:
        print("\nnot usable:")
        for why in dict.fromkeys(broken.values()):
            print(f"  {why}")
    print("\nUse any of them with `flowbench run --model NAME`; your own flow as `--model MODULE:ATTR` or "
          "`--model FILE.py:ATTR` (a ModelSpec, a zuko or nflows flow class, or a function building a flow).")
    return 0
