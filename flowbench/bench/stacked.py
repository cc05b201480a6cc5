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
from flowbench.errors import ConfigError

__all__ = ["run_stack_bench"]


def run_stack_bench(dataset: str, model: str, stack: int, *, steps: int = 50, batch_size: int = 100,
                    lr: float = 1e-4, hparams: dict | None = None, rounds: int = 5, data_root: str | Path | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Samples/s of ``stack`` stacked runs and of the same runs trained sequentially; the ratio."""
    from flowbench.bench.train import dataset_tensor
    from flowbench.training.stacked import RunSpec, StackedTrainer
    from flowbench.training.trainer import Trainer

    if stack < 1 or steps < 1 or batch_size < 1 or rounds < 1:
        raise ConfigError(f"--stack, --steps, --batch-size and rounds must be ≥ 1; got {stack}, {steps}, "
                          f"{batch_size}, {rounds}")
    x, _, synthetic = dataset_tensor(dataset, data_root, max_rows=steps * batch_size)
    x = x[: steps * batch_size]
    hp = models.get_spec(model).resolve(hparams or {})

    def flows():
        out = []
        for seed in range(stack):
            torch.manual_seed(seed)
            f = models.build_model(model, x.shape[1], **hp)
            f.initialize(x)
            out.append(f)
        return out

    seq_flows, st_flows = flows(), flows()
    trainers = [Trainer(f, x, x[:1], lr=lr, batch_size=batch_size, seed=s, progress=False)
                for s, f in enumerate(seq_flows)]
    st = StackedTrainer([RunSpec(f, s, lr) for s, f in enumerate(st_flows)], x, x[:1], batch_size=batch_size,
                        progress=False)
    times: dict[str, list[float]] = {"sequential": [], "stacked": []}
    for rnd in range(rounds + 1):  # round 0 warms up
        t = time.perf_counter()
        for tr in trainers:
            tr._train_period(tr.batches_per_epoch)  # one epoch of steps
        seq = time.perf_counter() - t
        t = time.perf_counter()
        st._train_epoch(list(range(stack)))
        stk = time.perf_counter() - t
        if rnd:
            times["sequential"].append(seq)
            times["stacked"].append(stk)
    samples = stack * steps * batch_size
    res = {"dataset": dataset, "model": model, "hparams": hp, "stack": stack, "steps": steps,
           "batch_size": batch_size, "synthetic": synthetic, "threads": torch.get_num_threads(),
           "samples_per_s": {k: samples / statistics.median(v) for k, v in times.items()}}
    res["ratio"] = res["samples_per_s"]["stacked"] / res["samples_per_s"]["sequential"]
    log(f"{models.display_name(model, **hp)} on {dataset}'s shape (D = {x.shape[1]}, batch {batch_size}, "
        f"{steps} steps per run, {torch.get_num_threads()} thread(s){', synthetic data' if synthetic else ''}):")
    for k in ("sequential", "stacked"):
        log(f"  {stack:3d} runs {k:>10}: {res['samples_per_s'][k]:10.0f} samples/s "
            f"({statistics.median(times[k]) / steps * 1e3:8.2f} ms per step of all {stack})")
    log(f"  stacked / sequential: {res['ratio']:.2f}×")
    return res
