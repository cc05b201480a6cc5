"""Measurement (not a test): how depth, learning rate and the bias rule change relgrad's result and stability.

Gresele et al. 2020 (NeurIPS, appendix H.3) grid-searched depth, learning rate and batch size per dataset; the
values are not legible in our copy, and on POWER our 2-layer, lr 1e-3 configuration got worse after epoch 2
(issue 16). This script trains the relgrad dense flow with the MAF protocol's trainer (Adam, L2 1e-6,
patience 30, best-validation state kept; :class:`flowbench.training.trainer.Trainer`) on

- ``digits`` (sklearn 8×8, logit space, D = 64, 1,457 training points: 15 steps per epoch), and
- the three 2-D toy sets of the paper's Figure 2 (``flowbench.sanity.toy2d``; 5,000 points, 50 steps/epoch),

for depths 2/4/8/16 × a few learning rates × three bias variants: the reference code's bias rule (the
published numbers), the full augmented-matrix rule (``bias_logdet``) and no bias at all. Each run records the
best and final validation LL, whether training went non-finite, the condition number of every W_k after each
epoch (the final one and the largest seen), and whether the model's singular-drift warning
(``relgrad layer k: weight matrix is (close to) singular``) fired. Writes ``relgrad_depth.json`` (every run,
with its validation curve) and ``relgrad_depth.md`` (tables) under ``--out``.

Long runs (``--long-*``): moons at 2 and 8 layers for up to 300 epochs (15,000 steps, about one POWER epoch).
``--alpha`` sets the smooth leaky ReLU slope (0.3 by default; the authors' JAX code used 0.01).
Budget: one thread, epochs capped (200 on digits, 60 on the toys by default), 116 runs; about 20 minutes on
an idle core (46 minutes measured on a 2-core machine shared with four other jobs). The JSON and Markdown
are rewritten after every run. The step counts are small next to POWER's (16,000 steps per epoch at batch 100),
so "stable here" is
necessary, not sufficient, for "stable on POWER".

    OMP_NUM_THREADS=1 python tests/benchmarks/relgrad_depth.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowbench.data import prepare_dataset
from flowbench.models import build_model
from flowbench.models.params import count_params
from flowbench.sanity.toy2d import make_toy
from flowbench.training.trainer import EpochInfo, Trainer

#: Bias variants: model hyperparameters for each.
BIAS_RULES: dict[str, dict[str, bool]] = {
    "reference": {"bias": True, "bias_logdet": False},  # the reference code, as published
    "augmented": {"bias": True, "bias_logdet": True},  # the full projected rule of appendix F
    "none": {"bias": False, "bias_logdet": False},
}
#: A run "fell back" when its last validation LL is this many nats per dimension below its best.
FALL_PER_DIM = 0.05


def _conds(flow) -> list[float]:
    """cond(W_k) = σ_max/σ_min per layer, in float64 (inf for a singular or non-finite W)."""
    out = []
    for w in flow.transform.weights:
        w64 = w.detach().double()
        if not bool(torch.isfinite(w64).all()):
            out.append(math.inf)
            continue
        s = torch.linalg.svdvals(w64)
        out.append(float(s[0] / s[-1]) if float(s[-1]) > 0 else math.inf)
    return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_one(
    data,
    layers: int,
    lr: float,
    rule: str,
    max_epochs: int,
    patience: int,
    seed: int,
    phase: str = "grid",
    alpha: float = 0.3,
) -> dict[str, Any]:
    """Train one configuration; returns its measurement record."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    flow = build_model("relgrad", data.dim, layers=layers, alpha=alpha, **BIAS_RULES[rule])
    train_x = torch.as_tensor(np.asarray(data.train), dtype=torch.float32)
    val_x = torch.as_tensor(np.asarray(data.val), dtype=torch.float32)
    test_x = torch.as_tensor(np.asarray(data.test), dtype=torch.float32)
    per_epoch_cond: list[float] = []  # max over layers after each epoch
    train_curve: list[float | None] = []  # exact train LL (the objective leaves log|det W| out)
    train_probe = train_x[:2000]
    last_cond: list[float] = []
    warn_epochs: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def on_epoch(info: EpochInfo) -> None:
            nonlocal last_cond
            last_cond = _conds(flow)
            per_epoch_cond.append(max(last_cond))
            with torch.no_grad():  # after validation: eval mode, log|det W| cached for this state
                train_curve.append(_finite_or_none(float(flow.log_prob(train_probe).double().mean())))
            if any("relgrad layer" in str(w.message) for w in caught) and not warn_epochs:
                warn_epochs.append(info.epoch)

        trainer = Trainer(
            flow,
            train_x,
            val_x,
            lr=lr,
            batch_size=100,
            patience=patience,
            max_epochs=max_epochs,
            seed=seed,
            progress=False,
            callbacks=[on_epoch],
        )
        t0 = time.perf_counter()
        res = trainer.fit()  # restores the best-validation state at the end
        elapsed = time.perf_counter() - t0
        best_cond = _conds(flow)
        with torch.no_grad():
            test_ll = float(flow.log_prob(test_x).double().mean()) if res.best_epoch is not None else math.nan
        msgs = [str(w.message) for w in caught if "relgrad layer" in str(w.message)]
    vals = [h["val_ll"] for h in res.history]
    final = vals[-1] if vals else math.nan
    best = res.best_val_ll
    drop = best - final if vals and math.isfinite(best) and math.isfinite(final) else math.nan
    fell = res.status != "ok" or (math.isfinite(drop) and drop > FALL_PER_DIM * data.dim)
    steps_per_epoch = math.ceil(train_x.shape[0] / 100)
    return {
        "data": data.name,
        "phase": phase,
        "dim": data.dim,
        "layers": layers,
        "lr": lr,
        "bias_rule": rule,
        "alpha": alpha,
        "max_epochs": max_epochs,
        "params": count_params(flow),
        "epochs": res.epochs,
        "steps": res.epochs * steps_per_epoch,
        "best_epoch": res.best_epoch,
        "best_val_ll": _finite_or_none(best),
        "final_val_ll": _finite_or_none(final),
        "drop_after_best": _finite_or_none(drop),
        "fell_back": bool(fell),
        "test_ll_best_state": _finite_or_none(test_ll),
        "status": res.status,
        "failure": res.failure,
        "stop_reason": res.stop_reason,
        "cond_first_epoch": _finite_or_none(per_epoch_cond[0]) if per_epoch_cond else None,
        "cond_max_seen": _finite_or_none(max(per_epoch_cond)) if per_epoch_cond else None,
        "cond_last_epoch": [_finite_or_none(c) for c in last_cond],
        "cond_best_state": [_finite_or_none(c) for c in best_cond],
        "singular_warnings": len(msgs),
        "first_warning_epoch": warn_epochs[0] if warn_epochs else None,
        "warning_example": msgs[0] if msgs else None,
        "train_ll_at_best": train_curve[res.best_epoch - 1] if res.best_epoch else None,
        "train_ll_final": train_curve[-1] if train_curve else None,
        "val_curve": [_finite_or_none(v) for v in vals],
        "train_curve": train_curve,
        "time_s": elapsed,
    }


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """One table per data set: a row per (layers, lr), a column group per bias rule."""
    lines = [
        "# relgrad: depth × learning rate × bias rule",
        "",
        f"Generated by `tests/benchmarks/relgrad_depth.py` ({meta['when']}, torch {meta['torch']}, "
        f"{meta['threads']} thread(s), seed {meta['seed']}, patience {meta['patience']}, smooth leaky ReLU α "
        f"{meta.get('alpha', 0.3)}). "
        "Cells: best validation LL (nats) @ best epoch / epochs run; ↓x = the last epoch's validation LL is x "
        f"nats below the best (flagged ⚠ above {FALL_PER_DIM} nats per dimension); κ = the largest cond(W_k) "
        "seen after any epoch; W! = the singular-drift warning fired (first epoch); NaN = training went "
        "non-finite; (train ↑/↓) = whether the exact training LL (first 2,000 points) rose or fell over the same "
        "epochs: rising means overfitting, falling means the steps themselves make the model worse.",
        "",
    ]
    for group in dict.fromkeys((r["data"], r["phase"]) for r in records):
        rs = [r for r in records if (r["data"], r["phase"]) == group]
        rules = list(dict.fromkeys(r["bias_rule"] for r in rs))
        spe = rs[0]["steps"] // max(rs[0]["epochs"], 1)
        title = f"{group[0]}" + (" — long runs" if group[1] == "long" else "")
        lines += [
            f"## {title} (D = {rs[0]['dim']}, {spe} steps per epoch, at most {rs[0]['max_epochs']} epochs)",
            "",
            "| layers | lr | " + " | ".join(rules) + " |",
            "|---|---|" + "---|" * len(rules),
        ]
        for layers in sorted({r["layers"] for r in rs}):
            for lr in sorted({r["lr"] for r in rs}, reverse=True):
                cells = []
                for rule in rules:
                    m = [r for r in rs if r["layers"] == layers and r["lr"] == lr and r["bias_rule"] == rule]
                    if not m:
                        cells.append("")
                        continue
                    r = m[0]
                    cell = f"{_fmt(r['best_val_ll'])} @{r['best_epoch']}/{r['epochs']}"
                    if r["status"] != "ok":
                        cell += " NaN"
                    if r["drop_after_best"] is not None and r["drop_after_best"] > 0.005:
                        cell += f" ↓{r['drop_after_best']:.2f}" + (" ⚠" if r["fell_back"] else "")
                        # train LL still rising while validation falls: overfitting, not an unstable step
                        tb, tf = r["train_ll_at_best"], r["train_ll_final"]
                        if tb is not None and tf is not None:
                            cell += " (train ↑)" if tf > tb else " (train ↓)"
                    cell += f" κ {_fmt(r['cond_max_seen'], '.3g')}"
                    if r["singular_warnings"]:
                        cell += f" W!{r['first_warning_epoch']}"
                    cells.append(cell)
                lines.append(f"| {layers} | {lr:g} | " + " | ".join(cells) + " |")
        best = max((r for r in rs if r["best_val_ll"] is not None), key=lambda r: r["best_val_ll"], default=None)
        if best:
            lines += [
                "",
                f"Best by validation: {best['layers']} layers, lr {best['lr']:g}, bias rule "
                f"{best['bias_rule']}: {best['best_val_ll']:.3f} (test LL of that state "
                f"{_fmt(best['test_ll_best_state'], '.3f')}).",
            ]
        lines.append("")
    n_fell = sum(r["fell_back"] for r in records)
    n_warn = sum(r["singular_warnings"] > 0 for r in records)
    n_nan = sum(r["status"] != "ok" for r in records)
    lines += [
        f"{len(records)} runs: {n_nan} non-finite, {n_fell} fell back after their best, {n_warn} with a "
        f"singular-drift warning; total training time {sum(r['time_s'] for r in records):.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/relgrad-depth")
    p.add_argument("--data", default="digits,mog,moons,sine", help="digits and/or toy2d names")
    p.add_argument("--layers", default="2,4,8,16")
    p.add_argument("--lrs-digits", default="3e-3,1e-3,1e-4")
    p.add_argument("--lrs-toy", default="1e-2,1e-3,1e-4")
    p.add_argument("--rules-digits", default="reference,augmented,none")
    p.add_argument("--rules-toy", default="reference,augmented")
    p.add_argument("--max-epochs-digits", type=int, default=200)
    p.add_argument("--max-epochs-toy", type=int, default=60)
    p.add_argument("--patience", type=int, default=30)
    # Long runs: 300 epochs of 50 steps ≈ one POWER epoch in steps, to see what a step size does over time.
    p.add_argument("--long-data", default="moons", help="toy2d sets for the long runs ('' for none)")
    p.add_argument("--long-layers", default="2,8")
    p.add_argument("--long-lrs", default="1e-3,1e-4")
    p.add_argument("--long-rules", default="reference,augmented")
    p.add_argument("--long-epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--alpha",
        type=float,
        default=0.3,
        help="smooth leaky ReLU slope (0.3: PyTorch notebook and flowbench default; 0.01: the JAX code)",
    )
    p.add_argument("--quick", action="store_true", help="2 and 4 layers, one lr, 3 epochs: a smoke test")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    layers = [int(x) for x in a.layers.split(",")]
    if a.quick:
        layers, a.lrs_digits, a.lrs_toy, a.max_epochs_digits, a.max_epochs_toy = [2, 4], "1e-3", "1e-3", 3, 3
        a.long_layers, a.long_lrs, a.long_epochs = "2", "1e-3", 4
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    plan = []  # (phase, data name, layers, lrs, rules, epoch cap)
    for name in filter(None, a.data.split(",")):
        if name == "digits":
            plan.append(("grid", name, layers, a.lrs_digits, a.rules_digits, a.max_epochs_digits))
        else:
            plan.append(("grid", name, layers, a.lrs_toy, a.rules_toy, a.max_epochs_toy))
    for name in filter(None, a.long_data.split(",")):
        plan.append(("long", name, [int(x) for x in a.long_layers.split(",")], a.long_lrs, a.long_rules, a.long_epochs))
    meta = {
        "when": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "seed": a.seed,
        "patience": a.patience,
        "alpha": a.alpha,
        "max_epochs": {"digits": a.max_epochs_digits, "toy2d": a.max_epochs_toy, "long": a.long_epochs},
        "argv": sys.argv[1:],
    }

    def write() -> None:  # after every run, so an interrupted measurement keeps what it has
        (out / "relgrad_depth.json").write_text(json.dumps({"meta": meta, "runs": records}, indent=1))
        (out / "relgrad_depth.md").write_text(markdown(records, meta))

    cache: dict[str, Any] = {}
    for phase, name, depths, lrs, rules, cap in plan:
        if name not in cache:
            cache[name] = prepare_dataset("digits", write_cache=False) if name == "digits" else make_toy(name, a.seed)
        data = cache[name]
        for n_layers in depths:
            for lr in (float(x) for x in lrs.split(",")):
                for rule in rules.split(","):
                    r = run_one(data, n_layers, lr, rule, cap, a.patience, a.seed, phase, a.alpha)
                    records.append(r)
                    print(
                        f"{phase:4s} {name:7s} L={n_layers:2d} lr={lr:<7g} {rule:9s} "
                        f"best {_fmt(r['best_val_ll'], '9.3f')} "
                        f"@{r['best_epoch']}/{r['epochs']} drop {_fmt(r['drop_after_best'], '.3f')} "
                        f"cond≤{_fmt(r['cond_max_seen'], '.3g')} warn {r['singular_warnings']} {r['status']} "
                        f"{r['time_s']:.1f}s",
                        flush=True,
                    )
                    write()
    print(f"wrote {out / 'relgrad_depth.json'} and {out / 'relgrad_depth.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
