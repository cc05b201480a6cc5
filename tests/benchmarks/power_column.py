"""Benchmark (not a test): the measured cost of MAF Table 1's POWER column (issue 24, item 3).

Papamakarios, Pavlakou & Murray 2017, "Masked Autoregressive Flow for Density Estimation" (NeurIPS,
arXiv:1705.07057), Table 1, POWER column: Gaussian, MADE, MADE MoG, Real NVP (5)/(10), MAF (5)/(10) and
MAF MoG (5), each trained with 1 and 2 hidden layers (the cells of ``configs/sweeps/maf-table1.toml``, expanded
by flowbench's own sweep code), plus relgrad as ``configs/power/relgrad.toml`` ships it. For every cell:

- **training step**: :func:`flowbench.bench.stacked.run_stack_bench` (the real trainers: one
  :class:`~flowbench.training.trainer.Trainer` per seed one after another, against one
  :class:`~flowbench.training.stacked.StackedTrainer` of ``--seeds`` runs; rounds alternate the two) on rows
  of POWER, at the cell's batch size, learning rate and hyperparameters (``flowbench run``'s resolution:
  defaults < ``configs/power/<model>.toml`` < the sweep's values);
- **evaluation per epoch**: what ``fit`` does after each epoch, timed once on the whole data: the validation
  score (batch-norm statistics from all training rows, then log p of every validation row; ``Trainer._validate``,
  stacked: ``StackedTrainer._validate_all``) and the training NLL on its 1,000-row subsample;
- the Gaussian is fitted in closed form: its fit (``initialize``) and one validation, timed, no epochs.

Then ``s/epoch = steps/epoch × s/step + evaluation``, with steps/epoch = ceil(N_train / batch) for MAF's
POWER (1,659,917 training rows: 16,600 steps at batch 100), and the time to early stopping = assumed epochs ×
s/epoch + one more evaluation (the test set). The assumed epochs per family are printed (``--epochs
FAMILY=N`` changes them); see :data:`EPOCHS` for why each. "h, 3 seq." is ``--seeds`` runs one after another
on one core; "h, stack" is the same runs as one stack (assumes every seed stops at the same epoch). Column
totals: the MAF Table 1 rows (relgrad is not one of them) and the same with relgrad.

Reading the output: ms/step "single" is one run's step; "stack/run" is a stacked step's time divided by
the number of runs (below "single" = stacking pays). On CPU these are core-hours with ``OMP_NUM_THREADS=1``;
on a busy machine they are upper bounds (the machine's load average is printed and stored). A short
``--steps`` (e.g. 60) is enough for a step time to within ~10 %; the evaluation is timed in full.

    OMP_NUM_THREADS=1 python tests/benchmarks/power_column.py --data-root DIR [--device cpu|cuda]
        [--steps 200] [--rounds 4] [--seeds 3] [--epochs maf=120] [--only maf,made] [--compile] [--out FILE.json]

Without POWER under the data root (``DIR/power/data.npy``), exits 2 saying how to get it.

Measured (POWER rebuilt from UCI, 2 shared CPU cores, one thread, torch 2.13 CPU; ``--steps 150 --rounds 3
--eval-fraction 0.25``, 285 s, load average 3.6-4 from other jobs, so this process had 45-50 % of a core), with
the epochs of :data:`EPOCHS`: the 15 cells x 3 seeds to early stopping, 522 core-hours run by run and 348
stacked by wall clock; scaled by each cell's core share, 257 and 171 core-hours on an idle core (relgrad as
shipped adds about 2). Check of that scaling: MAF (5), 1 hidden layer, stacked estimate 132 s/epoch x 50 % =
66 s/epoch, against 68-90 s/epoch measured by the stack of 3 seeds training on the same machine (niced) for
issue 24. Real NVP and MAF with 10 layers or 2 hidden layers are most of it; an epoch's evaluation (batch-norm
statistics over all 1.66 M training rows) is 5-15 % of an epoch for the flows. On a second machine (AMD EPYC,
AVX2, 2 cores; same options, 421 s, 66-71 % of a core), with MADE MoG at its measured 202 epochs: 636 and 358
core-hours (963 and 542 by wall clock); its flow steps take about twice as long. On a third (AMD EPYC, 2
cores, beside two niced trainings; same options), run twice in a row: eager 555 and 345 core-hours on an idle
core (958 and 595 by wall clock, 449 s), ``--compile`` 344 and 196 (541 and 308, 806 s with the compiles).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "configs" / "sweeps" / "maf-table1.toml"

#: Assumed epochs to early stopping (patience 30) per family, for a cell without a step budget; the reasons are
#: printed with the table. Measured lower bounds come from the POWER study (docs/manual/power-study.md): a run
#: that last set a new best validation LL at epoch E stops at epoch E + 30 at the earliest.
EPOCHS: dict[str, int] = {
    "gaussian": 0,
    "made": 60,
    "made-mog": 202,
    "realnvp": 357,
    "maf": 357,
    "maf-mog": 357,
    "relgrad": 54,
}
WHY = {
    "made": "MADE: 60 = best near epoch 30 + patience 30 (assumed, not measured: it trains at lr 1e-3, 10x the "
    "flows', with no batch norm; no MADE run on POWER with its epoch count was found)",
    "made-mog": "MADE MoG: 202, measured: with 2 hidden layers (MAF's choice by validation) on POWER rebuilt from "
    "UCI (3 seeds, stacked) its seeds stopped at epochs 181, 164 and 202 (best at 151, 134, 172), and the stack "
    "trains until the last stops; with 1 hidden layer at 113, 132 and 159",
    "maf": "MAF / MAF MoG / Real NVP: 357, a lower bound: MAF (5) with 1 hidden layer on POWER rebuilt from UCI (3 "
    "seeds, stacked) still set new best validation LLs at epochs 326-327, so the stack stops at epoch 357 at the "
    "earliest",
    "relgrad": "relgrad: its config's step budget (max-steps / steps per epoch: 30 epochs for 498,000 steps at "
    "batch 100), where every cosine-decayed run on POWER ended with its best state; without a budget, 54: the "
    "latest stop of 3 seeds at a constant lr 3e-3 (16 layers, best at epochs 4-24)",
}


def _fail_no_data(root: str | None, why: str) -> None:
    where = root or os.environ.get("FLOWBENCH_DATA") or "data"
    print(
        f"error: no POWER under the data root {where!r} ({why}).\n"
        "Get it with one of:\n"
        "  flowbench download --dataset power --root DIR   (MAF's archive, zenodo 1161203)\n"
        "  a rebuild of POWER from the UCI table, as docs/manual/power-study.md describes (DIR/power/data.npy;\n"
        "  a study copy: numbers on it are never MAF's)\n"
        "then run this script with --data-root DIR.",
        file=sys.stderr,
    )
    sys.exit(2)


def load_power(root: str | None):
    from flowbench.data import load_dataset
    from flowbench.errors import DatasetNotFoundError

    try:
        return load_dataset("power", root)
    except DatasetNotFoundError as e:
        _fail_no_data(root, str(e).splitlines()[0])


def cells() -> list[Any]:
    """RunOptions of every POWER cell of the Table 1 sweep (one seed each), then relgrad's shipped config."""
    from flowbench.config import resolve_options
    from flowbench.sweep.spec import load_sweep

    runs = [r for r in load_sweep(SWEEP).runs if r.dataset == "power" and r.seed == 0]
    opts = [r.options("/nonexistent") for r in runs]
    opts.append(resolve_options({"dataset": "power", "model": "relgrad"}))
    return opts


