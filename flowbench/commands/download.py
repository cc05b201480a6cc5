"""``flowbench download``: fetch, verify, extract and prepare the MAF datasets (see flowbench.data.download)."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from flowbench.data import DATASETS

    parser.description = (
        "Download the MAF data archive (Zenodo record 1161203), verify its checksum, extract the expected files "
        "safely and prepare each dataset into a memory-mapped cache. Rerunning verifies and does nothing more."
    )
    parser.add_argument("--root", type=Path, default=None, help="data root (default $FLOWBENCH_DATA or ./data)")
    parser.add_argument(
        "--dataset",
        action="append",
        default=None,
        metavar="NAME",
        help=f"prepare only this dataset (repeatable): {', '.join(DATASETS)}",
    )
    parser.add_argument("--url", default=None, help="download from this URL (a mirror) instead of Zenodo")
    parser.add_argument(
        "--from-archive",
        type=Path,
        default=None,
        metavar="PATH",
        help="use a data.tar.gz you already have (no network; not with --url)",
    )
    parser.add_argument(
        "--force", action="store_true", help="download, extract and prepare again even if everything is in place"
    )
    parser.add_argument(
        "--sha256",
        default=None,
        metavar="HEX",
        help="expected SHA-256 of the archive, 64 hex digits (overrides the reference MD5)",
    )
    parser.add_argument(
        "--md5",
        default=None,
        metavar="HEX",
        help="expected MD5 of the archive, 32 hex digits (overrides the unverified reference MD5)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from flowbench.data import DATASETS, default_root, get_info
    from flowbench.data.download import download_and_prepare

    names = args.dataset or [n for n, i in DATASETS.items() if i.source == "archive"]
    for n in names:
        get_info(n)  # unknown name -> ConfigError listing the choices
    download_and_prepare(
        args.root if args.root is not None else default_root(),
        list(dict.fromkeys(names)),
        urls=[args.url] if args.url else None,
        from_archive=args.from_archive,
        force=args.force,
        sha256=args.sha256,
        md5=args.md5,
        progress=not args.no_progress,
    )
    return 0
