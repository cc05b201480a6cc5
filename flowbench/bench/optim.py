"""Does the relative gradient need more iterations than the ordinary one? (Gresele et al. 2020, Fig. 1 right.)

Full-batch gradient descent on N points in 2-D with a two-layer relgrad flow; the same initialisations for
both methods; the exact NLL (mean over the points, nats) recorded every epoch.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from flowbench.models import build_model


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


def run_optim(n_points: int = 1000, inits: int = 10, epochs: int = 1000, lr: float = 0.1, layers: int = 2,
              seed: int = 0, bias: bool = True, bias_logdet: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Loss curves ``{"relative": [[...] × inits], "ordinary": [...]}``; a diverged run ends with NaN."""
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
            losses = []
            for _ in range(epochs):
                flow.zero_grad(set_to_none=True)
                loss = -flow.log_prob(x).mean()  # exact value; gradient relative or ordinary per the flow
                value = float(loss.detach())
                losses.append(value)
                if not math.isfinite(value):
                    break
                loss.backward()
                flow.adjust_gradients()
                with torch.no_grad():
                    for p in flow.parameters():
                        p.add_(p.grad, alpha=-lr)
            curves[method].append(losses)
        log(f"init {i}: final NLL relative {curves['relative'][-1][-1]:.4f}  ordinary {curves['ordinary'][-1][-1]:.4f}")
    summary = {}
    for method, runs in curves.items():
        finals = [r[-1] for r in runs]
        summary[method] = {"final_nll": finals, "diverged": sum(not math.isfinite(f) for f in finals)}
    # epochs to get within 0.01 nats of the best loss any run of either method reached
    target = min(min(v for v in r if math.isfinite(v)) for rs in curves.values() for r in rs) + 0.01
    for method, runs in curves.items():
        summary[method]["epochs_to_within_0.01_of_best"] = [
            next((e for e, v in enumerate(r) if v <= target), None) for r in runs]
    return {"n_points": n_points, "inits": inits, "epochs": epochs, "lr": lr, "layers": layers, "seed": seed,
            "bias": bias, "bias_logdet": bias_logdet,
            "curves": curves, "summary": summary}


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowbench.utils import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = {"relative": "tab:blue", "ordinary": "tab:orange"}
    for method, runs in result["curves"].items():
        for i, r in enumerate(runs):
            ax.plot(range(len(r)), r, color=colors[method], alpha=0.6, lw=1, label=method if i == 0 else None)
    ax.set_xlabel("epoch (full-batch gradient descent)")
    ax.set_ylabel("negative log-likelihood (nats)")
    rule = "no bias" if not result.get("bias", True) else (
        "bias rule: augmented (−b)" if result.get("bias_logdet") else "bias rule: reference (no −b)")
    ax.set_title(f"relative vs ordinary gradient, {result['inits']} shared inits, lr={result['lr']:g}, {rule}",
                 fontsize=9)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