def _family(model: str) -> str:
    return {"maf-mog": "maf", "realnvp": "maf"}.get(model, model)


def assumed_epochs(model: str, max_steps: int | None, steps_epoch: int, epoch_map: dict[str, int]) -> int:
    """Epochs to early stopping for a cell: ``--epochs`` for the model, then for its family; else a config's step
    budget (``max-steps``: the run ends there, as every cosine-decayed relgrad run on POWER did), else
    :data:`EPOCHS`."""
    fam = _family(model)
    for key in (model, fam):
        if key in epoch_map:
            return epoch_map[key]
    if max_steps is not None:
        return math.ceil(max_steps / steps_epoch)
    return EPOCHS[fam]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _flows(model: str, hparams: dict, dim: int, n: int, init_x: torch.Tensor, dev: torch.device) -> list:
    from flowbench.models import build_model

    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        f = build_model(model, dim, **hparams).to(dev)
        f.initialize(init_x)
        out.append(f)
    return out


def time_eval(opts: Any, train_x: torch.Tensor, val_x: torch.Tensor, seeds: int, dev: torch.device) -> dict:
    """Seconds of one end-of-epoch evaluation, as the trainers' ``fit`` does it: single run, and a stack."""
    from flowbench.models import get_spec
    from flowbench.training.evaluate import training_nll, validation_ll
    from flowbench.training.stacked import RunSpec, StackedTrainer
    from flowbench.training.trainer import Trainer

    hp = get_spec(opts.model).resolve(opts.hparams)
    dim = train_x.shape[1]
    if not get_spec(opts.model).trainable:  # closed form: fit + one validation, as lifecycle does
        torch.manual_seed(0)
        from flowbench.models import build_model

        f = build_model(opts.model, dim, **hp).to(dev)
        _sync(dev)
        t = time.perf_counter()
        f.initialize(train_x)
        validation_ll(f, train_x, val_x, opts.eval_batch_size)
        _sync(dev)
        return {"single_s": time.perf_counter() - t, "stack_s": None}
    (f,) = _flows(opts.model, hp, dim, 1, train_x, dev)
    tr = Trainer(
        f, train_x, val_x, lr=opts.lr, batch_size=opts.batch_size, eval_batch_size=opts.eval_batch_size, progress=False
    )
    _sync(dev)
    t = time.perf_counter()
    ll, _ = tr._validate()
    training_nll(tr.flow, tr.nll_x, tr.eval_batch_size)
    _sync(dev)
    single = time.perf_counter() - t
    res = {"single_s": single, "val_ll_at_init": ll, "stack_s": None}
    if seeds > 1:
        fs = _flows(opts.model, hp, dim, seeds, train_x, dev)
        st = StackedTrainer(
            [RunSpec(g, s, opts.lr) for s, g in enumerate(fs)],
            train_x,
            val_x,
            batch_size=opts.batch_size,
            eval_batch_size=opts.eval_batch_size,
            progress=False,
        )
        _sync(dev)
        t = time.perf_counter()
        vals = st._validate_all(list(range(seeds)))
        for i in vals:
            training_nll(st.runs[i].flow, st.nll_x, st.eval_batch_size)
        _sync(dev)
        res["stack_s"] = time.perf_counter() - t
    return res


