"""``flowbench sanity``: the 1-D and 2-D sanity tasks (JacNet, pseudo-inverse, toy2d, invertibility).

Every task writes JSON (+ PNG / Markdown) under ``--out`` and takes ``--quick`` (a few iterations, for smoke
tests and CI) or explicit iteration counts. The work is in :mod:`flowbench.sanity`; this module parses the
command line and calls one function per task.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from flowbench.commands._hparams import add_hparam_flags, hparams_from_args, resolve_model_flag

if TYPE_CHECKING:
    from flowbench.sanity.common import Progress

DEFAULT_OUT = "results/sanity"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}/)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the task's)")
    p.add_argument("--quick", action="store_true", help="a few iterations only (smoke test; numbers meaningless)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-part lines (results still print)")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return n


def prepare(argv: list[str]) -> None:
    """``sanity toy2d --model REF``: resolve a plugged-in model first, so that its hyperparameters are flags."""
    if "toy2d" in argv:
        resolve_model_flag(argv)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    _configure_jacnet(sub)
    _configure_pseudo_inverse(sub)
    _configure_toy2d(sub)
    _configure_invertibility(sub)


def _configure_jacnet(sub: argparse._SubParsersAction) -> None:
    """The ``sanity jacnet`` task and its options."""
    p = sub.add_parser(
        "jacnet",
        help="JacNet on exp (invertible) and |x| (1-Lipschitz); path dependence in 2-D",
        description="Learn a function through its Jacobian (Lorraine & Hossain 2019, section 5).",
    )
    _common(p)
    p.add_argument(
        "--task",
        dest="jacnet_task",
        choices=["exp", "abs", "path", "all"],
        default="all",
        help="exp, abs, path (d_x = 2 path-dependence gap) or all (default)",
    )
    p.add_argument("--iters", type=_positive, default=None, help="training iterations (default 50, the paper's)")
    p.add_argument(
        "--eps", type=float, default=1e-4, help="ε > 0 of the invertible activation J Jᵀ + εI (default 1e-4)"
    )
    p.add_argument("--k", type=float, default=1.0, help="Lipschitz constant k > 0 of the k·tanh activation (default 1)")


def _configure_pseudo_inverse(sub: argparse._SubParsersAction) -> None:
    """The ``sanity pseudo-inverse`` task and its options."""
    p = sub.add_parser(
        "pseudo-inverse",
        help="pseudo-invertible MLP pairs f, g; λ = μ sweep",
        description="Two MLPs trained to fit and invert each other (the blog post "
        "'Pseudo-Invertible networks using JAX': its loss, data and λ = μ sweep).",
    )
    _common(p)
    p.add_argument(
        "--sweep",
        action="store_true",
        help="λ = μ ∈ {0.01, 0.1, 1, 10, 100} + unconstrained (default: λ = μ = 1 and the unconstrained pair)",
    )
    p.add_argument("--activation", choices=["relu", "silu", "both"], default="both", help="MLP activation")
    p.add_argument("--steps", type=_positive, default=None, help="Adam steps (default 500)")


def _configure_toy2d(sub: argparse._SubParsersAction) -> None:
    """The ``sanity toy2d`` task and its options (the model's hyperparameters included)."""
    p = sub.add_parser(
        "toy2d",
        help="2-D toy densities: data beside the learned density",
        description="Train a registered model on a 2-D toy density through the normal trainer "
        "(Gresele et al. 2020, Figure 2).",
    )
    _common(p)
    p.add_argument("--data", choices=["mog", "moons", "sine", "all"], default="all", help="toy data (default all)")
    p.add_argument("--model", default="relgrad", help="any registered model (default relgrad)")
    p.add_argument("--max-epochs", type=_positive, default=None, help="epoch cap (default 100)")
    p.add_argument("--patience", type=_positive, default=30, help="early-stopping patience (default 30)")
    p.add_argument("--lr", type=float, default=None, help="learning rate > 0 (default: the model's)")
    p.add_argument("--batch-size", type=_positive, default=100, help="minibatch size (default 100)")
    add_hparam_flags(p)  # every hyperparameter of the model, spelled as `flowbench run` spells them


def _configure_invertibility(sub: argparse._SubParsersAction) -> None:
    """The ``sanity invertibility`` task and its options."""
    p = sub.add_parser(
        "invertibility",
        help="JacNet vs pseudo-invertible pair vs 1-D relgrad flow (table)",
        description="Three invertible 1-D fits of one monotone target: fit, round trip, guarantee.",
    )
    _common(p)
    p.add_argument("--iters", type=_positive, default=None, help="JacNet iterations (default 200)")
    p.add_argument("--steps", type=_positive, default=None, help="pair / relgrad Adam steps (default 2000)")


def main(args: argparse.Namespace) -> int:
    from flowbench.sanity.common import Progress

    progress = Progress(enabled=not args.quiet)
    if args.task == "jacnet":
        _run_jacnet(args, progress)
    elif args.task == "pseudo-inverse":
        _run_pseudo_inverse(args, progress)
    elif args.task == "toy2d":
        _run_toy2d(args, progress)
    else:  # argparse allows only the four tasks
        _run_invertibility(args, progress)
    return 0


def _run_jacnet(args: argparse.Namespace, progress: Progress) -> None:
    """``sanity jacnet``."""
    from flowbench.sanity.jacnet_tasks import run_jacnet_tasks

    run_jacnet_tasks(
        args.out,
        task=args.jacnet_task,
        iters=args.iters,
        seed=args.seed,
        eps=args.eps,
        k=args.k,
        quick=args.quick,
        progress=progress,
    )


def _run_pseudo_inverse(args: argparse.Namespace, progress: Progress) -> None:
    """``sanity pseudo-inverse``; prints its table and where the files went."""
    from flowbench.sanity.pseudo_inverse import run_pseudo_inverse

    acts = ("relu", "silu") if args.activation == "both" else (args.activation,)
    r = run_pseudo_inverse(
        args.out,
        sweep=args.sweep,
        activations=acts,
        steps=args.steps,
        seed=args.seed,
        quick=args.quick,
        progress=progress,
    )
    print(r["table"] + f"→ {Path(args.out) / 'pseudo_inverse.md'}, pseudo_inverse.json, pseudo_inverse_<act>.png")


def _run_toy2d(args: argparse.Namespace, progress: Progress) -> None:
    """``sanity toy2d``."""
    from flowbench.sanity.toy2d import run_toy2d_all

    hp = hparams_from_args(args, args.model)
    run_toy2d_all(
        None if args.data == "all" else [args.data],
        args.model,
        args.out,
        seed=args.seed,
        max_epochs=args.max_epochs,
        quick=args.quick,
        hparams=hp,
        progress=progress,
        patience=args.patience,
        lr=args.lr,
        batch_size=args.batch_size,
    )


def _run_invertibility(args: argparse.Namespace, progress: Progress) -> None:
    """``sanity invertibility``; prints its table and where the files went."""
    from flowbench.sanity.invertibility import run_invertibility

    r = run_invertibility(
        args.out, seed=args.seed, jacnet_iters=args.iters, steps=args.steps, quick=args.quick, progress=progress
    )
    print(r["table"] + f"→ {Path(args.out) / 'invertibility.md'}, invertibility.json, invertibility.png")


__all__ = ["configure", "main"]
