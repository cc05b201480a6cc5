"""Benchmark (not a test): what ``--compile`` buys a training step, alone and in a stack (issue 24, item 3).

At POWER's size (D = 6, batch 100, 16,599 steps an epoch) a step of the MAF-family flows is mostly
per-operation overhead, which ``torch.compile`` fuses away. For each model (its POWER config, the hidden
layers given), four contenders train on the same rows in the same process, round after round in turn so that
a busy machine slows them alike: one run eager, one run compiled (``Trainer(compile=True)``, what ``flowbench
run --compile`` trains with), a stack of ``--stack`` runs eager and the same stack compiled
(``StackedTrainer(compile=True)``: ``--seeds``, and sweeps with ``compile = true``). Round 0 compiles and is not
timed. Prints ms per step (a stack's step of all its runs, and per run) and the compiled / eager speed-ups.

    OMP_NUM_THREADS=1 python tests/benchmarks/compile_steps.py [--data-root DIR] [--models made-mog,maf,realnvp]
        [--hidden-layers 2] [--stack 3] [--steps 200] [--rounds 4] [--out FILE.json]

Rows of POWER when the data root holds it (MAF's file or the rebuild from UCI), else synthetic N(0, I) of its
shape: the step time does not depend on the values.

Measured (AMD EPYC, 2 cores, one thread, torch 2.13 CPU, beside two niced trainings; see
docs/manual/benchmarks.md#compiled-steps for the table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def contenders(model: str, hidden_layers: int, stack: int, x: torch.Tensor) -> tuple[dict, dict]:
    """The four trainers (one-step-period callables) and the settings they train with."""
    from flowbench.bench.stacked import _contenders
    from flowbench.bench.train import run_settings
    from flowbench.models import get_spec

    batch_size, lr, hparams, line = run_settings("power", model, hparams={"hidden_layers": hidden_layers})
    hp = get_spec(model).resolve(hparams)
    out = {}
    for compile in (False, True):
        trainers, st = _contenders(model, hp, stack, x, torch.device("cpu"), lr, batch_size, compile)
        tag = "compiled" if compile else "eager"
        out[f"single, {tag}"] = (lambda tr=trainers[0]: tr._train_period(tr.batches_per_epoch), 1)
        out[f"stack of {stack}, {tag}"] = (lambda st=st: st._train_epoch(list(range(stack))), stack)
    return out, {"batch_size": batch_size, "lr": lr, "hparams": hp, "settings": line}


def time_model(model: str, hidden_layers: int, stack: int, x: torch.Tensor, rounds: int) -> dict:
    runners, settings = contenders(model, hidden_layers, stack, x)
    steps = x.shape[0] // settings["batch_size"]
    times: dict[str, list[float]] = {k: [] for k in runners}
    for rnd in range(rounds + 1):
        for name, (fn, _) in runners.items():
            t = time.perf_counter()
            fn()
            if rnd:  # round 0 compiles
                times[name].append(time.perf_counter() - t)
    ms = {k: statistics.median(v) / steps * 1e3 for k, v in times.items()}
    res = {"model": model, "hidden_layers": hidden_layers, "steps_per_round": steps, **settings, "ms_per_step": ms}
    res["ms_per_step_per_run"] = {k: ms[k] / runners[k][1] for k in ms}
    res["speedup_single"] = ms["single, eager"] / ms["single, compiled"]
    res["speedup_stack"] = ms[f"stack of {stack}, eager"] / ms[f"stack of {stack}, compiled"]
    res["compiled_stack_vs_eager_single_per_run"] = (
        ms["single, eager"] / res["ms_per_step_per_run"][f"stack of {stack}, compiled"]
    )
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="a data root holding power/ (default: synthetic rows)")
    p.add_argument("--models", default="made-mog,maf,realnvp,maf-mog", help="comma-separated models")
    p.add_argument("--hidden-layers", type=int, default=2, help="hidden layers of every model (default 2)")
    p.add_argument("--stack", type=int, default=3, help="runs per stack (default 3)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per round and contender (default 200)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (default 4; one more compiles first)")
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    if min(args.stack, args.steps, args.rounds, args.hidden_layers) < 1:
        p.error("--stack, --steps, --rounds and --hidden-layers must be >= 1")

    from flowbench.bench.common import machine_info
    from flowbench.bench.train import dataset_tensor

    torch.set_num_threads(1)
    x, _, synthetic = dataset_tensor("power", args.data_root, max_rows=args.steps * 100)
    x = x[: args.steps * 100]
    machine = machine_info()
    print(
        f"POWER's shape, {x.shape[0]:,} {'synthetic' if synthetic else 'POWER'} rows, one thread, torch "
        f"{machine['torch']}, load average {machine['loadavg']}"
    )
    rows = []
    for model in args.models.split(","):
        t0 = time.perf_counter()
        r = time_model(model, args.hidden_layers, args.stack, x, args.rounds)
        rows.append(r)
        ms, per = r["ms_per_step"], r["ms_per_step_per_run"]
        print(f"{model}, {args.hidden_layers} hidden layers ({r['settings']}) [{time.perf_counter() - t0:.0f} s]")
        for k in ms:
            print(f"  {k:<22} {ms[k]:7.2f} ms a step  ({per[k]:.2f} per run)")
        print(
            f"  compiled / eager: {r['speedup_single']:.2f}x alone, {r['speedup_stack']:.2f}x stacked; compiled "
            f"stack per run against one eager run: {r['compiled_stack_vs_eager_single_per_run']:.2f}x"
        )
    if args.out:
        rec = {"benchmark": "compile_steps", "synthetic": synthetic, "machine": machine, "args": vars(args)}
        Path(args.out).write_text(json.dumps({**rec, "rows": rows}, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
