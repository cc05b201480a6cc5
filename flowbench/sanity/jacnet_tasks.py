"""The JacNet experiments of Lorraine & Hossain (2019, §5) and the d_x > 1 path-dependence measurement.

* ``exp``: learn exp(x) with the invertible activation (J Jᵀ + εI), then invert it (paper Figure 1).
* ``abs``: learn |x| with the 1-Lipschitz activation tanh (paper Figure 2), certified on a dense grid.
* each beside the same network with an unconstrained output; loss, tolerance and solver cost per iteration
  (paper Figure 3).
* ``path``: a 2 → 1 JacNet; ŷ along a straight and a bent path differ when J is not conservative (§4.5).

Protocol (Lorraine & Hossain 2019, §5 and §4.4; the tolerance start from their code): 5 training points
uniform in [−1, 1], 100 test points uniform in [−2, 2], 64 hidden units, Adam lr 0.01, 50 full-batch
iterations, loss |ŷ − y|, x₀ = 0, tolerance from 0.1 halved whenever the training loss is below it.

References:
    J. Lorraine, S. Hossain. JacNet: Learning Functions with Structured Jacobians. INNF workshop, ICML 2019.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from flowbench.errors import ConfigError
from flowbench.plotting import figure
from flowbench.sanity.common import QUIET, Progress, check_seed, pick
from flowbench.sanity.jacnet import (
    FixedJacNet,
    JacNet,
    derivative_range,
    lipschitz_certificate,
    path_gap,
    train_jacnet,
)
from flowbench.utils import atomic_write_json, check_number, output_dir

if TYPE_CHECKING:
    from matplotlib.axes import Axes

TASKS: dict[str, dict[str, Any]] = {
    "exp": {"target": torch.exp, "inverse": torch.log, "activation": "invertible", "label": "exp(x)"},
    "abs": {"target": torch.abs, "inverse": None, "activation": "lipschitz", "label": "|x|"},
}
EVAL_TOL = 1e-8  # evaluation tolerance: metrics measure the learned function, not the loose training solver


def make_data(seed: int, n_train: int = 5, n_test: int = 100, d: int = 1) -> tuple[Tensor, Tensor]:
    """Train x ~ U[−1, 1], test x ~ U[−2, 2] (sorted), float64, from a local generator."""
    gen = torch.Generator().manual_seed(seed)
    x_train = -1 + 2 * torch.rand(n_train, d, generator=gen, dtype=torch.float64)
    x_test = -2 + 4 * torch.rand(n_test, d, generator=gen, dtype=torch.float64)
    if d == 1:
        x_test = x_test.sort(0).values
    return x_train, x_test


def _evaluate(
    model: JacNet, target: Callable[[Tensor], Tensor], x_train: Tensor, x_test: Tensor, cert_points: int
) -> dict[str, Any]:
    with torch.no_grad():
        train_err = (model(x_train, EVAL_TOL, EVAL_TOL) - target(x_train)).abs()
        test_err = (model(x_test, EVAL_TOL, EVAL_TOL) - target(x_test)).abs()
    dmin, dmax = derivative_range(model)
    return {
        "train_error": float(train_err.mean()),
        "test_error": float(test_err.mean()),
        "test_max_error": float(test_err.max()),
        "min_derivative": dmin,
        "max_abs_derivative": dmax,
        "certified_max_abs_derivative": lipschitz_certificate(model, points=cert_points),
        "monotone_on_grid": bool(dmin > 0),
    }


def _inverse_metrics(model: JacNet, spec: dict[str, Any], x_test: Tensor, pred: Tensor) -> tuple[dict, tuple]:
    """Round trip x → ŷ → inverse on the test points, the learned vs the true inverse, and the inverse's
    curve over the range of ŷ (for the figure)."""
    y_test = model(x_test, EVAL_TOL, EVAL_TOL)
    back = model.inverse(y_test, EVAL_TOL, EVAL_TOL)
    m = {
        "inverse_roundtrip_error": float((back - x_test).abs().mean()),
        "inverse_roundtrip_max_error": float((back - x_test).abs().max()),
    }
    y_inv = torch.linspace(float(pred.min()), float(pred.max()), 101, dtype=torch.float64)[:, None]
    if spec["inverse"] is not None:  # learned inverse vs the true inverse on the test outputs
        true_y = spec["target"](x_test)
        m["inverse_error_vs_true_inverse"] = float(
            (model.inverse(true_y, EVAL_TOL, EVAL_TOL) - spec["inverse"](true_y)).abs().mean()
        )
    return m, (y_inv, model.inverse(y_inv, EVAL_TOL, EVAL_TOL))


def _train_and_evaluate(
    name: str,
    activation: str,
    spec: dict[str, Any],
    data: tuple[Tensor, Tensor],
    grid: Tensor,
    opts: dict[str, Any],
    progress: Progress,
) -> tuple[dict, dict]:
    """Train one JacNet on the task and measure it: (metrics, curves for the figure)."""
    x_train, x_test = data
    target = spec["target"]
    model, (initial, initial_jac), init_range = _initial_model(activation, target, grid, opts)
    trained, hist = _train(model, target, x_train, f"{opts['task']} {name}", opts, progress)
    m = {"activation": activation, **trained, **init_range}
    m.update(_evaluate(model, target, x_train, x_test, opts["cert_points"]))
    if activation == "lipschitz":
        m["lipschitz_certified"] = m["certified_max_abs_derivative"] <= opts["k"]
    with torch.no_grad():
        pred = model(grid, EVAL_TOL, EVAL_TOL)
        c = {
            "initial": initial,
            "pred": pred,
            "jac": model.jacobian(grid).flatten(),
            "initial_jac": initial_jac,
            "hist": hist,
        }
        if activation == "invertible":
            inv, c["inverse"] = _inverse_metrics(model, spec, x_test, pred)
            m.update(inv)
        else:
            m["inverse_roundtrip_error"] = None  # no inverse: not guaranteed invertible
    return m, c


def _initial_model(
    activation: str, target: Callable[[Tensor], Tensor], grid: Tensor, opts: dict[str, Any]
) -> tuple[JacNet, tuple[Tensor, Tensor], dict[str, float]]:
    """A freshly initialised JacNet for the task: the model, its output and derivative on ``grid``, and its
    derivative's range."""
    torch.manual_seed(opts["seed"])  # same initial raw network for both: only the output activation differs
    model = JacNet(
        1, 1, activation=activation, eps=opts["eps"], k=opts["k"], y0=target(torch.zeros(1, dtype=torch.float64))
    ).double()
    with torch.no_grad():
        initial = model(grid, 1e-6, 1e-6)
        initial_jac = model.jacobian(grid).flatten()
    init_min, init_max = derivative_range(model)
    return model, (initial, initial_jac), {"init_min_derivative": init_min, "init_max_abs_derivative": init_max}


