"""Stacked vs sequential training throughput (issue 11): R runs as one stack against the same R runs one
after another, timed side by side in one invocation on the same data and minibatch schedule.

Each contender runs the real training code: one epoch of :class:`~flowbench.training.trainer.Trainer` per
run (sequential) and one epoch of :class:`~flowbench.training.stacked.StackedTrainer` (stacked), on
``steps · batch_size`` rows of the dataset (its shape with N(0, I) rows when it is not prepared). Rounds
alternate the two so that a change in machine load hits both.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from flowbench import models
from flowbench.bench.common import setup
from flowbench.bench.train import dataset_tensor
from flowbench.data import get_info
from flowbench.errors import ConfigError
from flowbench.training.stacked import RunSpec, StackedTrainer
from flowbench.training.trainer import Trainer
from flowbench.utils import atomic_write_json, resolve_device

__all__ = ["run_stack_bench"]


def run_stack_bench(
    dataset: str,
    model: str,
    stack: int,
    *,
    steps: int = 50,
    batch_size: int = 100,
    lr: float = 1e-4,
    hparams: dict | None = None,
    rounds: int = 5,
    data_root: str | Path | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    threads: int | None = None,
    compile: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Samples/s of ``stack`` stacked runs and of the same runs trained sequentially, on ``device``; the ratio.
    ``compile``: both contenders' objectives through ``torch.compile``, as ``flowbench run --compile`` (the
    compile happens in the untimed first round). With ``out``, also written to
    ``out/bench/train-<dataset>-<model>-stack<R>[-compiled].json`` (``"files"``)."""
    if stack < 1 or steps < 1 or batch_size < 1 or rounds < 1:
        raise ConfigError(
            f"--stack, --steps, --batch-size and rounds must be ≥ 1; got {stack}, {steps}, {batch_size}, {rounds}"
        )
    if out is not None:
        folder, dev, _ = setup(out, device, threads, log)
    else:
        folder, dev = None, resolve_device(device)
    x, _, synthetic = dataset_tensor(dataset, data_root, max_rows=steps * batch_size)
    x = x[: steps * batch_size].to(dev)  # the trainers train where their data are
    hp = models.get_spec(model).resolve(hparams or {})
    trainers, st = _contenders(model, hp, stack, x, dev, lr, batch_size, compile)
    times = _time_rounds(trainers, st, stack, rounds, dev)
    res = {
        "dataset": dataset,
        "model": model,
        "hparams": hp,
        "stack": stack,
        "steps": steps,
        "batch_size": batch_size,
        "synthetic": synthetic,
        "threads": torch.get_num_threads(),
        "compile": compile,
        "samples_per_s": {k: stack * steps * batch_size / statistics.median(v) for k, v in times.items()},
    }
    res["ratio"] = res["samples_per_s"]["stacked"] / res["samples_per_s"]["sequential"]
    _log_result(res, times, x.shape[1], log)
    res["device"] = str(dev)
    if folder is not None:
        suffix = "-compiled" if compile else ""
        path = folder / f"train-{get_info(dataset).name}-{models.get_spec(model).name}-stack{stack}{suffix}.json"
        atomic_write_json(path, res)
        res["files"] = [str(path)]
    return res


def _contenders(
    model: str, hp: dict, stack: int, x: torch.Tensor, dev: torch.device, lr: float, batch_size: int, compile: bool
) -> tuple[list[Trainer], StackedTrainer]:
    """One trainer per run (sequential) and one stacked trainer, each over its own build of the same flows."""
    seq_flows, st_flows = _flows(model, hp, stack, x, dev), _flows(model, hp, stack, x, dev)
    trainers = [
        Trainer(f, x, x[:1], lr=lr, batch_size=batch_size, seed=s, progress=False, compile=compile)
        for s, f in enumerate(seq_flows)
    ]
    specs = [RunSpec(f, s, lr) for s, f in enumerate(st_flows)]
    st = StackedTrainer(specs, x, x[:1], batch_size=batch_size, progress=False, compile=compile)
    return trainers, st


def _flows(model: str, hp: dict, stack: int, x: torch.Tensor, dev: torch.device) -> list[Any]:
    """The ``stack`` runs' flows, seeded 0, 1, … and initialised on ``x``: the same for both contenders."""
    out = []
    for seed in range(stack):
        torch.manual_seed(seed)
        f = models.build_model(model, x.shape[1], **hp).to(dev)
        f.initialize(x)
        out.append(f)
    return out


def _time_rounds(
    trainers: list[Trainer], st: StackedTrainer, stack: int, rounds: int, dev: torch.device
) -> dict[str, list[float]]:
    """Seconds of one epoch of each contender per round, the two alternating; round 0 warms up, untimed."""

    def now() -> float:  # a GPU's queued work counts where it was queued
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    times: dict[str, list[float]] = {"sequential": [], "stacked": []}
    for rnd in range(rounds + 1):
        t = now()
        for tr in trainers:
            tr._train_period(tr.batches_per_epoch)  # one epoch of steps
        seq = now() - t
        t = now()
        st._train_epoch(list(range(stack)))
        stk = now() - t
        if rnd:
            times["sequential"].append(seq)
            times["stacked"].append(stk)
    return times


def _log_result(res: dict[str, Any], times: dict[str, list[float]], dim: int, log: Callable[[str], None]) -> None:
    """Both contenders' throughput and their ratio, one line each."""
    stack, steps, batch_size, synthetic = res["stack"], res["steps"], res["batch_size"], res["synthetic"]
    log(
        f"{models.display_name(res['model'], **res['hparams'])} on {res['dataset']}'s shape (D = {dim}, batch "
        f"{batch_size}, {steps} steps per run, {torch.get_num_threads()} thread(s)"
        f"{', compiled' if res['compile'] else ''}{', synthetic data' if synthetic else ''}):"
    )
    for k in ("sequential", "stacked"):
        log(
            f"  {stack:3d} runs {k:>10}: {res['samples_per_s'][k]:10.0f} samples/s "
            f"({statistics.median(times[k]) / steps * 1e3:8.2f} ms per step of all {stack})"
        )
    log(f"  stacked / sequential: {res['ratio']:.2f}×")
