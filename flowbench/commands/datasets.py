"""``flowbench datasets``: the registered datasets with D, split sizes and whether each is prepared."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=None, help="data root (default $FLOWBENCH_DATA or ./data)")


def rows(root: Path) -> list[list]:
    from flowbench.data import DATASETS, cache, status

    out = []
    for name, info in DATASETS.items():
        st = status(name, root)
        m = cache.read_manifest(root, name) if st == "prepared" else None
        sizes = [m["shapes"][k][0] for k in ("train", "val", "test")] if m else list(info.sizes)
        dim = m["shapes"]["train"][1] if m else info.dim
        source = ", ".join(info.raw_files) if info.raw_files else "scikit-learn (bundled)"
        out.append([name, dim, *sizes, st, source])
    return out


def main(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from flowbench.data import default_root, download_command

    root = args.root if args.root is not None else default_root()
    table = rows(root)
    print(f"data root: {root}")
    print(tabulate(table, headers=["dataset", "D", "train", "val", "test", "status", "raw files"],
                   intfmt=",", colalign=("left", "right", "right", "right", "right", "left", "left")))
    if any(r[5] in ("missing", "raw") for r in table):
        print(f"\nmissing → `{download_command('NAME', root)}` (or without --dataset for all); "
              "raw → prepared on first load")
    return 0