def _train(
    model: JacNet,
    target: Callable[[Tensor], Tensor],
    x_train: Tensor,
    desc: str,
    opts: dict[str, Any],
    progress: Progress,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit ``model`` to the training points: what the training cost and reached, and its history."""
    start = time.perf_counter()
    hist = train_jacnet(
        model, x_train, target(x_train), iters=opts["iters"], lr=opts["lr"], progress=progress, desc=desc
    )
    m = {
        "train_time_s": time.perf_counter() - start,
        "final_train_loss": hist["loss"][-1],
        "loss_history": hist["loss"],
        "tolerance_schedule": hist["tolerance"],
        "final_tolerance": hist["final_tolerance"],
        "nfe_per_iteration": hist["nfe"],
        "mean_nfe_per_iteration": sum(hist["nfe"]) / max(1, opts["iters"]),
    }
    progress.log(
        f"{desc}: {opts['iters']} iterations in {m['train_time_s']:.1f} s, final loss "
        f"{m['final_train_loss']:.4g}; evaluating"
    )
    return m, hist


def run_jacnet(
    task: str,
    out: str | Path | None = None,
    iters: int = 50,
    seed: int = 3,
    eps: float = 1e-4,
    k: float = 1.0,
    lr: float = 0.01,
    cert_points: int = 2001,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    """Train the structured JacNet and its unconstrained baseline on ``task``; write JSON + PNG to ``out``.

    ``cert_points``: grid size on [−2, 2] for the |dŷ/dx| certificate via :mod:`flowbench.jacobian`.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown JacNet task {task!r}; choose one of {', '.join(TASKS)} (or path)")
    check_seed(seed)
    for flag, v in (("--eps", eps), ("--k", k), ("lr", lr)):
        check_number(flag, v)
    out = output_dir(out) if out is not None else None
    spec = TASKS[task]
    x_train, x_test = make_data(seed)
    grid = torch.linspace(-2, 2, 201, dtype=torch.float64).unsqueeze(1)
    opts = {"task": task, "seed": seed, "iters": iters, "lr": lr, "eps": eps, "k": k, "cert_points": cert_points}
    metrics: dict[str, Any] = {
        "task": task,
        "seed": seed,
        "iters": iters,
        "lr": lr,
        "eps": eps,
        "k": k,
        "x_train": x_train.flatten().tolist(),
        "eval_tolerance": EVAL_TOL,
        "models": {},
    }
    curves: dict[str, Any] = {}
    for name, activation in (("jacnet", spec["activation"]), ("unconstrained", "unconstrained")):
        metrics["models"][name], curves[name] = _train_and_evaluate(
            name, activation, spec, (x_train, x_test), grid, opts, progress
        )
    if out is not None:
        atomic_write_json(out / f"jacnet_{task}.json", metrics)
        _figure(task, spec, metrics, curves, grid, x_train, k, out / f"jacnet_{task}.png")
    return metrics


def summary_lines(task: str, metrics: dict[str, Any], k: float) -> list[str]:
    """One line per model of a finished ``exp`` / ``abs`` task: loss, test error, derivative, inverse."""
    lines = []
    for name, r in metrics["models"].items():
        extra = ""
        if r.get("inverse_roundtrip_max_error") is not None:
            extra = f", inverse round trip max {r['inverse_roundtrip_max_error']:.2g}"
        if "lipschitz_certified" in r:
            extra = (
                f", max |dŷ/dx| {r['certified_max_abs_derivative']:.4f} (certified ≤ {k:g}: "
                f"{'yes' if r['lipschitz_certified'] else 'NO'})"
            )
        lines.append(
            f"{task} {name:13s}: final train loss {r['final_train_loss']:.4f}, test error "
            f"{r['test_error']:.4f}, min dŷ/dx {r['min_derivative']:.3g}{extra}"
        )
    return lines


def run_jacnet_tasks(
    out: str | Path,
    task: str = "all",
    iters: int | None = None,
    seed: int | None = None,
    eps: float = 1e-4,
    k: float = 1.0,
    quick: bool = False,
    progress: Progress = QUIET,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """``flowbench sanity jacnet``: ``exp``, ``abs``, ``path`` or ``all`` of them, each reported through
    ``log`` as it ends. Defaults: 50 iterations (``quick``: 3, and a 201-point certificate grid), seed 3
    (its five training draws cover both signs of x, see the README)."""
    tasks = ["exp", "abs", "path"] if task == "all" else [task]
    for t in tasks:
        if t not in TASKS and t != "path":
            raise ConfigError(f"unknown JacNet task {t!r}; choose one of {', '.join(TASKS)}, path or all")
    iters = pick(iters, 50, 3, quick)
    seed = 3 if seed is None else seed
    check_seed(seed)
    check_number("--eps", eps)
    check_number("--k", k)
    if iters < 1:
        raise ConfigError(f"--iters must be a positive integer; got {iters}")
    out = output_dir(out)
    results = {}
    for t in tasks:
        if t == "path":
            m = results[t] = run_path(out, iters=iters, seed=seed, progress=progress)
            log(
                f"path (d_x=2): straight-vs-bent gap mean {m['path_gap_trained']['mean']:.3g} "
                f"(conservative closed form {m['path_gap_conservative_field']:.2g}, rotation field "
                f"{m['path_gap_rotation_field']:.3g}) → {out / 'jacnet_path.json'}"
            )
            continue
        m = results[t] = run_jacnet(
            t, out, iters=iters, seed=seed, eps=eps, k=k, cert_points=201 if quick else 2001, progress=progress
        )
        for line in summary_lines(t, m, k):
            log(line)
        log(f"  → {out / f'jacnet_{t}.json'}, {out / f'jacnet_{t}.png'}")
    return results


def _figure(
    task: str,
    spec: dict[str, Any],
    metrics: dict[str, Any],
    curves: dict[str, Any],
    grid: Tensor,
    x_train: Tensor,
    k: float,
    path: Path,
) -> None:
    """Paper Figures 1–3 in one row: functions (+ inverse), derivatives, training dynamics."""
    with figure(path, 1, 3, figsize=(17, 4.8)) as (_fig, (a, b, c)):
        _draw_functions(a, task, spec, metrics, curves, grid, x_train)
        _draw_derivatives(b, curves, grid, metrics["models"]["jacnet"]["activation"], k)
        _draw_training(c, curves)


def _draw_functions(
    a: Axes,
    task: str,
    spec: dict[str, Any],
    metrics: dict[str, Any],
    curves: dict[str, Any],
    grid: Tensor,
    x_train: Tensor,
) -> None:
    """Paper Figure 1/2: the target, both networks at init and trained, and the learned inverse if any."""
    g = grid.flatten().numpy()
    target = spec["target"]
    jn, un = curves["jacnet"], curves["unconstrained"]
    act = metrics["models"]["jacnet"]["activation"]
    a.plot(g, target(grid).flatten().numpy(), "k-", lw=2.5, alpha=0.35, label=f"target {spec['label']}")
    a.plot(g, jn["initial"].flatten().numpy(), "C0:", label="JacNet at init")
    a.plot(g, jn["pred"].flatten().numpy(), "C0-", label=f"JacNet ({act}) trained")
    a.plot(g, un["pred"].flatten().numpy(), "C3--", label="unconstrained trained")
    if "inverse" in jn:
        yi, xi = jn["inverse"]
        a.plot(yi.flatten().numpy(), xi.flatten().numpy(), "C2-", label="learned inverse")
        pos = grid[grid > 0.05]
        a.plot(pos.numpy(), spec["inverse"](pos).numpy(), "C2:", lw=2, label="true inverse log(x)")
    a.plot(x_train.flatten().numpy(), target(x_train).flatten().numpy(), "ko", label="training points")
    a.set(
        xlabel="x",
        ylabel="y",
        title=f"{spec['label']}: test error JacNet "
        f"{metrics['models']['jacnet']['test_error']:.3g}, unconstrained "
        f"{metrics['models']['unconstrained']['test_error']:.3g}",
    )
    if task == "exp":
        a.set_ylim(-2.2, 8)  # keep the learned inverse (x up to e²) from squashing the interesting part
    a.legend(fontsize=8)


def _draw_derivatives(b: Axes, curves: dict[str, Any], grid: Tensor, act: str, k: float) -> None:
    """The learned derivatives, at init and trained, and the Lipschitz band when it is the constraint."""
    g = grid.flatten().numpy()
    jn, un = curves["jacnet"], curves["unconstrained"]
    b.plot(g, jn["jac"].numpy(), "C0-", label="JacNet J(x)")
    b.plot(g, jn["initial_jac"].numpy(), "C0:", label="JacNet J(x) at init")
    b.plot(g, un["jac"].numpy(), "C3--", label="unconstrained J(x)")
    if act == "lipschitz":
        b.axhspan(-k, k, color="C0", alpha=0.08, label=f"[−{k:g}, {k:g}]")
    b.axhline(0, color="k", lw=0.6)
    b.set(xlabel="x", ylabel="dŷ/dx", title="learned derivative")
    b.legend(fontsize=8)


def _draw_training(c: Axes, curves: dict[str, Any]) -> None:
    """Paper Figure 3: both losses and solver tolerances per iteration, and JacNet's solver evaluations."""
    jn = curves["jacnet"]
    it = range(1, len(jn["hist"]["loss"]) + 1)
    for name, col in (("jacnet", "C0"), ("unconstrained", "C3")):
        h = curves[name]["hist"]
        c.semilogy(it, h["loss"], col + "-", label=f"{name} loss")
        c.semilogy(it, h["tolerance"], col + ":", drawstyle="steps-post", label=f"{name} tolerance")
    c.set(xlabel="iteration", ylabel="training loss / solver tolerance", title="training (tolerance annealing)")
    c2 = c.twinx()
    c2.grid(False)  # the left axis's grid is the figure's
    c2.plot(it, jn["hist"]["nfe"], "C7-", alpha=0.5, lw=1, label="JacNet solver evals")
    c2.set_ylabel("solver evaluations / iteration")
    c2.set_ylim(0, 1.2 * max(jn["hist"]["nfe"]))
    c.legend(fontsize=8, loc="lower left")
    c2.legend(fontsize=8, loc="upper right")


def _field(x: Tensor) -> Tensor:
    """2-D target for the path task: f(x) = sin(x₁) + x₂²/2 (its gradient field is conservative)."""
    return (torch.sin(x[:, 0]) + 0.5 * x[:, 1] ** 2).unsqueeze(1)


def run_path(
    out: str | Path | None = None, iters: int = 50, seed: int = 3, lr: float = 0.01, progress: Progress = QUIET
) -> dict[str, Any]:
    """d_x = 2, d_y = 1: the gap |ŷ_straight − ŷ_bent| for a learned J at init and after training, next to a
    closed-form conservative field (gap ≈ solver error) and a rotation field J = (−x₂, x₁) (gap ≫ 0)."""
    check_seed(seed)
    out = output_dir(out) if out is not None else None
    x_train, x_test = make_data(seed, n_train=64, n_test=100, d=2)
    torch.manual_seed(seed)
    model = JacNet(2, 1).double()
    gap_init = path_gap(model, x_test)
    hist = train_jacnet(model, x_train, _field(x_train), iters=iters, lr=lr, progress=progress, desc="path JacNet")
    progress.log(f"path JacNet: {iters} iterations, final loss {hist['loss'][-1]:.4g}; measuring path gaps")
    gap = path_gap(model, x_test)
    with torch.no_grad():
        test_err = float((model(x_test, EVAL_TOL, EVAL_TOL) - _field(x_test)).abs().mean())
    grad = FixedJacNet(lambda p: torch.stack([torch.cos(p[:, 0]), p[:, 1]], 1).unsqueeze(1), d_x=2).double()
    rot = FixedJacNet(lambda p: torch.stack([-p[:, 1], p[:, 0]], 1).unsqueeze(1), d_x=2).double()
    metrics = {
        "task": "path",
        "d_x": 2,
        "d_y": 1,
        "seed": seed,
        "iters": iters,
        "target": "sin(x1) + x2^2/2",
        "final_train_loss": hist["loss"][-1],
        "test_error": test_err,
        "final_tolerance": hist["final_tolerance"],
        "path_gap_init": {"mean": float(gap_init.mean()), "max": float(gap_init.max())},
        "path_gap_trained": {"mean": float(gap.mean()), "max": float(gap.max())},
        "path_gap_conservative_field": float(path_gap(grad, x_test).max()),
        "path_gap_rotation_field": float(path_gap(rot, x_test).max()),
    }
    if out is not None:
        atomic_write_json(out / "jacnet_path.json", metrics)
    return metrics
