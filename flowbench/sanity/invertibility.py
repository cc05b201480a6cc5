"""Three ways to learn an invertible 1-D map, compared on one monotone target (a table none of the sources has).

* JacNet with the invertible activation (J = a² + ε > 0): invertible by construction, inverse by an ODE.
* The pseudo-invertible pair f, g (λ = μ = 1): invertibility is only a penalty at the training points.
* A 1-D relgrad dense flow (``build_model('relgrad', 1)``) used as a regression function x ↦ z: invertible as
  long as every 1×1 weight is non-zero (the activation is strictly increasing); inverse in closed form +
  Newton.

Target y = x + 0.4·sin(2x) (derivative in [0.2, 1.8]: strictly increasing, not trivially linear or convex).
All three see the same 64 training points uniform in [−2, 2]; errors are measured on a 201-point grid on
[−2, 2] and the round trip x ↦ inverse(f(x)) also on [−4, 4] (off the data).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from flowbench.errors import ConfigError
from flowbench.models import build_model
from flowbench.plotting import figure
from flowbench.sanity.common import QUIET, Progress, check_seed, pick
from flowbench.sanity.jacnet import JacNet, train_jacnet
from flowbench.sanity.markdown import markdown_table
from flowbench.sanity.pseudo_inverse import train_pair
from flowbench.utils import atomic_write, atomic_write_json, output_dir

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: One fitted model: (forward, inverse, its table row so far).
Fit = tuple[Any, Any, dict[str, Any]]


def target(x: Tensor) -> Tensor:
    return x + 0.4 * torch.sin(2 * x)


def _metrics(
    fn: Callable[[Tensor], Tensor], inv: Callable[[Tensor], Tensor], grid: Tensor, wide: Tensor
) -> tuple[dict[str, Any], tuple[Tensor, Tensor]]:
    """The table's numbers, plus (f(wide), inverse(f(wide))) for the figure."""
    with torch.no_grad():
        fit = (fn(grid) - target(grid)).abs()
        rt = (inv(fn(grid)) - grid).abs()
        f_wide = fn(wide)
        back_wide = inv(f_wide)
        rt_wide = (back_wide - wide).abs()
    d = torch.diff(f_wide.flatten())
    return (
        {
            "fit_mae": float(fit.mean()),
            "fit_max": float(fit.max()),
            "roundtrip_mae": float(rt.mean()),
            "roundtrip_max": float(rt.max()),
            "roundtrip_wide_max": float(rt_wide.max()),
            "monotone_on_wide_grid": bool((d > 0).all() or (d < 0).all()),
        },
        (f_wide, back_wide),
    )


def _fit_jacnet(x: Tensor, y: Tensor, seed: int, iters: int, progress: Progress) -> Fit:
    torch.manual_seed(seed)
    # ε = 0.01 rather than the paper's 1e-4: the target's slope is ≥ 0.2, and the floor keeps the inverse ODE
    # (dx/dt = (y − y₀)/J) from turning stiff where J is barely trained (off the data, or in --quick runs).
    jac = JacNet(1, 1, activation="invertible", eps=1e-2).double()
    t0 = time.perf_counter()
    hist = train_jacnet(jac, x, y, iters=iters, lr=0.01, progress=progress, desc="JacNet (invertible)")
    tol = 1e-6  # evaluation tolerance of both ODEs (the inverse's cost grows fast as it tightens)
    row = {
        "guaranteed": "yes: J = a² + ε ≥ 0.01 everywhere",
        "train_time_s": time.perf_counter() - t0,
        "final_train_loss": hist["loss"][-1],
    }
    return (lambda v: jac(v, tol, tol)), (lambda v: jac.inverse(v, tol, tol)), row


def _fit_pair(x: Tensor, y: Tensor, seed: int, steps: int, progress: Progress) -> Fit:
    t0 = time.perf_counter()
    f, g, m = train_pair(
        x.float(), y.float(), lam=1.0, steps=steps, seed=seed, progress=progress, desc="pseudo-invertible pair"
    )
    row = {
        "guaranteed": "no: a penalty at the training points only",
        "train_time_s": time.perf_counter() - t0,
        "final_train_loss": m["final_loss"],
    }
    return (lambda v: f(v.float()).double()), (lambda v: g(v.float()).double()), row


def _fit_relgrad(x: Tensor, y: Tensor, seed: int, steps: int, layers: int, progress: Progress) -> Fit:
    torch.manual_seed(seed)
    flow = build_model("relgrad", 1, layers=layers).double()
    flow.relative = False  # a regression loss: ordinary gradients (the relative gradient is for log|det W|)
    opt = torch.optim.Adam(flow.parameters(), lr=0.01)
    t0 = time.perf_counter()
    bar = progress.range(steps, "relgrad flow")
    for _ in bar:
        opt.zero_grad()
        loss = (flow.transform(x)[0] - y).pow(2).mean()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.4g}", refresh=False)
    bar.close()
    flow.eval()
    min_w = min(float(w.detach().abs().min()) for w in flow.transform.weights)
    row = {
        "guaranteed": f"yes while every W_k ≠ 0 (min |W_k| = {min_w:.3g})",
        "min_abs_weight": min_w,
        "train_time_s": time.perf_counter() - t0,
        "final_train_loss": float(loss.detach()),
    }
    return (lambda v: flow.transform(v)[0]), (lambda v: flow.transform.inverse(v)[0]), row


