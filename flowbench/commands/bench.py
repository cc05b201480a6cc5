"""``flowbench bench``: speed benchmarks (Gresele et al. 2020, Fig. 1 and appendix H.1).

- ``bench gradients`` — time/memory of one exact-NLL gradient of a dense flow vs D: relative, ordinary,
  autodiff, and a plain-MLP floor; table + JSON + CSV + log–log PNG.
- ``bench optim`` — full-batch GD, relative vs ordinary gradient, shared random initialisations; PNG + JSON.
- ``bench train`` — training samples/s and s/epoch of one model on one dataset's shape (optionally vs zuko).

The measurements are in :mod:`flowbench.bench`; this module parses the command line and calls one
function per benchmark.
"""

from __future__ import annotations

import argparse

from flowbench.commands._hparams import add_hparam_flags, hparams_from_args, resolve_model_flag


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu or cuda (default auto)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's choice); on a shared machine 1 gives steadier numbers",
    )
    p.add_argument(
        "--out", default="results", metavar="DIR", help="results folder; files go to DIR/bench/ (default results)"
    )


def prepare(argv: list[str]) -> None:
    """``bench train --model REF``: resolve a plugged-in model first, so that its hyperparameters are flags."""
    if "train" in argv:
        resolve_model_flag(argv)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    _configure_gradients(sub)
    _configure_optim(sub)
    _configure_train(sub)


def _configure_gradients(sub: argparse._SubParsersAction) -> None:
    """The ``bench gradients`` subcommand and its options."""
    g = sub.add_parser(
        "gradients",
        help="time and memory of one exact-NLL gradient vs dimension",
        description="One gradient of the exact NLL of a dense flow by three methods plus a plain-MLP floor.",
    )
    g.add_argument(
        "--dims",
        type=_ints,
        default=[16, 64, 256, 784, 2048, 4096],
        help="comma-separated D values (default 16,64,256,784,2048,4096)",
    )
    g.add_argument("--batch", type=int, default=100, help="batch size B (default 100)")
    g.add_argument(
        "--layers",
        type=int,
        default=2,
        help="dense layers L of the relgrad flow, as `flowbench run --layers` for relgrad (default 2)",
    )
    g.add_argument(
        "--methods", default="relative,ordinary,autodiff,mlp", help="subset of relative,ordinary,autodiff,mlp"
    )
    g.add_argument(
        "--repeats", type=int, default=10, help="timed calls per method and D; the median is reported (default 10)"
    )
    g.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2; 1 for calls over 1 s)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="skip a method whose predicted memory exceeds this (default 80%% of free memory)",
    )
    g.add_argument(
        "--max-call-s",
        type=float,
        default=60.0,
        help="skip a method whose extrapolated time per call exceeds this (default 60; inf: no cap)",
    )
    g.add_argument("--budget-s", type=float, default=60.0, help="cap on timed seconds per method and D (fewer repeats)")
    g.add_argument(
        "--cpu-memory",
        choices=("predicted", "rss"),
        default="predicted",
        help="CPU memory: the predicted-bytes model, or the measured peak RSS increase in a subprocess",
    )
    g.add_argument("--no-check", action="store_true", help="skip the float64 agreement check (not recommended)")
    _common(g)


def _configure_optim(sub: argparse._SubParsersAction) -> None:
    """The ``bench optim`` subcommand and its options."""
    o = sub.add_parser(
        "optim",
        help="relative vs ordinary gradient descent: loss vs epoch",
        description="Full-batch GD on a 2-D toy set with a two-layer relgrad flow, shared inits.",
    )
    o.add_argument("--points", type=int, default=1000, help="points of the 2-D toy set (default 1000)")
    o.add_argument(
        "--inits", type=int, default=10, help="random initialisations, each trained by both methods (default 10)"
    )
    o.add_argument("--epochs", type=int, default=1000, help="full-batch gradient steps per run (default 1000)")
    o.add_argument("--lr", type=float, default=0.1, help="step size, the same for both methods (default 0.1)")
    o.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisations (default 0)")
    o.add_argument("--no-bias", action="store_true", help="dense layers without biases")
    o.add_argument(
        "--bias-logdet",
        action="store_true",
        help="give the biases the log-det's relative-gradient term −b too (the reference code does not)",
    )
    _common(o)


