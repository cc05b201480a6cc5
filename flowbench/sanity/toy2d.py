"""2-D toy densities (the relative-gradient paper's Figure 2): a mixture of Gaussians, two half moons and a
noisy sine, fitted by any registered model through the normal trainer, shown as data beside the learned
density. Look at these before trusting a model on real data: a flow that cannot put mass on two moons
will not do better on POWER.

Data: 5,000 training, 500 validation (for early stopping) and 500 test points, standardised with the training
mean and standard deviation (the plots and log-likelihoods are in standardised coordinates).

References:
    L. Gresele, G. Fissore, A. Javaloy, B. Schölkopf, A. Hyvärinen. Relative gradient optimization of the
    Jacobian term in unsupervised deep learning. NeurIPS 2020, Figure 2 and appendix H.3.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from flowbench.data.base import Dataset
from flowbench.errors import ConfigError
from flowbench.models import build_model, get_spec
from flowbench.plotting import colormap, figure
from flowbench.results import checkpoint_path, record_path
from flowbench.sanity.common import QUIET, Progress, check_seed, pick
from flowbench.training import run_experiment
from flowbench.training.trainer import best_model_state
from flowbench.utils import atomic_write_json, check_number, output_dir

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from flowbench.models.base import Flow


def _mog(n: int, rng: np.random.Generator) -> np.ndarray:
    """Four isotropic Gaussians (σ = 0.3) at the corners of a square, unequal weights."""
    centers = np.array([[-1.5, -1.5], [-1.5, 1.5], [1.5, -1.5], [1.5, 1.5]])
    k = rng.choice(4, size=n, p=[0.4, 0.2, 0.2, 0.2])
    return centers[k] + 0.3 * rng.standard_normal((n, 2))


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two interleaved half circles with Gaussian noise 0.05 (as sklearn's make_moons)."""
    t = np.pi * rng.random(n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    return np.stack([x, y], 1) + 0.05 * rng.standard_normal((n, 2))


def _sine(n: int, rng: np.random.Generator) -> np.ndarray:
    """x₁ ~ U[−π, π], x₂ = sin(x₁) + N(0, 0.1²)."""
    x1 = rng.uniform(-math.pi, math.pi, n)
    return np.stack([x1, np.sin(x1) + 0.1 * rng.standard_normal(n)], 1)


TOY_DATA: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {"mog": _mog, "moons": _moons, "sine": _sine}


def make_toy(name: str, seed: int = 0, n_train: int = 5000, n_val: int = 500, n_test: int = 500) -> Dataset:
    """A standardised 2-D toy :class:`Dataset` named ``toy2d-<name>``."""
    if name not in TOY_DATA:
        raise ConfigError(f"unknown toy data {name!r}; choose one of {', '.join(TOY_DATA)}")
    rng = np.random.default_rng(seed)
    x = TOY_DATA[name](n_train + n_val + n_test, rng)
    train, val, test = x[:n_train], x[n_train : n_train + n_val], x[n_train + n_val :]
    mu, sd = train.mean(0), train.std(0)
    f32 = lambda a: ((a - mu) / sd).astype(np.float32)  # noqa: E731
    return Dataset(
        name=f"toy2d-{name}",
        train=f32(train),
        val=f32(val),
        test=f32(test),
        meta={"standardised_with": {"mean": mu.tolist(), "std": sd.tolist()}},
    )


def _load_trained(record: dict[str, Any], options: dict[str, Any], data: Dataset) -> Flow:
    """Rebuild the model of ``record`` and load its best-validation weights from the run's checkpoint."""
    flow = build_model(record.model_ref or record.model, data.dim, **record.hparams)
    train = torch.as_tensor(data.train)
    path = checkpoint_path(options["out"], data.name, record.model, record.seed, record.tag)
    if not flow.trainable:  # closed-form models (the Gaussian) have no checkpoint: refit, deterministic
        flow.initialize(train)
    elif not path.is_file() and not path.with_suffix(".model.pt").is_file():  # the record's model_state file
        raise ConfigError(f"the trainer left no checkpoint at {path}; cannot plot the learned density")
    else:
        # The record's test LL is the best-validation model's, which the checkpoint keeps beside the last state.
        flow.load_state_dict(best_model_state(path))
    flow.eval()
    flow.prepare_for_eval(train)
    return flow


def _density_grid(flow: Flow, data: Dataset, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gx, gy, log p) on a grid × grid lattice covering the training and test points with a 0.5 margin."""
    lo = np.minimum(data.train.min(0), data.test.min(0)) - 0.5
    hi = np.maximum(data.train.max(0), data.test.max(0)) + 0.5
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], grid), np.linspace(lo[1], hi[1], grid))
    pts = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    with torch.no_grad():
        logp = torch.cat([flow.log_prob(b) for b in pts.split(10_000)]).numpy().reshape(grid, grid)
    return gx, gy, logp


def _gaussian_test_ll(data: Dataset) -> float:
    """The full-covariance Gaussian's test LL: a model that does not beat it has learned nothing non-Gaussian."""
    gauss = build_model("gaussian", data.dim)
    gauss.initialize(torch.as_tensor(data.train))
    gauss.eval()
    with torch.no_grad():
        return float(gauss.log_prob(torch.as_tensor(data.test)).double().mean())


def run_toy2d(
    name: str,
    model: str = "relgrad",
    out: str | Path = "results/sanity",
    seed: int = 0,
    max_epochs: int = 100,
    patience: int = 30,
    lr: float | None = None,
    batch_size: int = 100,
    hparams: dict[str, Any] | None = None,
    grid: int = 200,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    """Train ``model`` on toy data ``name`` with :func:`flowbench.training.run_experiment`; write
    ``toy2d_<name>_<model>.png`` (data | learned density) and ``.json`` (test LL, record path) under ``out``.

    ``progress`` turns on the trainer's own display (a bar per epoch, a line after each).
    """
    mname = get_spec(model).name  # `model` may be a reference; records and files are named for the spec
    check_seed(seed)
    check_number("--lr", lr)
    out = output_dir(out)
    data = make_toy(name, seed)
    options: dict[str, Any] = {
        "model": model,
        "seed": seed,
        "max_epochs": max_epochs,
        "patience": patience,
        "batch_size": batch_size,
        "out": str(out),
        "force": True,
        "device": "cpu",
        **({"lr": lr} if lr is not None else {}),
        **(hparams or {}),
    }
    record = run_experiment(options, data=data, progress=progress.enabled)
    flow = _load_trained(record, options, data)
    progress.log(f"{data.name}: trained {record.epochs} epochs; evaluating the density on a {grid}×{grid} grid")
    with torch.no_grad():
        test_ll_plotted = float(flow.log_prob(torch.as_tensor(data.test)).mean())
    gx, gy, logp = _density_grid(flow, data, grid)
    result = _result(name, mname, seed, record, data, test_ll_plotted, (gx, gy, logp), options["out"])
    stem = out / f"toy2d_{name}_{mname}"
    atomic_write_json(stem.with_suffix(".json"), result)
    _figure(data, gx, gy, logp, result, stem.with_suffix(".png"))
    return result


def _result(
    name: str,
    mname: str,
    seed: int,
    record: Any,
    data: Dataset,
    test_ll_plotted: float,
    density: tuple[np.ndarray, np.ndarray, np.ndarray],
    out: str,
) -> dict[str, Any]:
    """The run's JSON: the record's figures beside what the grid shows (its mass, its non-finite points)."""
    gx, gy, logp = density
    mass = float(
        np.exp(np.where(np.isfinite(logp), logp, -np.inf)).sum() * (gx[0, 1] - gx[0, 0]) * (gy[1, 0] - gy[0, 0])
    )
    return {
        "data": name,
        "model": mname,
        "display_name": record.display_name,
        "seed": seed,
        "test_ll": record.test_ll,
        "test_ll_2se": record.test_ll_2se,
        "test_ll_plotted_model": test_ll_plotted,
        "best_val_ll": record.best_val_ll,
        "epochs": record.epochs,
        "best_epoch": record.best_epoch,
        "params": record.params,
        "status": record.status,
        "mass_on_grid": mass,
        "gaussian_test_ll": _gaussian_test_ll(data),
        "nonfinite_grid_points": int((~np.isfinite(logp)).sum()),
        "grid_points": int(logp.size),
        "record": str(record_path(out, data.name, mname, seed, record.tag)),
    }


def run_toy2d_all(
    names: list[str] | None = None,
    model: str = "relgrad",
    out: str | Path = "results/sanity",
    seed: int | None = None,
    max_epochs: int | None = None,
    quick: bool = False,
    hparams: dict[str, Any] | None = None,
    progress: Progress = QUIET,
    log: Callable[[str], None] = print,
    **train: Any,
) -> list[dict[str, Any]]:
    """:func:`run_toy2d` for each of ``names`` (default: all of :data:`TOY_DATA`), with the command line's
    defaults: seed 0, at most 100 epochs on a 200-point grid (``quick``: 2 epochs, 60 points); one ``log``
    line per data set as it ends. Options are checked before the first model trains; ``train`` passes
    patience, lr and batch_size through."""
    mname = get_spec(model).name  # a name or a reference (ConfigError saying what is wrong); files use the name
    names = list(TOY_DATA) if names is None else list(names)
    for name in names:
        if name not in TOY_DATA:
            raise ConfigError(f"unknown toy data {name!r}; choose one of {', '.join(TOY_DATA)}")
    seed = 0 if seed is None else seed
    check_seed(seed)
    check_number("--lr", train.get("lr"))
    out = output_dir(out)
    results = []
    for name in names:
        r = run_toy2d(
            name,
            model,
            out,
            seed=seed,
            max_epochs=pick(max_epochs, 100, 2, quick),
            hparams=hparams,
            grid=60 if quick else 200,
            progress=progress,
            **train,
        )
        log(
            f"{name}: {r['display_name']} test LL {r['test_ll']:.3f} ± {r['test_ll_2se']:.3f} nats "
            f"({r['epochs']} epochs; Gaussian {r['gaussian_test_ll']:.3f}) → {out / f'toy2d_{name}_{mname}.png'}"
        )
        results.append(r)
    return results


def _figure(
    data: Dataset, gx: np.ndarray, gy: np.ndarray, logp: np.ndarray, result: dict[str, Any], path: Path
) -> None:
    with figure(path, 1, 2, figsize=(11, 5)) as (fig, (a, b)):
        _draw(fig, a, b, data, gx, gy, logp, result)


def _draw(
    fig: Figure,
    a: Axes,
    b: Axes,
    data: Dataset,
    gx: np.ndarray,
    gy: np.ndarray,
    logp: np.ndarray,
    result: dict[str, Any],
) -> None:
    extent = (gx.min(), gx.max(), gy.min(), gy.max())
    a.scatter(data.train[:, 0], data.train[:, 1], s=2, c="k", alpha=0.35)
    a.set(xlim=extent[:2], ylim=extent[2:], aspect="equal", title=f"{data.name}: {len(data.train)} training points")
    # Density, not log-density: what a reader compares with the scatter; clipped so outliers don't wash it out.
    # Non-finite log-densities (a numerically broken model off the data) are masked and drawn in cyan, −inf
    # too: exp(−inf) = 0 would draw it black, as the lowest density, where the title promises cyan.
    dens = np.ma.masked_invalid(np.where(np.isfinite(logp), np.exp(np.minimum(logp, 50.0)), np.nan))
    finite = dens.compressed()
    cmap = colormap("magma", bad="cyan")
    vmax = float(np.quantile(finite, 0.999)) if finite.size else 1.0
    im = b.imshow(dens, origin="lower", extent=extent, cmap=cmap, vmin=0.0, vmax=vmax, aspect="equal")
    b.grid(False)  # grid lines over an image hide the density
    fig.colorbar(im, ax=b, shrink=0.8, label="learned density p(x)")
    b.set_title(
        f"{result['display_name'] or result['model']}: test LL {result['test_ll']:.3f} nats\n"
        f"({result['epochs']} epochs; full-covariance Gaussian {result['gaussian_test_ll']:.3f})"
        + (
            f"\ncyan: {result['nonfinite_grid_points']} grid points with non-finite log p"
            if result["nonfinite_grid_points"]
            else ""
        )
    )
    for ax in (a, b):
        ax.set(xlabel="x₁ (standardised)", ylabel="x₂ (standardised)")
