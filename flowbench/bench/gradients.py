"""Cost of one gradient of the exact NLL of an L-layer dense flow (Gresele et al. 2020, Fig. 1 left, H.1).

Methods (same flow, same batch, loss = −mean log p(x)):

- ``relative``  — flowbench's relgrad: relative gradient formed in backward, O(L·B·D²), no inverse/determinant.
- ``ordinary``  — autograd through the data terms plus ``slogdet(W_k)`` (its backward needs W⁻¹: O(L·D³)).
- ``autodiff``  — what a user would naively write: per-example Jacobian ``vmap(jacrev(net))`` and ``slogdet``
  of each (B·D×D memory, O(B·L·D³) time).
- ``mlp``       — the floor: a plain MLP of the same shapes, forward + backward, no log-det terms.

Timing: warm-up calls, then the methods are timed round-robin (one call of each per round) so that the
machine's load drifts hit all methods alike (methods slower than 1 s per call are timed after the others,
on their own); the median per method is reported; at most ``budget_s`` of timed calls per method and D. CUDA is synchronised
around every call. Memory: CUDA → ``torch.cuda.max_memory_allocated`` over one call minus what was allocated
before it; CPU → a predicted-bytes model (:func:`predicted_bytes`), or with ``cpu_memory="rss"`` the peak RSS
increase of a fresh subprocess running one call (VmHWM after − VmRSS before, with the peak reset through
``/proc/self/clear_refs``; ``ru_maxrss`` is useless here as a spawned child inherits the parent's peak).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flowbench.errors import FlowbenchError
from flowbench.models import build_model
from flowbench.models.relgrad_autograd import TANH_A, TANH_B

METHODS = ("relative", "ordinary", "autodiff", "mlp")
# Exponent of D in each method's cost (B fixed), used to predict whether the next D is too slow.
_TIME_EXPONENT = {"relative": 2, "mlp": 2, "ordinary": 3, "autodiff": 3}


class AgreementError(FlowbenchError):
    """The methods disagree: the benchmark would time a wrong computation."""


@dataclass
class Cell:
    """One (method, D) measurement."""

    method: str
    dim: int
    status: str = "ok"  # ok | skipped-memory | skipped-time | failed
    median_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    memory_bytes: int | None = None
    memory_method: str = ""
    predicted_bytes: int = 0
    note: str = ""


def predicted_bytes(method: str, dim: int, batch: int, layers: int, dtype_bytes: int = 4) -> int:
    """Peak working memory of one gradient, counted from the tensors each method must hold.

    params + grads (2·L·(D²+D)); per layer a few B×D activations; ``ordinary`` adds the LU factors and
    inverse of each W (≈3·D² per layer); ``autodiff`` holds per-example Jacobians, their cotangents and the
    batched LU (≈ (5L + 4)·B·D²; at L = 2, B = 100, D = 256 this predicts 367 MB against 353 MiB measured as
    peak RSS increase on CPU).
    """
    p = 2 * layers * (dim * dim + dim)
    act = 8 * layers * batch * dim
    extra = {"relative": 0, "mlp": 0, "ordinary": 3 * layers * dim * dim,
             "autodiff": (5 * layers + 4) * batch * dim * dim}[method]
    return int((p + act + extra) * dtype_bytes)


def available_bytes(device: torch.device) -> int:
    """Free memory a method may use: CUDA free memory, else MemAvailable from /proc/meminfo (or 8 GiB)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def make_problem(dim: int, batch: int, layers: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A relgrad flow moved away from its orthogonal init (so WᵀW ≠ I) and a standard-normal batch."""
    gen = torch.Generator().manual_seed(seed)
    flow = build_model("relgrad", dim, layers=layers)
    with torch.no_grad():
        for w in flow.transform.weights:
            w.add_(torch.randn(w.shape, generator=gen) * (0.3 / math.sqrt(dim)))
        for b in flow.transform.biases:
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    flow = flow.to(device=device, dtype=dtype)
    x = torch.randn(batch, dim, generator=gen).to(device=device, dtype=dtype)
    return flow, x


def _net(flow, x: Tensor) -> Tensor:
    """z = g(x) with plain differentiable ops (no custom autograd, no log-det): for autodiff and the MLP."""
    t = flow.transform
    n = len(t.weights)
    h = x
    for k in range(n):
        h = F.linear(h, t.weights[k], t.biases[k] if t.biases is not None else None)
        if k < n - 1:
            # s(y) only: t._act would also compute Σ log s'(y), which neither autodiff nor the floor uses
            h = t.alpha * h + (1 - t.alpha) * F.softplus(h) if t.activation != "tanh" else (
                torch.tanh(TANH_A * h) + TANH_B * h)
    return h


def step_fn(method: str, flow, x: Tensor) -> Callable[[], None]:
    """A closure computing one full gradient into ``.grad`` of ``flow``'s parameters."""
    params = list(flow.parameters())

    def zero() -> None:
        for p in params:
            p.grad = None

    if method in ("relative", "ordinary"):
        def run() -> None:
            zero()
            flow.relative = method == "relative"
            (-flow.train_log_prob(x).mean()).backward()
            flow.adjust_gradients()
    elif method == "autodiff":
        from torch.func import jacrev, vmap

        def run() -> None:
            zero()
            flow.relative = False
            jac = vmap(jacrev(lambda xi: _net(flow, xi[None])[0]))(x)  # (B, D, D) per-example Jacobians
            z = _net(flow, x)
            (-(flow.base.log_prob(z) + torch.linalg.slogdet(jac)[1]).mean()).backward()
    elif method == "mlp":
        def run() -> None:
            zero()
            (0.5 * _net(flow, x).pow(2).sum(-1).mean()).backward()
    else:
        raise FlowbenchError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return run


def check_agreement(dim: int = 12, batch: int = 16, layers: int = 2, tol: float = 1e-8) -> dict:
    """float64: autodiff == ordinary (Euclidean gradient), and relative == ordinary transformed by the
    projected relative-gradient rule (W: G WᵀW; b: augmented-matrix block, reference convention)."""
    flow, x = make_problem(dim, batch, layers, torch.device("cpu"), torch.float64, seed=123)
    grads = {}
    for m in ("relative", "ordinary", "autodiff"):
        step_fn(m, flow, x)()
        grads[m] = [p.grad.clone() for p in flow.parameters()]
    names = [n for n, _ in flow.named_parameters()]
    errors = {"autodiff_vs_ordinary": 0.0, "relative_vs_transformed_ordinary": 0.0}
    t = flow.transform
    for i, name in enumerate(names):
        g_ord, g_ad = grads["ordinary"][i], grads["autodiff"][i]
        scale = max(1.0, float(g_ord.abs().max()))
        errors["autodiff_vs_ordinary"] = max(errors["autodiff_vs_ordinary"], float((g_ad - g_ord).abs().max()) / scale)
    for k, w in enumerate(t.weights):
        w = w.detach()
        iw = names.index(f"transform.weights.{k}")
        gw = grads["ordinary"][iw]
        # [G_W, g_b]·ÂᵀÂ with Â = [[W, b], [0, 1]]: W block G_W WᵀW + g_b bᵀW, b block G_W Wᵀb + g_b (1 + bᵀb).
        # G_W holds the log-det's −W⁻ᵀ, so the W block already contains −W; the b block gets −W⁻ᵀWᵀb = −b,
        # which we add back because the reference applies the log-det term to W only.
        exp_w = gw @ w.t() @ w
        err_b = 0.0
        if t.biases is not None:
            ib = names.index(f"transform.biases.{k}")
            b, gb = t.biases[k].detach(), grads["ordinary"][ib]
            exp_w = exp_w + torch.outer(gb, b @ w)
            exp_b = gw @ (w.t() @ b) + gb * (1 + b @ b) + b
            err_b = float((grads["relative"][ib] - exp_b).abs().max()) / max(1.0, float(exp_b.abs().max()))
        err = float((grads["relative"][iw] - exp_w).abs().max()) / max(1.0, float(exp_w.abs().max()))
        err = max(err, err_b)
        errors["relative_vs_transformed_ordinary"] = max(errors["relative_vs_transformed_ordinary"], err)
    if max(errors.values()) > tol:
        raise AgreementError(f"gradient methods disagree beyond {tol:g} (float64, D={dim}): {errors}")
    return errors


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _cuda_peak(fn: Callable[[], None], device: torch.device) -> int:
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def _rss_child(method: str, dim: int, batch: int, layers: int, dtype: str, threads: int, queue) -> None:  # pragma: no cover
    torch.set_num_threads(threads)
    flow, x = make_problem(dim, batch, layers, torch.device("cpu"), getattr(torch, dtype))
    fn = step_fn(method, flow, x)
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (peak RSS) to the current RSS (Linux ≥ 4.0)
        f.write("5")
    before = _proc_status_kib("VmRSS")
    fn()
    queue.put((_proc_status_kib("VmHWM") - before) * 1024)


def rss_peak(method: str, dim: int, batch: int, layers: int, dtype: torch.dtype) -> int | None:
    """Peak RSS increase (VmHWM after − VmRSS before, peak reset via /proc/self/clear_refs) over one call in
    a fresh spawned process, so that memory cached by earlier calls cannot hide the peak; None if it died."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    args = (method, dim, batch, layers, str(dtype).split(".")[-1], torch.get_num_threads(), q)
    p = ctx.Process(target=_rss_child, args=args)
    p.start()
    p.join()
    return q.get() if p.exitcode == 0 and not q.empty() else None


def run_gradients(dims: list[int], batch: int = 100, layers: int = 2, device: str | torch.device = "cpu",
                  repeats: int = 10, warmup: int = 2, methods: tuple[str, ...] = METHODS,
                  dtype: torch.dtype = torch.float32, memory_limit: int | None = None,
                  max_call_s: float = 60.0, budget_s: float = 60.0, cpu_memory: str = "predicted",
                  log: Callable[[str], None] = print) -> list[Cell]:
    """Measure every (method, D); methods predicted not to fit (memory) or too slow are skipped, not run."""
    device = torch.device(device)
    limit = memory_limit if memory_limit is not None else int(0.8 * available_bytes(device))
    last: dict[str, tuple[int, float]] = {}
    cells: list[Cell] = []
    for dim in dims:
        flow, x = make_problem(dim, batch, layers, device, dtype)
        active: dict[str, Callable[[], None]] = {}
        row: dict[str, Cell] = {}
        for m in methods:
            c = row[m] = Cell(m, dim, predicted_bytes=predicted_bytes(m, dim, batch, layers, dtype.itemsize))
            if c.predicted_bytes > limit:
                c.status, c.note = "skipped-memory", f"predicted {c.predicted_bytes / 2**30:.2f} GiB > limit {limit / 2**30:.2f} GiB"
            elif m in last:
                d0, t0 = last[m]
                guess = t0 * (dim / d0) ** _TIME_EXPONENT[m]
                if guess > max_call_s:
                    c.status, c.note = "skipped-time", f"predicted {guess:.0f} s per call > --max-call-s {max_call_s:g}"
            if c.status == "ok":
                active[m] = step_fn(m, flow, x)
        reps: dict[str, int] = {}
        first: dict[str, float] = {}
        for m, fn in list(active.items()):
            c = row[m]
            try:
                t_first = _timed(fn, device)  # first call: allocations, kernel selection
                for _ in range(warmup - 1 if t_first < 1.0 else 0):  # slow methods need no further warm-up
                    t_first = _timed(fn, device)
                if device.type == "cuda":
                    c.memory_bytes, c.memory_method = _cuda_peak(fn, device), "cuda max_memory_allocated"
                elif cpu_memory == "rss":
                    c.memory_bytes, c.memory_method = rss_peak(m, dim, batch, layers, dtype), "peak RSS increase (subprocess)"
                else:
                    c.memory_bytes, c.memory_method = c.predicted_bytes, "predicted"
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # OOM despite the prediction
                c.status, c.note = "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                del active[m]
                continue
            first[m] = t_first
            reps[m] = max(1, min(repeats, int(budget_s / max(t_first, 1e-9))))
        # Round-robin over the fast methods so that load changes hit them alike; methods slower than 1 s a
        # call are timed afterwards on their own (their large allocations would disturb the fast ones).
        slow = {m for m in active if row[m].status == "ok" and first[m] >= 1.0}
        for group in ([m for m in active if m not in slow], [m for m in active if m in slow]):
            for r in range(max((reps[m] for m in group), default=0)):
                for m in group:
                    if r < reps[m]:
                        row[m].times_s.append(_timed(active[m], device))
        for m in methods:
            c = row[m]
            if c.times_s:
                c.median_s = statistics.median(c.times_s)
                last[m] = (dim, c.median_s)
            cells.append(c)
            log(_format_cell(c))
        del flow, x, active
    return cells


def _format_cell(c: Cell) -> str:
    if c.status != "ok":
        return f"D={c.dim:>6} {c.method:>9}: {c.status} ({c.note})"
    mem = f"{c.memory_bytes / 2**20:.1f} MiB ({c.memory_method})" if c.memory_bytes is not None else "n/a"
    return f"D={c.dim:>6} {c.method:>9}: {c.median_s * 1e3:10.2f} ms  (n={len(c.times_s)})  mem {mem}"


def summary_rows(cells: list[Cell]) -> list[dict]:
    """One row per D: median ms per method and the speed-up of relative over each other method."""
    rows = []
    for dim in sorted({c.dim for c in cells}):
        by = {c.method: c for c in cells if c.dim == dim}
        row: dict = {"D": dim}
        for m, c in by.items():
            row[f"{m}_ms"] = round(c.median_s * 1e3, 3) if c.median_s is not None else c.status
        rel = by.get("relative")
        for m in ("ordinary", "autodiff", "mlp"):
            c = by.get(m)
            if rel and rel.median_s and c and c.median_s:
                key = "relative_over_mlp" if m == "mlp" else f"speedup_vs_{m}"
                row[key] = round(rel.median_s / c.median_s if m == "mlp" else c.median_s / rel.median_s, 3)
        rows.append(row)
    return rows


def cells_to_dicts(cells: list[Cell]) -> list[dict]:
    return [asdict(c) for c in cells]


def plot(cells: list[Cell], path, title: str) -> None:
    """Log–log time vs D, one line per method (skipped points left out), like the paper's Figure 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowbench.utils import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in METHODS:
        pts = sorted((c.dim, c.median_s) for c in cells if c.method == m and c.median_s)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("dimension D")
    ax.set_ylabel("seconds per gradient (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