def _configure_train(sub: argparse._SubParsersAction) -> None:
    """The ``bench train`` subcommand and its options (the model's hyperparameters included)."""
    t = sub.add_parser(
        "train",
        help="training samples/s and time per epoch for one model and dataset",
        description="Training throughput on the dataset (synthetic data of its shape if not prepared).",
    )
    t.add_argument("--dataset", required=True)
    t.add_argument("--model", required=True)
    t.add_argument("--steps", type=int, default=200, help="timed training steps (default 200)")
    t.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default: the run config's (configs/<dataset>/<model>.toml, else flowbench run's default)",
    )
    t.add_argument("--lr", type=float, default=None, help="default: the run config's, as --batch-size")
    t.add_argument(
        "--compare-zuko",
        action="store_true",
        help="also time zuko's twin with matched parameter count (MAF for maf, NSF for nsf-ar)",
    )
    t.add_argument(
        "--adam",
        choices=("default", "foreach", "fused"),
        default=None,
        help="torch Adam implementation for every contender (default: the trainer's, fused where this torch has "
        "a fused kernel for the device)",
    )
    t.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile flowbench's training objective, as `flowbench run --compile` does",
    )
    t.add_argument("--compile-zuko", action="store_true", help="torch.compile zuko's objective too")
    t.add_argument(
        "--stack",
        type=int,
        default=None,
        metavar="R",
        help="time R runs trained as one stack against the same R runs one after another (ratio printed)",
    )
    t.add_argument("--data-root", default=None)
    _common(t)
    add_hparam_flags(t)  # the model's hyperparameters, spelled as `flowbench run` spells them


def main(args: argparse.Namespace) -> int:
    common = {"out": args.out, "device": args.device, "threads": args.threads}
    if args.bench_command == "gradients":
        res = _run_gradients(args, common)
    elif args.bench_command == "optim":
        res = _run_optim(args, common)
    elif args.stack is not None:
        res = _run_stack(args, common)
    else:  # argparse allows only the three benchmarks
        res = _run_train(args, common)
    print(f"wrote {', '.join(res['files'])}")
    return 0


def _run_gradients(args: argparse.Namespace, common: dict) -> dict:
    """``bench gradients``: its result dict."""
    from flowbench.bench.gradients import bench_gradients

    return bench_gradients(
        dims=args.dims,
        batch=args.batch,
        layers=args.layers,
        methods=args.methods,
        repeats=args.repeats,
        warmup=args.warmup,
        dtype=args.dtype,
        memory_limit_gb=args.memory_limit_gb,
        max_call_s=args.max_call_s,
        budget_s=args.budget_s,
        cpu_memory=args.cpu_memory,
        check=not args.no_check,
        **common,
    )


def _run_optim(args: argparse.Namespace, common: dict) -> dict:
    """``bench optim``: its result dict."""
    from flowbench.bench.optim import bench_optim

    return bench_optim(
        points=args.points,
        inits=args.inits,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        bias=not args.no_bias,
        bias_logdet=args.bias_logdet,
        **common,
    )


def _train_settings(args: argparse.Namespace) -> tuple:
    """``bench train``'s batch size, lr and hyperparameters from the run config and flags; prints where from.
    Refuses ``--compile`` / ``--compile-zuko`` where torch.compile cannot work (no C++ compiler for a CPU)."""
    from flowbench.bench.train import run_settings

    if args.compile or args.compile_zuko:
        from flowbench.errors import ConfigError
        from flowbench.training.trainer import compile_problem
        from flowbench.utils import resolve_device

        why = compile_problem(resolve_device(args.device))
        if why is not None:
            raise ConfigError(f"{why}, or drop the compile flags")

    batch_size, lr, hparams, line = run_settings(
        args.dataset, args.model, args.batch_size, args.lr, hparams_from_args(args, args.model)
    )
    print(line)
    return batch_size, lr, hparams


def _run_stack(args: argparse.Namespace, common: dict) -> dict:
    """``bench train --stack R``: stacked against one-by-one training; its result dict."""
    from flowbench.bench.stacked import run_stack_bench
    from flowbench.errors import ConfigError

    # the stack bench times flowbench's own trainers only, with their fused Adam
    ignored = [f for f, on in (("--compare-zuko", args.compare_zuko), ("--compile-zuko", args.compile_zuko)) if on]
    ignored += ["--adam " + args.adam] if args.adam not in (None, "fused") else []
    if ignored:
        raise ConfigError(
            f"bench train --stack times flowbench's trainers (fused Adam) stacked against one by one; "
            f"{' and '.join(ignored)} would be ignored: drop {'them' if len(ignored) > 1 else 'it'}, or drop --stack"
        )
    batch_size, lr, hparams = _train_settings(args)
    return run_stack_bench(
        args.dataset,
        args.model,
        args.stack,
        steps=args.steps,
        batch_size=batch_size,
        lr=lr,
        hparams=hparams,
        data_root=args.data_root,
        compile=args.compile,
        **common,
    )


def _run_train(args: argparse.Namespace, common: dict) -> dict:
    """``bench train``: training throughput (optionally beside zuko); its result dict."""
    from flowbench.bench.train import bench_train

    batch_size, lr, hparams = _train_settings(args)
    return bench_train(
        args.dataset,
        args.model,
        steps=args.steps,
        batch_size=batch_size,
        lr=lr,
        hparams=hparams,
        compare_zuko=args.compare_zuko,
        adam=args.adam,
        compile=args.compile,
        compile_zuko=args.compile_zuko,
        data_root=args.data_root,
        **common,
    )
