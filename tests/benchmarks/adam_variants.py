"""Measurement (not a test): do the reference codes' Adam variants change the result of a run? (issue 13)

Two comparisons on ``digits`` (sklearn 8×8, D = 64, 1,457 training images, 15 steps per epoch at batch 100),
each pair trained from the same initial weights and on the same batches (same seed: ``run_experiment`` seeds
the initialisation and the shuffle generator from it; only the optimiser differs):

(a) MAF(5), hidden 100, otherwise ``configs/digits/maf.toml`` (lr 1e-4, batch norm), epochs capped at
    ``--maf-epochs``: torch's Adam (flowbench's default) vs the MAF authors' Adam, :class:`MafCodeAdam`.
(b) relgrad, ``configs/digits/relgrad.toml``, epochs capped at ``--relgrad-epochs``: torch's Adam vs
    ``adam_epoch_step`` (the relgrad authors' jax loop, :class:`flowbench.training.optim.EpochStepAdam`).

The MAF code's Adam (gpapamak/maf, ``ml/step_strategies.py`` class ``Adam``, commit db090d6) in Theano:
``bm_t``/``bv_t`` start at β₁/β₂ and are multiplied by β once more *before* each step is formed, so the
t-th step (1-based) uses the powers β^(t+1); and ε goes inside the square root, scaled by the bias correction::

    m ← β₁m + (1−β₁)g,   v ← β₂v + (1−β₂)g²
    x ← x − a·sqrt(1−β₂^(t+1))/(1−β₁^(t+1)) · m / sqrt(v + ε·(1−β₂^(t+1)))
      = x − a · m̂ / sqrt(v̂ + ε)        with m̂ = m/(1−β₁^(t+1)), v̂ = v/(1−β₂^(t+1))

torch's Adam: ``x ← x − a · m̂ / (sqrt(v̂) + ε)`` with the powers β^t. Both use ε = 1e-8, β = 0.9/0.999;
the L2 term (1e-6/2)‖w‖² is in the gradient in both (``lf.WeightDecay`` over all parameters in the MAF code).

Writes ``adam_variants.json`` and prints a table: test LL ± 2 SE per run, and per pair the difference
(variant − torch) with its mean ± 2 SE over seeds.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tests/benchmarks/adam_variants.py [--seeds 0 1 2] [--out DIR]

Measured (2 CPU cores shared, one thread; about 1 minute per seed for both pairs; seeds 0, 1, 2):

- (a) MAF, 60 epochs (all still improving at 60): torch −121.70/−120.62/−121.25 (± 1.9–2.4 test 2 SE);
  MAF-code Adam − torch = +0.013 ± 0.011 nats (2 SE over seeds; +0.003..+0.021), against a seed s.d. of 0.55.
  To early stopping (cap 300, seeds 0, 1): −119.10/−118.90, difference +0.035/+0.005, the same best epochs
  (115, 121). Not measurable, so flowbench offers no option for it: torch's Adam stands in for the MAF code's.
- (b) relgrad, 150 epochs: torch −113.49/−112.67/−112.67; adam_epoch_step − torch = −2.40 ± 0.59 nats
  (−2.96..−1.96), seed s.d. 0.48; the epoch-step runs were still improving at the cap (best epoch 149–150).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import flowbench.training.trainer as trainer_mod
from flowbench.config import resolve_options
from flowbench.training import run_experiment


class MafCodeAdam(torch.optim.Optimizer):
    """Adam as in gpapamak/maf ``ml/step_strategies.py`` (Papamakarios et al. 2017): ε inside the square
    root, step ``a·sqrt(1−β₂ᵗ⁺¹)/(1−β₁ᵗ⁺¹)`` (the Theano code's counters are one power ahead)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.t = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        for group in self.param_groups:
            b1, b2 = group["betas"]
            bm_t, bv_t = b1 ** (self.t + 1), b2 ** (self.t + 1)
            step = group["lr"] * math.sqrt(1 - bv_t) / (1 - bm_t)
            eps = group["eps"] * (1 - bv_t)
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                st = self.state[p]
                if not st:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = st["m"], st["v"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.addcdiv_(m, (v + eps).sqrt_(), value=-step)
        return None


def _reference_update_check() -> None:
    """The class against the formula written out by hand in float64 (guards the script's own optimiser)."""
    rng = np.random.RandomState(0)
    x0, grads, a, b1, b2, e = rng.randn(4), rng.randn(6, 4) * 1e-3, 1e-2, 0.9, 0.999, 1e-8
    x, m, v = x0.copy(), np.zeros(4), np.zeros(4)
    for t, g in enumerate(grads, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        x = x - a * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1)) * m / np.sqrt(v + e * (1 - b2 ** (t + 1)))
    p = torch.nn.Parameter(torch.tensor(x0))
    opt = MafCodeAdam([p], lr=a)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), x, rtol=1e-12, atol=1e-15)


