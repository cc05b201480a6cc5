"""``flowbench datasets``: the registered datasets with D, split sizes, class labels and whether each is prepared."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=None, help="data root (default $FLOWBENCH_DATA or ./data)")


def _files_text(raw_files: tuple[str, ...]) -> str:
    """The raw files, those of a folder holding more than two summed up (``cifar10/ (6 files)``): the table
    stays readable."""
    folders: dict[str, list[str]] = {}
    for f in raw_files:
        folders.setdefault(f.split("/")[0], []).append(f)
    return ", ".join(", ".join(fs) if len(fs) <= 2 else f"{d}/ ({len(fs)} files)" for d, fs in folders.items())


def rows(root: Path) -> list[list]:
    """One row per registered dataset: name, D, train/val/test sizes, labels (``10 classes`` or ``–``), status,
    source, origin, description.

    D and the sizes are the prepared cache's where it is ok (small fixtures differ), else the spec's.
    """
    from flowbench.data import DATASETS, cache, status

    out = []
    for name, spec in DATASETS.items():
        origin = DATASETS.origins[name].text() if name in DATASETS.origins else "built-in"
        st = status(name, root)
        m = cache.read_manifest(root, name) if st == "prepared" else None
        sizes = [m["shapes"][k][0] for k in ("train", "val", "test")] if m else list(spec.sizes)
        dim = m["shapes"]["train"][1] if m else spec.dim
        labels = f"{spec.classes} classes" if spec.classes else "–"
        out.append(
            [name, dim, *sizes, labels, st, _files_text(spec.raw_files) or spec.source, origin, spec.description]
        )
    return out


def main(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from flowbench.data import DATASETS, check_root, download_command
    from flowbench.data.spec import ARCHIVE

    root = check_root(args.root)
    table = rows(root)
    print(f"data root: {root}")
    print(
        tabulate(
            table,
            headers=["dataset", "D", "train", "val", "test", "labels", "status", "raw files", "origin", "description"],
            intfmt=",",
            colalign=("left", "right", "right", "right", "right", "left", "left", "left", "left", "left"),
        )
    )
    status_col = 6
    notes = []
    missing = [r[0] for r in table if r[status_col] == "missing"]
    if any(DATASETS[n].source == ARCHIVE for n in missing):
        notes.append(f"missing → `{download_command('NAME', root)}` (or without --dataset for all)")
    for name in (n for n in missing if DATASETS[n].source != ARCHIVE):  # flowbench download fetches MAF's only
        notes.append(
            f"{name} missing → not in MAF's archive: put {_files_text(DATASETS[name].raw_files)} under {root} "
            f"(its source: {DATASETS[name].source})"
        )
    if any(r[status_col] == "raw" for r in table):
        notes.append("raw → prepared on first load")
    if any(r[status_col].startswith("broken") for r in table):
        notes.append(
            "broken → rebuilt from the raw files on the next load or `flowbench download`, without "
            "downloading; where the raw files are missing too, `flowbench download --dataset NAME` fetches them"
        )
    if notes:
        print("\n" + "\n".join(notes))
    return 0