def run_invertibility(
    out: str | Path | None = None,
    seed: int | None = None,
    jacnet_iters: int | None = None,
    steps: int | None = None,
    relgrad_layers: int = 4,
    quick: bool = False,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    """Fit the three models; write invertibility.json, invertibility.md and invertibility.png under ``out``.

    Defaults: seed 0, 200 JacNet iterations and 2000 Adam steps for the pair and the flow (``quick``: 3
    and 5). ``progress`` shows each fit and a line when it ends.
    """
    seed = 0 if seed is None else seed
    jacnet_iters, steps = pick(jacnet_iters, 200, 3, quick), pick(steps, 2000, 5, quick)
    check_seed(seed)
    if min(jacnet_iters, steps, relgrad_layers) < 1:
        raise ConfigError(
            f"--iters, --steps and the relgrad depth must be ≥ 1; got {jacnet_iters}, {steps}, {relgrad_layers}"
        )
    out = output_dir(out) if out is not None else None
    x, y, grid, wide = _points(seed)
    fits = {
        "JacNet (invertible)": lambda: _fit_jacnet(x, y, seed, jacnet_iters, progress),
        "pseudo-invertible pair (λ=μ=1)": lambda: _fit_pair(x, y, seed, steps, progress),
        f"relgrad flow (1-D, {relgrad_layers} layers)": lambda: _fit_relgrad(
            x, y, seed, steps, relgrad_layers, progress
        ),
    }
    rows, curves = _fit_all(fits, grid, wide, progress)
    table = _table(rows)
    result = {
        "target": "x + 0.4 sin(2x)",
        "seed": seed,
        "n_train": 64,
        "jacnet_iters": jacnet_iters,
        "steps": steps,
        "models": rows,
        "table": table,
    }
    if out is not None:
        _write(out, result, curves, x, y, wide)
    return result


def _points(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 64 training points (x, y), the grid on the training range and the wide one beyond it."""
    gen = torch.Generator().manual_seed(seed)
    x = -2 + 4 * torch.rand(64, 1, generator=gen, dtype=torch.float64)
    y = target(x)
    grid = torch.linspace(-2, 2, 201, dtype=torch.float64).unsqueeze(1)
    wide = torch.linspace(-4, 4, 401, dtype=torch.float64).unsqueeze(1)
    return x, y, grid, wide


def _fit_all(
    fits: dict[str, Callable[[], Fit]], grid: Tensor, wide: Tensor, progress: Progress
) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[Tensor, Tensor]]]:
    """Fit each model in turn and measure it: its table row, and its curves for the figure."""
    rows: dict[str, dict[str, Any]] = {}
    curves = {}
    for name, fit in fits.items():
        fn, inv, rows[name] = fit()
        m, curves[name] = _metrics(fn, inv, grid, wide)
        rows[name].update(m)
        progress.log(
            f"{name}: trained in {rows[name]['train_time_s']:.1f} s, fit MAE {m['fit_mae']:.3g}, "
            f"round trip max on [−4, 4] {m['roundtrip_wide_max']:.3g}"
        )
    return rows, curves


def _table(rows: dict[str, dict[str, Any]]) -> str:
    """The Markdown table of the three fits."""
    return markdown_table(
        [
            "model",
            "fit MAE [−2,2]",
            "round-trip MAE [−2,2]",
            "round-trip max [−4,4]",
            "monotone on [−4,4]",
            "invertibility guaranteed",
        ],
        [
            [
                n,
                r["fit_mae"],
                r["roundtrip_mae"],
                r["roundtrip_wide_max"],
                "yes" if r["monotone_on_wide_grid"] else "no",
                r["guaranteed"],
            ]
            for n, r in rows.items()
        ],
    )


def _write(out: Path, result: dict[str, Any], curves: dict, x: Tensor, y: Tensor, wide: Tensor) -> None:
    """invertibility.json, .md (the table under a line saying what was fitted) and .png under ``out``."""
    atomic_write_json(out / "invertibility.json", result)
    with atomic_write(out / "invertibility.md", "w") as fh:
        fh.write(
            "Target y = x + 0.4·sin(2x); 64 training points in [−2, 2]; fit on [−2, 2], round trip "
            "x → inverse(f(x)) also off the data on [−4, 4].\n\n" + result["table"]
        )
    _figure(curves, x, y, wide, out / "invertibility.png")


def _figure(curves: dict, x: Tensor, y: Tensor, wide: Tensor, path: Path) -> None:
    with figure(path, 1, 2, figsize=(13, 4.6)) as (_fig, (a, b)):
        _draw(a, b, curves, x, y, wide)


def _draw(a: Axes, b: Axes, curves: dict, x: Tensor, y: Tensor, wide: Tensor) -> None:
    w = wide.flatten().numpy()
    a.plot(w, target(wide).flatten().numpy(), "k-", lw=3, alpha=0.3, label="target x + 0.4 sin 2x")
    a.plot(x.flatten().numpy(), y.flatten().numpy(), "k.", label="training points")
    for i, (name, (f_wide, back_wide)) in enumerate(curves.items()):
        a.plot(w, f_wide.flatten().numpy(), f"C{i}-", label=name)
        err = (back_wide - wide).abs().flatten().clamp_min(1e-16).numpy()  # log scale: exact zeros at 1e-16
        b.semilogy(w, err, f"C{i}-", label=name)
    for ax in (a, b):
        ax.axvspan(-2, 2, color="0.9", zorder=-1)
        ax.legend(fontsize=8)
    a.set(xlabel="x", ylabel="f(x)", title="fits (shaded: training range)")
    b.set(xlabel="x", ylabel="|inverse(f(x)) − x|", title="round-trip error (log scale)")