def run(config: str, extra: dict, seed: int, out: str, maf_code_adam: bool = False) -> dict:
    opts = resolve_options(
        {
            "config": config,
            "seed": seed,
            "out": out,
            "quiet": True,
            "force": True,
            "threads": 1,
            "tag": f"v{time.perf_counter_ns()}",
            **extra,
        }
    )
    original = trainer_mod.make_adam
    if maf_code_adam:  # the Trainer builds its optimiser through this module-level function
        trainer_mod.make_adam = lambda params, lr, weight_decay: MafCodeAdam(params, lr=lr, weight_decay=weight_decay)
    t0 = time.perf_counter()
    try:
        rec = run_experiment(opts, progress=False)
    finally:
        trainer_mod.make_adam = original
    return {
        "seed": seed,
        "test_ll": rec.test_ll,
        "test_ll_2se": rec.test_ll_2se,
        "best_val_ll": rec.best_val_ll,
        "epochs": rec.epochs,
        "best_epoch": rec.best_epoch,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--maf-epochs", type=int, default=60)
    ap.add_argument("--relgrad-epochs", type=int, default=150)
    ap.add_argument("--only", choices=["maf", "relgrad"], default=None)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    torch.set_num_threads(1)
    _reference_update_check()
    pairs = {
        "maf": (
            "configs/digits/maf.toml",
            {"hidden": 100, "max-epochs": args.maf_epochs},
            ("torch Adam", {}),
            ("MAF-code Adam", {"maf_code_adam": True}),
        ),
        "relgrad": (
            "configs/digits/relgrad.toml",
            {"max-epochs": args.relgrad_epochs},
            ("torch Adam", {}),
            ("adam_epoch_step", {"epoch_step": True}),
        ),
    }
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, extra, (base_label, _), (var_label, var)) in pairs.items():
            if args.only and name != args.only:
                continue
            rows = []
            for s in args.seeds:
                base = run(config, extra, s, tmp)
                var_extra = {**extra, **({"adam-epoch-step": True} if var.get("epoch_step") else {})}
                variant = run(config, var_extra, s, tmp, maf_code_adam=var.get("maf_code_adam", False))
                rows.append(
                    {"seed": s, base_label: base, var_label: variant, "diff": variant["test_ll"] - base["test_ll"]}
                )
                print(
                    f"{name} seed {s}: {base_label} {base['test_ll']:.2f} ± {base['test_ll_2se']:.2f} "
                    f"(best epoch {base['best_epoch']}/{base['epochs']}, {base['wall_s']} s) | {var_label} "
                    f"{variant['test_ll']:.2f} ± {variant['test_ll_2se']:.2f} (best epoch "
                    f"{variant['best_epoch']}/{variant['epochs']}) | diff {rows[-1]['diff']:+.3f}",
                    flush=True,
                )
            d = np.array([r["diff"] for r in rows])
            se2 = 2 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan
            base_ll = np.array([r[base_label]["test_ll"] for r in rows])
            summary = {
                "diff_mean": float(d.mean()),
                "diff_2se_over_seeds": float(se2),
                "diff_min": float(d.min()),
                "diff_max": float(d.max()),
                "base_seed_sd": float(base_ll.std(ddof=1)) if len(d) > 1 else math.nan,
            }
            results[name] = {"config": config, "extra": extra, "runs": rows, "summary": summary}
            print(
                f"{name}: {var_label} − {base_label} = {d.mean():+.3f} ± {se2:.3f} (2 SE over {len(d)} seeds; "
                f"range {d.min():+.3f}..{d.max():+.3f}); seed s.d. of {base_label}: {summary['base_seed_sd']:.3f}",
                flush=True,
            )
    path = Path(args.out) / "adam_variants.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
