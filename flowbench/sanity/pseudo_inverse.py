"""Pseudo-invertible pairs: two MLPs f: x → y and g: y → x trained to fit the data *and* invert each other.

    L = E‖f(x) − y‖² + E‖g(y) − x‖² + μ·E‖y − f(g(y))‖² + λ·E‖x − g(f(x))‖²

The penalty only asks for invertibility at the data, so nothing is guaranteed between or beyond the points;
λ = μ trades goodness of fit against invertibility (the sweep shows both ends). Data are post-nonlinear,
y = ψ(φ(x) + ε), with random smooth cubic splines φ, ψ: in general not invertible at all.

Protocol (the blog post's): 1,000 points, Linear(30)–ReLU–Linear(30)–ReLU–Linear(1) (and a SiLU variant),
Adam lr 1e-3, 500 full-batch steps; λ = μ ∈ {0.01, 0.1, 1, 10, 100} plus the unconstrained pair.

References:
    "Pseudo-Invertible networks using JAX", Shae's Ramblings (blog post: the loss, the data, the sweep).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.interpolate import CubicSpline
from torch import Tensor, nn

from flowbench.errors import ConfigError
from flowbench.plotting import figure
from flowbench.sanity.common import QUIET, Progress, check_seed, pick
from flowbench.sanity.markdown import markdown_table
from flowbench.utils import atomic_write, atomic_write_json, output_dir

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}
SWEEP = (0.0, 0.01, 0.1, 1.0, 10.0, 100.0)  # λ = μ; 0 is the unconstrained pair


def mlp(activation: str = "relu", width: int = 30) -> nn.Sequential:
    """Linear(30)–act–Linear(30)–act–Linear(1), the reference architecture."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]
    return nn.Sequential(nn.Linear(1, width), act(), nn.Linear(width, width), act(), nn.Linear(width, 1))


def spline_data(
    n: int = 1000, seed: int = 0, knots: int = 10, scale: float = 1.5, noise: float = 0.3
) -> tuple[Tensor, Tensor]:
    """x evenly spaced on [−10, 10], y = ψ(φ(x) + ε), ε ~ N(0, noise²); φ, ψ cubic splines through ``knots``
    equally spaced knots on [−10, 10] with N(0, scale²) values. Returns float32 columns (n, 1)."""
    rng = np.random.default_rng(seed)
    kx = np.linspace(-10, 10, knots)
    phi = CubicSpline(kx, rng.normal(0, scale, knots))
    psi = CubicSpline(kx, rng.normal(0, scale, knots))
    x = np.linspace(-10, 10, n)
    y = psi(phi(x) + rng.normal(0, noise, n))
    col = lambda a: torch.as_tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return col(x), col(y)


