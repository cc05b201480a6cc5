"""``flowbench run``: train one model on one dataset with the MAF protocol and write its record.

With no arguments it trains the relative-gradient dense flow on the bundled ``digits`` data
(``configs/digits/relgrad.toml``): offline, about 30 s on two CPU cores.
"""

from __future__ import annotations

import argparse

from flowbench.config import DEFAULTS

_BOOL = argparse.BooleanOptionalAction

#: Below this data dimension the matrices are too small for intra-op threads to pay; on a machine whose
#: cores are busy, torch's default threads even slow training down many times over (measured: the default
#: digits run took 270 s with 2 threads and 22 s with 1 on a loaded 2-core machine).
SMALL_DIM = 256


def configure(parser: argparse.ArgumentParser) -> None:
    # Every default is None so that resolve_options can tell an explicit flag from an unset one
    # (explicit flags override the config file, which overrides the defaults shown in the help).
    d = DEFAULTS
    parser.set_defaults(**{k: None for k in d})
    g = parser.add_argument_group("what to run")
    g.add_argument("--dataset", help=f"dataset name (default {d['dataset']}; see `flowbench datasets`)")
    g.add_argument("--model", help=f"model name (default {d['model']}): gaussian, made, made-mog, maf, maf-mog, realnvp, relgrad")
    g.add_argument("--config", metavar="FILE", help="TOML file of run options (keys = these flag names); "
                   "default configs/<dataset>/<model>.toml when it exists")
    g.add_argument("--seed", type=int, help=f"random seed (default {d['seed']})")
    g.add_argument("--device", help="auto (GPU if present), cpu or cuda (default auto)")
    g.add_argument("--tag", help="label for this configuration; records go to runs/<dataset>/<model>/<tag>/")
    t = parser.add_argument_group("training (MAF protocol)")
    t.add_argument("--max-epochs", type=int, metavar="N", help="epoch cap (default: none, patience alone stops)")
    t.add_argument("--patience", type=int, metavar="N", help=f"epochs without validation improvement before stopping (default {d['patience']})")
    t.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3 MADE/MADE MoG/relgrad, 1e-4 flows)")
    t.add_argument("--batch-size", type=int, metavar="N", help=f"minibatch size (default {d['batch_size']})")
    t.add_argument("--weight-decay", type=float, metavar="W", help=f"L2 penalty coefficient (default {d['weight_decay']})")
    t.add_argument("--compile", action="store_true", default=None,
                   help="compile the training objective with torch.compile (faster steps for small models after a "
                   "one-off compile of ~30 s; needs a C++ compiler on CPU)")
    t.add_argument("--eval-batch-size", type=int, metavar="N", help=f"batch size for evaluation (default {d['eval_batch_size']})")
    m = parser.add_argument_group("model hyperparameters (only those the model takes)")
    m.add_argument("--hidden", type=int, metavar="H", help="hidden units per layer (MADE, MAF, Real NVP)")
    m.add_argument("--hidden-layers", type=int, metavar="L", help="hidden layers per MADE/coupling net (1 or 2)")
    m.add_argument("--layers", type=int, metavar="K", help="flow depth (MAF, Real NVP) or number of dense layers (relgrad)")
    m.add_argument("--activation", help="relu or tanh (MADE/MAF); smooth-leaky-relu or tanh (relgrad)")
    m.add_argument("--components", type=int, metavar="C", help="mixture components (MoG models)")
    m.add_argument("--batch-norm", action=_BOOL, help="batch norm between flow layers (MAF, Real NVP)")
    m.add_argument("--alpha", type=float, help="smooth leaky ReLU slope (relgrad)")
    m.add_argument("--base", help="relgrad base density: normal or logistic (alias hyperbolic-secant)")
    m.add_argument("--bias", action=_BOOL, help="biases in relgrad's dense layers")
    m.add_argument("--bias-logdet", action=_BOOL,
                   help="relgrad: give the biases the log-det's relative-gradient term too (the full augmented-matrix "
                   "rule; default off = the reference code's rule, with which the published numbers were made)")
    m.add_argument("--match-params", metavar="N|MODEL",
                   help="choose the hidden width so the parameter count matches N, or MODEL as configured for this dataset")
    o = parser.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help=f"results folder (default {d['out']}/)")
    o.add_argument("--data-root", metavar="DIR", help="prepared data folder (default $FLOWBENCH_DATA or data/)")
    o.add_argument("--resume", action="store_true", default=None, help="continue from this run's last checkpoint")
    o.add_argument("--force", action="store_true", default=None, help="overwrite an existing record")
    o.add_argument("--quiet", action="store_true", default=False, help="no progress bar or per-epoch lines")
    o.add_argument("--threads", type=int, metavar="N", default=None,
                   help="CPU threads for torch. Default: $OMP_NUM_THREADS if set, else 1 for datasets of fewer "
                   f"than {SMALL_DIM} dimensions (all but MNIST) and torch's default otherwise")


def _set_threads(threads: int | None, dataset: str) -> None:
    """Apply ``--threads`` or the default rule (see :data:`SMALL_DIM`)."""
    import os

    import torch

    from flowbench.utils import set_threads

    if threads is not None:
        set_threads(threads)
        return
    if os.environ.get("OMP_NUM_THREADS"):
        return
    from flowbench.data import DATASETS

    info = DATASETS.get(dataset)
    if info is not None and info.dim < SMALL_DIM:
        torch.set_num_threads(1)


def main(args: argparse.Namespace) -> int:
    from flowbench.config import resolve_options
    from flowbench.training import run_experiment

    cli = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    options = resolve_options(cli)
    _set_threads(args.threads, options["dataset"])
    from flowbench.results import record_path
    from flowbench.training.experiment import summary_line

    try:
        record = run_experiment(options, progress=not args.quiet)
    except KeyboardInterrupt:
        import sys

        print("training interrupted; the last completed epoch is checkpointed: "
              "run the same command with --resume to continue", file=sys.stderr)
        raise
    path = record_path(options["out"], record["dataset"], options["model"], options["seed"], options["tag"])
    print(summary_line(record, path))
    return 0 if record["status"] == "ok" else 1
