"""flowbench's MAF and Real NVP against nflows' and zuko's, on digits, at equal parameter counts (issue 13).

A script, not a test (pytest does not collect it)::

    OMP_NUM_THREADS=1 python tests/benchmarks/compare_libraries.py [--max-epochs 40] [--lr 1e-3] [--seeds 0]

Every model is trained by flowbench's own Trainer (Adam, batch 100, L2 1e-6, patience early stopping on the
validation split, best state restored) so only the architecture differs. The libraries' widths are solved so
their parameter counts match flowbench's as configured in configs/digits/{maf,realnvp}.toml (5 layers,
128 hidden, batch norm). Prints one line per model: parameters, test LL ± 2 SE (nats, logit space).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from flowbench.config import resolve_options
from flowbench.data import load_dataset
from flowbench.training.evaluate import log_prob_batches, mean_2se
from flowbench.training.lifecycle import build_from_options
from flowbench.training.trainer import Trainer


class LibraryFlow(nn.Module):
    """The Trainer's interface around an nflows / zuko density (no batch norm, no gradient adjustment)."""

    trainable = True

    def __init__(self, log_prob):
        super().__init__()
        self.net = log_prob.__self__ if hasattr(log_prob, "__self__") else None
        self._lp = log_prob

    def log_prob(self, x):
        return self._lp(x)

    train_log_prob = log_prob

    def prepare_for_eval(self, train_x, batch_size=10_000):
        pass


def nflows_maf(d, h):
    from nflows.flows import MaskedAutoregressiveFlow

    return MaskedAutoregressiveFlow(d, h, num_layers=5, num_blocks_per_layer=1)


def nflows_realnvp(d, h):
    from nflows.flows import SimpleRealNVP

    return SimpleRealNVP(d, h, num_layers=5, num_blocks_per_layer=1)


class Zuko(nn.Module):
    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def log_prob(self, x):
        return self.flow().log_prob(x)


def zuko_maf(d, h):
    import zuko

    return Zuko(zuko.flows.MAF(d, transforms=5, hidden_features=(h, h)))


def zuko_realnvp(d, h):
    import zuko

    return Zuko(zuko.flows.RealNVP(d, transforms=5, hidden_features=(h, h)))


def count(m):
    return sum(p.numel() for p in m.parameters())


def matched(build, d, target):
    """The width whose parameter count is closest to ``target``."""
    best = min(range(4, 1024), key=lambda h: abs(count(build(d, h)) - target) if h % 4 == 0 else 1e18)
    return build(d, best), best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("digits")
    tr, va, te = (torch.tensor(a) for a in (data.train, data.val, data.test))
    d = data.dim
    for family, libs in (
        ("maf", [("nflows MAF", nflows_maf), ("zuko MAF", zuko_maf)]),
        ("realnvp", [("nflows SimpleRealNVP", nflows_realnvp), ("zuko RealNVP", zuko_realnvp)]),
    ):
        for seed in args.seeds:
            torch.manual_seed(seed)
            opts = resolve_options({"dataset": "digits", "model": family})
            ours, hp, _ = build_from_options(opts, d)
            target = count(ours)
            entries = [(f"flowbench {ours.__class__.__name__} {family} (hidden {hp['hidden']})", ours)]
            for name, build in libs:
                torch.manual_seed(seed)
                lib, h = matched(build, d, target)
                entries.append((f"{name} (hidden {h})", LibraryFlow(lib.log_prob)))
                entries[-1][1].add_module("lib", lib)
            for name, flow in entries:
                t0 = time.perf_counter()
                if hasattr(flow, "initialize"):
                    flow.initialize(tr)
                res = Trainer(
                    flow,
                    tr,
                    va,
                    lr=args.lr,
                    patience=args.patience,
                    max_epochs=args.max_epochs,
                    seed=seed,
                    progress=False,
                ).fit()
                mean, se2 = mean_2se(log_prob_batches(flow, te))
                print(
                    f"{name:45s} seed {seed}  params {count(flow):7d}  epochs {res.epochs:3d} "
                    f"(best {res.best_epoch})  test LL {mean:9.2f} ± {se2:5.2f}  {time.perf_counter() - t0:6.1f} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