def pair_losses(f: nn.Module, g: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The four mean squared terms: both fits and both round trips."""
    return {
        "fit_f": (f(x) - y).pow(2).mean(),
        "fit_g": (g(y) - x).pow(2).mean(),
        "roundtrip_y": (y - f(g(y))).pow(2).mean(),
        "roundtrip_x": (x - g(f(x))).pow(2).mean(),
    }


def train_pair(
    x: Tensor,
    y: Tensor,
    lam: float,
    mu: float | None = None,
    activation: str = "relu",
    steps: int = 500,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Progress = QUIET,
    desc: str = "pair",
) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """Full-batch Adam on the pair loss; ``lam = mu = 0`` is the unconstrained pair (two separate fits).

    ``progress`` shows the steps under a bar labelled ``desc``.
    """
    mu = lam if mu is None else mu
    if lam < 0 or mu < 0:
        raise ConfigError(f"lambda and mu must be >= 0; got {lam}, {mu}")
    torch.manual_seed(seed)
    f, g = mlp(activation), mlp(activation)
    opt = torch.optim.Adam([*f.parameters(), *g.parameters()], lr=lr)
    start = time.perf_counter()
    history = _optimise(f, g, opt, x, y, lam, mu, progress.range(steps, desc))
    with torch.no_grad():
        final = {k: float(v) for k, v in pair_losses(f, g, x, y).items()}
    return (
        f,
        g,
        {
            "lambda": lam,
            "mu": mu,
            "activation": activation,
            "steps": steps,
            "lr": lr,
            "final_loss": history[-1],
            "loss_history": history[:: max(1, steps // 100)],
            "train_time_s": time.perf_counter() - start,
            **final,
        },
    )


def _optimise(
    f: nn.Module, g: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, lam: float, mu: float, bar: Any
) -> list[float]:
    """One step of ``opt`` on the pair loss per item of the progress ``bar``; the loss before each step."""
    history = []
    for _ in bar:
        opt.zero_grad()
        t = pair_losses(f, g, x, y)
        loss = t["fit_f"] + t["fit_g"] + mu * t["roundtrip_y"] + lam * t["roundtrip_x"]
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        bar.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)
    bar.close()
    return history


def _label(lam: float) -> str:
    return "unconstrained" if lam == 0 else f"λ = μ = {lam:g}"


def run_pseudo_inverse(
    out: str | Path | None = None,
    sweep: bool = True,
    activations: tuple[str, ...] = ("relu", "silu"),
    steps: int | None = None,
    seed: int | None = None,
    n: int = 1000,
    quick: bool = False,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    """Train the pairs for every (activation, λ = μ) setting; write JSON, a Markdown table and one PNG per
    activation (rows = settings; columns = f's fit, g's fit with axes swapped, g∘f and f∘g vs the identity).

    ``steps`` defaults to 500 (5 with ``quick``), ``seed`` to 0; ``progress`` shows each pair's training.
    """
    steps = pick(steps, 500, 5, quick)
    seed = 0 if seed is None else seed
    check_seed(seed)
    if steps < 1:
        raise ConfigError(f"--steps must be a positive integer; got {steps}")
    for act in activations:
        mlp(act)  # unknown activations fail here, not after the first activation's pairs have trained
    out = output_dir(out) if out is not None else None
    x, y = spline_data(n, seed)
    settings = SWEEP if sweep else (0.0, 1.0)
    runs, pairs = _train_all(x, y, activations, settings, steps, seed, progress)
    table = _table(runs)
    result = {"seed": seed, "n": n, "steps": steps, "runs": runs, "table": table}
    if out is not None:
        atomic_write_json(out / "pseudo_inverse.json", result)
        with atomic_write(out / "pseudo_inverse.md", "w") as fh:
            fh.write(
                f"Pseudo-invertible pairs ({n} points, {steps} Adam steps, lr 1e-3, seed {seed}); "
                "training-set mean squared errors.\n\n" + table
            )
        for act in activations:
            _figure(x, y, [(lam, *pairs[(act, lam)]) for lam in settings], act, out / f"pseudo_inverse_{act}.png")
    return result


def _train_all(
    x: Tensor,
    y: Tensor,
    activations: tuple[str, ...],
    settings: tuple[float, ...],
    steps: int,
    seed: int,
    progress: Progress,
) -> tuple[list[dict[str, Any]], dict[tuple[str, float], tuple[nn.Module, nn.Module]]]:
    """A pair per (activation, λ = μ): the metrics of each, and the trained pairs by setting."""
    runs, pairs = [], {}
    for act in activations:
        for lam in settings:
            f, g, m = train_pair(
                x, y, lam, activation=act, steps=steps, seed=seed, progress=progress, desc=f"{act}, {_label(lam)}"
            )
            progress.log(
                f"{act}, {_label(lam)}: loss {m['final_loss']:.4g} (fit f {m['fit_f']:.3g}, round trip "
                f"g∘f {m['roundtrip_x']:.3g}) after {steps} steps, {m['train_time_s']:.1f} s"
            )
            runs.append(m)
            pairs[(act, lam)] = (f, g)
    return runs, pairs


def _table(runs: list[dict[str, Any]]) -> str:
    """The Markdown table: both fits' and both round trips' training MSE per setting."""
    rows = [
        [
            r["activation"],
            "unconstrained" if r["lambda"] == 0 else f"{r['lambda']:g}",
            r["fit_f"],
            r["fit_g"],
            r["roundtrip_x"],
            r["roundtrip_y"],
        ]
        for r in runs
    ]
    return markdown_table(
        [
            "activation",
            "λ = μ",
            "fit MSE f(x)≈y",
            "fit MSE g(y)≈x",
            "round trip MSE g(f(x))≈x",
            "round trip MSE f(g(y))≈y",
        ],
        rows,
    )


def _figure(x: Tensor, y: Tensor, pairs: list, activation: str, path: Path) -> None:
    with figure(path, len(pairs), 4, figsize=(17, 3.2 * len(pairs)), squeeze=False, dpi=90) as (_fig, axes):
        _draw(axes, x, y, pairs, activation)


def _draw(axes: np.ndarray, x: Tensor, y: Tensor, pairs: list, activation: str) -> None:
    # axes: the (len(pairs), 4) object array of matplotlib Axes from plt.subplots(..., squeeze=False)
    xs, ys = x.flatten().numpy(), y.flatten().numpy()
    order = np.argsort(ys)
    for row, (lam, f, g) in zip(axes, pairs):
        with torch.no_grad():
            fx, gy = f(x).flatten().numpy(), g(y).flatten().numpy()
            gfx, fgy = g(f(x)).flatten().numpy(), f(g(y)).flatten().numpy()
        label = _label(lam)
        row[0].scatter(xs, ys, s=3, c="0.6")
        row[0].plot(xs, fx, "C0-", lw=2)
        row[0].set(xlabel="x", ylabel="y", title=f"{activation}, {label}: f(x)")
        row[1].scatter(ys, xs, s=3, c="0.6")
        row[1].plot(ys[order], gy[order], "C1-", lw=2)
        row[1].set(xlabel="y", ylabel="x", title="g(y) (axes swapped)")
        for ax, inp, rt, col, name in (
            (row[2], xs, gfx, "C0", "g(f(x)) vs x"),
            (row[3], ys[order], fgy[order], "C3", "f(g(y)) vs y"),
        ):
            ax.plot([inp.min(), inp.max()], [inp.min(), inp.max()], "k--", lw=1, label="identity")
            ax.plot(inp, rt, col + "-", lw=1.5, label=name)
            ax.set(xlabel=name.split(" vs ")[1], title=f"round trip {name.split(' vs ')[0]}")
            ax.legend(fontsize=7)
