"""Does the relative gradient need more iterations than the ordinary one? (Gresele et al. 2020, Fig. 1 right.)

Full-batch gradient descent on N points in 2-D with a two-layer relgrad flow; the same initialisations for
both methods; the exact NLL (mean over the points, nats) recorded every epoch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from flowbench.bench.common import setup
from flowbench.errors import ConfigError
from flowbench.models import build_model
from flowbench.plotting import figure
from flowbench.utils import atomic_write_json, check_number

if TYPE_CHECKING:
    from flowbench.models.base import Flow


def toy_data(n: int = 1000, seed: int = 0) -> torch.Tensor:
    """A fixed non-Gaussian 2-D set: two noisy interleaved half-moons, standardised (float64)."""
    rng = np.random.RandomState(seed)
    t = rng.uniform(0, math.pi, n)
    upper = rng.rand(n) < 0.5
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    pts = np.stack([x, y], 1) + 0.1 * rng.randn(n, 2)
    pts = (pts - pts.mean(0)) / pts.std(0)
    return torch.from_numpy(pts)


def _descend(flow: Flow, x: torch.Tensor, epochs: int, lr: float) -> list[float]:
    """Full-batch gradient descent; the exact NLL before each step (a diverged run ends with NaN/inf)."""
    losses = []
    for _ in range(epochs):
        flow.zero_grad(set_to_none=True)
        loss = -flow.log_prob(x).mean()  # exact value; gradient relative or ordinary per the flow
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            break
        loss.backward()
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(p.grad, alpha=-lr)
    return losses


def _summary(curves: dict[str, list[list[float]]]) -> dict[str, dict]:
    """Final NLLs, divergences, and epochs to get within 0.01 nats of the best loss any run reached."""
    summary = {}
    for method, runs in curves.items():
        finals = [r[-1] for r in runs]
        summary[method] = {"final_nll": finals, "diverged": sum(not math.isfinite(f) for f in finals)}
    finite = [v for rs in curves.values() for r in rs for v in r if math.isfinite(v)]
    target = min(finite) + 0.01 if finite else -math.inf
    for method, runs in curves.items():
        summary[method]["epochs_to_within_0.01_of_best"] = [
            next((e for e, v in enumerate(r) if v <= target), None) for r in runs
        ]
    return summary


def _check(n_points: int, inits: int, epochs: int, layers: int, lr: float, seed: int) -> None:
    if min(n_points, inits, epochs, layers) < 1:
        raise ConfigError(
            f"--points, --inits, --epochs and the depth must be ≥ 1; got {n_points}, {inits}, {epochs}, {layers}"
        )
    check_number("--lr", lr)
    if not 0 <= seed < 2**32:  # the data's numpy RandomState takes no other seeds
        raise ConfigError(f"--seed must be an integer in [0, 2**32); got {seed}")


def run_optim(
    n_points: int = 1000,
    inits: int = 10,
    epochs: int = 1000,
    lr: float = 0.1,
    layers: int = 2,
    seed: int = 0,
    bias: bool = True,
    bias_logdet: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Loss curves ``{"relative": [[...] × inits], "ordinary": [...]}``; a diverged run ends with NaN."""
    _check(n_points, inits, epochs, layers, lr, seed)
    x = toy_data(n_points, seed)
    curves: dict[str, list[list[float]]] = {"relative": [], "ordinary": []}
    for i in range(inits):
        torch.manual_seed(seed + 1000 + i)  # shared initialisation i for both methods
        init = build_model("relgrad", 2, layers=layers, bias=bias).double().state_dict()
        for method in curves:
            flow = build_model("relgrad", 2, layers=layers, bias=bias).double()
            flow.relative = method == "relative"
            flow.transform.bias_logdet = bias_logdet
            flow.load_state_dict(init)
            curves[method].append(_descend(flow, x, epochs, lr))
        log(f"init {i}: final NLL relative {curves['relative'][-1][-1]:.4f}  ordinary {curves['ordinary'][-1][-1]:.4f}")
    return {
        "n_points": n_points,
        "inits": inits,
        "epochs": epochs,
        "lr": lr,
        "layers": layers,
        "seed": seed,
        "bias": bias,
        "bias_logdet": bias_logdet,
        "curves": curves,
        "summary": _summary(curves),
    }


def plot(result: dict, path: str | Path) -> None:
    """NLL vs epoch, every initialisation, relative in blue and ordinary in orange (paper Fig. 1 right)."""
    with figure(path, figsize=(6, 4.5), dpi=120) as (_fig, ax):
        colors = {"relative": "tab:blue", "ordinary": "tab:orange"}
        for method, runs in result["curves"].items():
            for i, r in enumerate(runs):
                ax.plot(range(len(r)), r, color=colors[method], alpha=0.6, lw=1, label=method if i == 0 else None)
        ax.set_xlabel("epoch (full-batch gradient descent)")
        ax.set_ylabel("negative log-likelihood (nats)")
        rule = (
            "no bias"
            if not result.get("bias", True)
            else ("bias rule: augmented (−b)" if result.get("bias_logdet") else "bias rule: reference (no −b)")
        )
        ax.set_title(f"relative vs ordinary gradient, {result['inits']} shared inits, lr={result['lr']:g}, {rule}")
        ax.legend()


def bench_optim(
    out: str | Path = "results",
    points: int = 1000,
    inits: int = 10,
    epochs: int = 1000,
    lr: float = 0.1,
    seed: int = 0,
    bias: bool = True,
    bias_logdet: bool = False,
    device: str = "auto",
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """``flowbench bench optim``: :func:`run_optim` (on the CPU, float64, whatever ``device`` says: the
    problem is 2-D), written to ``out/bench/optim.json`` and ``optim.png``; returns the record + ``"files"``."""
    _check(points, inits, epochs, 2, lr, seed)
    folder, _, machine = setup(out, device, threads, log)
    res = run_optim(points, inits, epochs, lr, seed=seed, bias=bias, bias_logdet=bias_logdet, log=log)
    res["machine"] = machine
    files = [folder / "optim.json", folder / "optim.png"]
    atomic_write_json(files[0], res)
    plot(res, files[1])
    return {**res, "files": [str(f) for f in files]}