def time_cell(
    opts: Any, args: argparse.Namespace, train_x: torch.Tensor, val_x: torch.Tensor, dev: torch.device, n_train: int
) -> dict:
    from flowbench.bench.stacked import run_stack_bench
    from flowbench.models import display_name, get_spec
    from flowbench.training.loop import steps_per_epoch

    spec = get_spec(opts.model)
    hp = spec.resolve(opts.hparams)
    row = {
        "model": opts.model,
        "row": display_name(opts.model, **hp),
        "hidden_layers": hp.get("hidden_layers"),
        "hparams": hp,
        "lr": opts.lr,
        "batch_size": opts.batch_size,
        "trainable": spec.trainable,
    }
    steps_epoch = steps_per_epoch(n_train, opts.batch_size)
    epochs = assumed_epochs(opts.model, opts.max_steps, steps_epoch, args.epoch_map)
    row["epochs_assumed"] = epochs
    t0 = time.perf_counter()
    if spec.trainable:
        lines: list[str] = []
        per_round = max(1, args.steps // args.rounds)
        w0, c0 = time.perf_counter(), time.process_time()
        b = run_stack_bench(
            "power",
            opts.model,
            args.seeds,
            steps=per_round,
            batch_size=opts.batch_size,
            lr=opts.lr,
            hparams=opts.hparams,
            rounds=args.rounds,
            data_root=args.data_root,
            device=str(dev),
            compile=args.compile,
            log=lines.append,
        )
        row["wall_cpu_train_s"] = (time.perf_counter() - w0, time.process_time() - c0)
        if b["synthetic"]:  # load_power has checked; a data root that lost POWER since must not pass silently
            raise RuntimeError("run_stack_bench timed synthetic data: POWER was not found")
        sps = b["samples_per_s"]
        row["params"] = sum(
            p.numel()
            for p in _flows(opts.model, hp, train_x.shape[1], 1, train_x[:1000].cpu(), torch.device("cpu"))[
                0
            ].parameters()
        )
        row["ms_step_single"] = 1e3 * opts.batch_size / sps["sequential"]
        row["ms_step_stack_per_run"] = 1e3 * opts.batch_size / sps["stacked"]
        row["stack_over_sequential"] = b["ratio"]
        row["steps_timed_per_run"] = per_round * args.rounds
    # evaluation on the first fraction f of the rows (the recipe has shuffled them), scaled by 1/f: linear in rows
    f = args.eval_fraction
    nt, nv = max(1, round(f * train_x.shape[0])), max(1, round(f * val_x.shape[0]))
    w0, c0 = time.perf_counter(), time.process_time()
    ev = time_eval(opts, train_x[:nt], val_x[:nv], args.seeds if spec.trainable else 1, dev)
    row["wall_cpu_eval_s"] = (time.perf_counter() - w0, time.process_time() - c0)
    ev = {k: (v * train_x.shape[0] / nt if k.endswith("_s") and v is not None else v) for k, v in ev.items()}
    row["eval_s_single"], row["eval_s_stack"] = ev["single_s"], ev["stack_s"]
    row["eval_fraction"] = f
    if spec.trainable:
        row["steps_per_epoch"] = steps_epoch
        row["s_epoch_single"] = steps_epoch * row["ms_step_single"] / 1e3 + ev["single_s"]
        stack_eval = ev["stack_s"] if ev["stack_s"] is not None else args.seeds * ev["single_s"]
        row["s_epoch_stack"] = steps_epoch * row["ms_step_stack_per_run"] * args.seeds / 1e3 + stack_eval
        row["h_one_run"] = (epochs * row["s_epoch_single"] + ev["single_s"]) / 3600
        row["h_seeds_sequential"] = args.seeds * row["h_one_run"]
        row["h_seeds_stacked"] = (epochs * row["s_epoch_stack"] + stack_eval) / 3600
    else:
        row["params"] = None
        row["h_one_run"] = ev["single_s"] / 3600
        row["h_seeds_sequential"] = row["h_seeds_stacked"] = args.seeds * row["h_one_run"]
    row["bench_wall_s"] = time.perf_counter() - t0
    # the share of a core this process got while timing (1 = it never waited): the wall times above, times it,
    # estimate the time on an idle core (a busy machine's wall times are upper bounds)
    # (process CPU time / wall time over the cell's timing; one thread, so at most 1; not measured on a GPU)
    wc = [row[k] for k in ("wall_cpu_train_s", "wall_cpu_eval_s") if k in row]
    row["core_share"] = 1.0 if dev.type != "cpu" else min(1.0, sum(c for _, c in wc) / sum(w for w, _ in wc))
    return row


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict], seeds: int) -> str:
    head = (
        f"{'row':<19}{'hl':>3}{'params':>8}{'ms/step':>9}{'stack/run':>10}{'eval s':>8}{'s/epoch':>9}"
        f"{'stack s/ep':>11}{'epochs':>7}{'h, 1 run':>9}{f'h, {seeds} seq.':>10}{'h, stack':>9}{'core':>6}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['row']:<19}{_f(r['hidden_layers'], 'd'):>3}{_f(r['params'], ',d'):>8}"
            f"{_f(r.get('ms_step_single'), '.2f'):>9}{_f(r.get('ms_step_stack_per_run'), '.2f'):>10}"
            f"{r['eval_s_single']:>8.1f}{_f(r.get('s_epoch_single'), '.0f'):>9}"
            f"{_f(r.get('s_epoch_stack'), '.0f'):>11}{r['epochs_assumed']:>7d}{r['h_one_run']:>9.1f}"
            f"{r['h_seeds_sequential']:>10.1f}{r['h_seeds_stacked']:>9.1f}{r['core_share']:>6.0%}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="a data root holding power/ (default: $FLOWBENCH_DATA or data)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--steps", type=int, default=200, help="timed training steps per run and cell (default 200)")
    p.add_argument("--rounds", type=int, default=4, help="blocks the steps are split into (default 4)")
    p.add_argument("--seeds", type=int, default=3, help="runs per stack and per cell (default 3)")
    p.add_argument(
        "--epochs",
        action="append",
        default=[],
        metavar="FAMILY=N",
        help="assumed epochs to early stopping for a model or family (made, maf, relgrad, ...)",
    )
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=1.0,
        help="time the evaluation on this fraction of the rows and scale up (default 1: all rows)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="time the training steps through torch.compile, as `flowbench run --compile` and sweeps with "
        "compile = true train (the compile happens in an untimed round)",
    )
    p.add_argument("--only", default=None, help="comma-separated models to time (default: all)")
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.seeds < 1:
        p.error("--steps, --rounds and --seeds must be >= 1")
    if not 0 < args.eval_fraction <= 1:
        p.error("--eval-fraction must be in (0, 1]")
    args.epoch_map = {}
    for item in args.epochs:
        k, _, v = item.partition("=")
        if not v.isdigit():
            p.error(f"--epochs takes FAMILY=N; got {item!r}")
        args.epoch_map[k] = int(v)

    from flowbench.bench.common import machine_info
    from flowbench.data import get_info
    from flowbench.utils import resolve_device

    root = args.data_root
    if root is not None and not (Path(root) / "power").is_dir():
        _fail_no_data(root, f"{Path(root) / 'power'} does not exist")
    ds = load_power(root)
    dev = resolve_device(args.device)
    n_train_maf = int(get_info("power").sizes[0])
    train_x = torch.as_tensor(ds.train, dtype=torch.float32).to(dev)
    val_x = torch.as_tensor(ds.val, dtype=torch.float32).to(dev)
    machine = machine_info()
    print(
        f"POWER from {root or os.environ.get('FLOWBENCH_DATA') or 'data'}: {train_x.shape[0]:,} train, "
        f"{val_x.shape[0]:,} validation rows (epochs counted at MAF's {n_train_maf:,} training rows); device "
        f"{dev}, {machine['threads']} thread(s), torch {machine['torch']}, load average {machine['loadavg']}"
        + (", training steps compiled (torch.compile)" if args.compile else "")
    )
    opts = cells()
    if args.only:
        keep = set(args.only.split(","))
        opts = [o for o in opts if o.model in keep]
    rows = []
    t0 = time.perf_counter()
    for o in opts:
        r = time_cell(o, args, train_x, val_x, dev, n_train_maf)
        rows.append(r)
        print(
            f"  {r['row']:<19} hl {_f(r['hidden_layers'], 'd')}: {_f(r.get('ms_step_single'), '.2f')} ms/step, "
            f"stacked {_f(r.get('ms_step_stack_per_run'), '.2f')} ms/step/run, eval {r['eval_s_single']:.1f} s "
            f"(stack {_f(r['eval_s_stack'], '.1f')} s)  [{r['bench_wall_s']:.0f} s]",
            flush=True,
        )
    print()
    print(table(rows, args.seeds))
    col = [r for r in rows if r["model"] != "relgrad"]
    totals = {
        "column_h_sequential": sum(r["h_seeds_sequential"] for r in col),
        "column_h_stacked": sum(r["h_seeds_stacked"] for r in col),
        "with_relgrad_h_sequential": sum(r["h_seeds_sequential"] for r in rows),
        "with_relgrad_h_stacked": sum(r["h_seeds_stacked"] for r in rows),
    }
    # each cell's wall-clock figure times the share of a core the process had while timing it
    for k, pick in (("column", col), ("with_relgrad", rows)):
        for how in ("sequential", "stacked"):
            totals[f"{k}_h_{how}_idle_core"] = sum(r[f"h_seeds_{how}"] * r["core_share"] for r in pick)
    unit = "GPU-hours" if dev.type == "cuda" else "CPU core-hours" if torch.get_num_threads() == 1 else "hours"
    print(
        f"\nMAF Table 1 POWER column ({len(col)} cells), {args.seeds} seeds each, to early stopping on {dev}: "
        f"{totals['column_h_sequential']:.0f} {unit} run by run, {totals['column_h_stacked']:.0f} stacked "
        f"({args.seeds} seeds per stack)"
    )
    if dev.type == "cpu":
        print(
            f"  on an idle core (each cell x its 'core' share, the CPU time the process got while timed): "
            f"{totals['column_h_sequential_idle_core']:.0f} run by run, {totals['column_h_stacked_idle_core']:.0f} "
            "stacked"
        )
    if len(rows) > len(col):
        print(
            f"with relgrad: {totals['with_relgrad_h_sequential']:.0f} run by run, "
            f"{totals['with_relgrad_h_stacked']:.0f} stacked"
            + (
                f" (idle core: {totals['with_relgrad_h_sequential_idle_core']:.0f} and "
                f"{totals['with_relgrad_h_stacked_idle_core']:.0f})"
                if dev.type == "cpu"
                else ""
            )
        )
    used = {r["row"]: r["epochs_assumed"] for r in rows if r["trainable"]}
    print(
        "Assumed epochs to early stopping (--epochs FAMILY=N to change; used here: "
        + ", ".join(f"{k} {v}" for k, v in used.items())
        + "), by default:"
    )
    for line in WHY.values():
        print(f"  - {line}")
    print(
        f"Measured in {time.perf_counter() - t0:.0f} s ({args.steps} steps per run and cell, {args.rounds} rounds; "
        f"one evaluation per cell on {args.eval_fraction:.0%} of the rows, scaled); load average now "
        f"{os.getloadavg() if hasattr(os, 'getloadavg') else None}."
    )
    if args.out:
        rec = {
            "benchmark": "power_column",
            "paper": "Papamakarios et al. 2017 (arXiv:1705.07057), Table 1, POWER",
            "data_root": str(root),
            "n_train_rows_timed": int(train_x.shape[0]),
            "n_train_epoch": n_train_maf,
            "n_val_rows": int(val_x.shape[0]),
            "device": str(dev),
            "seeds": args.seeds,
            "steps": args.steps,
            "rounds": args.rounds,
            "eval_fraction": args.eval_fraction,
            "compile": args.compile,
            "epochs_assumed": {**EPOCHS, **args.epoch_map},
            "why_epochs": WHY,
            "unit": unit,
            "machine": machine,
            "rows": rows,
            "totals_h": totals,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rec, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
