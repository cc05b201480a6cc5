"""``flowbench plot``: figures from run records: ``curves`` (validation LL and training NLL per epoch) and
``samples`` (samples of a recorded model beside test data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowbench.commands._lists import add_names


def _dims(text: str) -> list[int]:
    try:
        return [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated dimension indices, e.g. 0,1,2; got {text!r}"
        ) from None


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return n


def _results(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results", default="results", metavar="DIR", help="results folder holding runs/ (default results/)"
    )


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="figure", metavar="FIGURE", required=True)
    _configure_curves(sub)
    _configure_samples(sub)


def _configure_curves(sub: argparse._SubParsersAction) -> None:
    """The ``plot curves`` figure and its options."""
    p = sub.add_parser(
        "curves",
        help="validation LL and training NLL against epoch, one row per dataset",
        description="Validation LL (and the exact training NLL on a fixed subsample of the training "
        "set; older records: their running training loss) against epoch for the selected records: seeds "
        "of one configuration as mean line and min-max band, best epochs starred, published test LL "
        "dashed.",
    )
    _results(p)
    add_names(p, "dataset", "datasets to draw (default all)")
    add_names(p, "model", "models to draw, registry names (default all)")
    p.add_argument("--tag", nargs="+", action="extend", metavar="T", help="only these tags")
    p.add_argument(
        "--select",
        choices=("best-val", "all"),
        default="best-val",
        help="several tags of one model: draw the best by mean validation LL (default) or all",
    )
    p.add_argument(
        "--published",
        default="maf,relgrad",
        metavar="LIST",
        help="published reference lines: comma-separated from maf, relgrad, beyond, or none",
    )
    p.add_argument("--no-train-loss", action="store_true", help="validation LL panels only")
    p.add_argument("--out", metavar="FILE", help="PNG to write (default <results>/figures/curves.png)")


def _configure_samples(sub: argparse._SubParsersAction) -> None:
    """The ``plot samples`` figure and its options."""
    p = sub.add_parser(
        "samples",
        help="samples of a recorded model beside test data",
        description="Samples from a recorded model (rebuilt from its record and best checkpoint "
        "state): an image grid beside test images (mnist, digits), the learned density (2-D toys), "
        "or pairwise marginals against test data (tabular).",
    )
    _results(p)
    p.add_argument("--dataset", required=True, metavar="D", help="dataset of the record")
    p.add_argument("--model", required=True, metavar="M", help="model of the record (registry name)")
    p.add_argument("--tag", metavar="T", help="configuration tag (default: the best tag by mean validation LL)")
    p.add_argument("--seed", type=int, metavar="K", help="run seed (default: the seed with the best validation LL)")
    p.add_argument(
        "-n",
        "--n",
        type=_positive,
        metavar="N",
        help="number of samples (default 64 images, at most 256; 1000 tabular; 2-D toys: not taken)",
    )
    p.add_argument("--sample-seed", type=int, default=0, metavar="S", help="seed of the sampling generator (default 0)")
    p.add_argument("--dims", type=_dims, metavar="LIST", help="tabular data only: dimensions to pair (default 0,1,2,3)")
    p.add_argument(
        "--data-root", metavar="DIR", help="data root (default: the record's, else $FLOWBENCH_DATA or data/)"
    )
    p.add_argument(
        "--out", metavar="FILE", help="PNG to write (default <results>/figures/samples_<dataset>_<model>.png)"
    )


def _figure_path(args: argparse.Namespace, default: str) -> Path:
    """Where the figure goes, checked writable (and a ``.png``) before anything is drawn."""
    from flowbench.utils import output_file

    out = Path(args.out) if args.out else Path(args.results) / "figures" / default
    return output_file(out, what="the figure", suffixes=(".png",))


def main(args: argparse.Namespace) -> int:
    from flowbench.aggregate import chosen_runs
    from flowbench.plots import _records as R
    from flowbench.tables import parse_sources

    records = R.load_runs(args.results)
    if args.figure == "curves":
        from flowbench.plots.curves import save_curves

        records = chosen_runs(R.select_runs(records, args.dataset, args.model, args.tag), args.select)
        out = _figure_path(args, "curves.png")
        save_curves(
            records,
            out,
            sources=parse_sources(args.published),
            train_loss=not args.no_train_loss,
            with_tag=args.select == "all",
        )
    else:
        from flowbench.plots.samples import choose_run, save_samples

        records = R.select_runs(records, [args.dataset], [args.model], [args.tag] if args.tag else None)
        if args.tag is None:
            records = chosen_runs(records)
        rec = choose_run(records, args.seed)
        out = _figure_path(args, f"samples_{args.dataset}_{args.model}.png")
        save_samples(rec, out, n=args.n, seed=args.sample_seed, dims=args.dims, data_root=args.data_root)
        print(f"{R.label(rec, with_tag=True)}, seed {R.seed(rec)}: {R.record_path(rec)}")
    print(f"figure written to {out}")
    return 0
