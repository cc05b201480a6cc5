"""Measurement (not a test): what the bring-your-own-flow adapter costs per training step.

A zuko MAF trained through :mod:`flowbench.models.adapters` (``flow.train_log_prob(x).mean()``, as the trainer
computes its loss) against the same zuko flow in a plain zuko loop (``-zflow().log_prob(x).mean()``): both
from the same initial weights, Adam (lr 1e-4), batch 100 of synthetic Gaussian data, forward + backward +
step. Rounds alternate between the two (so drift of a shared machine hits both), and the median of the rounds
is compared: throughput ratio = adapter samples/s ÷ zuko samples/s (goal ≥ 0.95).

    OMP_NUM_THREADS=1 PYTHONPATH=. python tests/benchmarks/adapter_overhead.py [--dims 6 64] [--rounds 15]

Measured (2 shared CPU cores, one thread, zuko 1.6.0, torch 2.13 CPU; MAF with zuko's defaults: 3
transforms, hidden (64, 64); medians of 15 rounds of 50 steps; three runs of the script):

- D = 6 (16,164 parameters): adapter 1.78–1.84 ms/step, zuko 1.78–1.82 ms/step; ratio 0.986–1.000×.
- D = 64 (49,920 parameters): adapter 2.36–2.47 ms/step, zuko 2.41–2.44 ms/step; ratio 0.974–1.025×.

The adapter's loss is zuko's own ``zflow().log_prob(x)`` behind a shape check and one Python call, so the
spread is the machine's noise (a few µs per step at most is the adapter's).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def _steps(loss_fn, x: torch.Tensor, steps: int, opt: torch.optim.Optimizer) -> float:
    """Seconds for ``steps`` training steps on the rows of ``x`` (batch 100, cycled)."""
    t0 = time.perf_counter()
    for i in range(steps):
        b = x[(i * 100) % x.shape[0] :][:100]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(b)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def measure(dim: int, rounds: int, steps: int) -> dict:
    import zuko

    from flowbench.models.adapters import spec_for

    torch.manual_seed(0)
    spec = spec_for(zuko.flows.MAF, "zuko.flows:MAF")
    flow = spec.build(dim, **spec.resolve({}))
    zflow = copy.deepcopy(flow.peer)  # the same initial weights, an independent module
    x = torch.randn(1000, dim) @ torch.randn(dim, dim) * 0.3
    x = (x - x.mean(0)) / x.std(0)
    opt_a = torch.optim.Adam(flow.parameters(), lr=1e-4)
    opt_z = torch.optim.Adam(zflow.parameters(), lr=1e-4)

    def adapter_loss(b: torch.Tensor) -> torch.Tensor:
        return -flow.train_log_prob(b).mean()

    def zuko_loss(b: torch.Tensor) -> torch.Tensor:
        return -zflow().log_prob(b).mean()

    _steps(adapter_loss, x, 5, opt_a)  # warm-up: allocator, first-call paths
    _steps(zuko_loss, x, 5, opt_z)
    times = {"adapter": [], "zuko": []}
    for r in range(rounds):
        order = (("adapter", adapter_loss, opt_a), ("zuko", zuko_loss, opt_z))
        for name, fn, opt in order if r % 2 == 0 else order[::-1]:
            times[name].append(_steps(fn, x, steps, opt))
    med = {k: statistics.median(v) for k, v in times.items()}
    per_s = {k: steps * 100 / v for k, v in med.items()}
    return {
        "dim": dim,
        "params": flow.num_params(),
        "ms_per_step": {k: 1e3 * v / steps for k, v in med.items()},
        "samples_per_s": per_s,
        "ratio": per_s["adapter"] / per_s["zuko"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[6, 64])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=50, help="training steps per round")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for dim in args.dims:
        r = measure(dim, args.rounds, args.steps)
        ms = r["ms_per_step"]
        print(
            f"D = {dim:3d} ({r['params']:,} parameters): adapter {ms['adapter']:.3f} ms/step, "
            f"plain zuko {ms['zuko']:.3f} ms/step; throughput ratio adapter/zuko = {r['ratio']:.3f}×"
        )


if __name__ == "__main__":
    main()
