"""Cost of one gradient of the exact NLL of an L-layer dense flow (Gresele et al. 2020, Fig. 1 left, H.1).

Methods (same flow, same batch, loss = −mean log p(x)):

- ``relative``  — flowbench's relgrad: relative gradient formed in backward, O(L·B·D²), no inverse/determinant.
- ``ordinary``  — autograd through the data terms plus ``slogdet(W_k)`` (its backward needs W⁻¹: O(L·D³)).
- ``autodiff``  — what a user would naively write: per-example Jacobian ``vmap(jacrev(net))`` and ``slogdet``
  of each (B·D×D memory, O(B·L·D³) time).
- ``mlp``       — the floor: a plain MLP of the same shapes, forward + backward, no log-det terms.

Timing: warm-up calls, then the methods are timed round-robin (one call of each per round) so that the
machine's load drifts hit all methods alike (methods slower than 1 s per call are timed after the others,
on their own); the median per method is reported; at most ``budget_s`` of timed calls per method and D.
CUDA is synchronised
around every call. Memory: CUDA → ``torch.cuda.max_memory_allocated`` over one call minus what was allocated
before it; CPU → a predicted-bytes model (:func:`predicted_bytes`), or with ``cpu_memory="rss"`` the peak RSS
increase of a fresh subprocess running one call (VmHWM after − VmRSS before, with the peak reset through
``/proc/self/clear_refs``; ``ru_maxrss`` is useless here as a spawned child inherits the parent's peak).
"""

from __future__ import annotations

import csv
import io
import math
import multiprocessing as mp
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import Tensor
from torch.func import jacrev, vmap

from flowbench.bench.common import setup
from flowbench.errors import ConfigError, FlowbenchError
from flowbench.models import build_model
from flowbench.models.relgrad_autograd import TANH_A, TANH_B
from flowbench.plotting import figure
from flowbench.utils import atomic_write, atomic_write_json, available_memory, check_number

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from matplotlib.axes import Axes

    from flowbench.models.relgrad import RelgradFlow

METHODS = ("relative", "ordinary", "autodiff", "mlp")
# Exponent of D in each method's cost (B fixed), used to predict whether the next D is too slow.
_TIME_EXPONENT = {"relative": 2, "mlp": 2, "ordinary": 3, "autodiff": 3}
#: A method predicted to take this long a call or longer gets a line before its warm-up (progress).
SLOW_CALL_S = 1.0


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
    extra = {
        "relative": 0,
        "mlp": 0,
        "ordinary": 3 * layers * dim * dim,
        "autodiff": (5 * layers + 4) * batch * dim * dim,
    }[method]
    return int((p + act + extra) * dtype_bytes)


def available_bytes(device: torch.device) -> int:
    """Free memory a method may use (:func:`flowbench.utils.available_memory`)."""
    return available_memory(str(device))


def make_problem(
    dim: int, batch: int, layers: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[RelgradFlow, Tensor]:
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


def _net(flow: RelgradFlow, x: Tensor) -> Tensor:
    """z = g(x) with plain differentiable ops (no custom autograd, no log-det): for autodiff and the MLP."""
    t = flow.transform
    n = len(t.weights)
    h = x
    for k in range(n):
        h = F.linear(h, t.weights[k], t.biases[k] if t.biases is not None else None)
        if k < n - 1:
            # s(y) only: t._act would also compute Σ log s'(y), which neither autodiff nor the floor uses
            h = (
                t.alpha * h + (1 - t.alpha) * F.softplus(h)
                if t.activation != "tanh"
                else (torch.tanh(TANH_A * h) + TANH_B * h)
            )
    return h


def step_fn(method: str, flow: RelgradFlow, x: Tensor) -> Callable[[], None]:
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
    elif method == "autodiff":

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
    for i, _ in enumerate(names):
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


def _rss_child(
    method: str,
    dim: int,
    batch: int,
    layers: int,
    dtype: str,
    threads: int,  # pragma: no cover
    queue: Queue[int],
) -> None:
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
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    args = (method, dim, batch, layers, str(dtype).split(".")[-1], torch.get_num_threads(), q)
    p = ctx.Process(target=_rss_child, args=args)
    p.start()
    p.join()
    return q.get() if p.exitcode == 0 and not q.empty() else None


def _plan(
    dim: int,
    batch: int,
    layers: int,
    methods: tuple[str, ...],
    dtype: torch.dtype,
    limit: int,
    last: dict[str, tuple[int, float]],
    max_call_s: float,
) -> dict[str, Cell]:
    """One cell per method at ``dim``; those predicted not to fit in ``limit`` bytes, or (from the time at
    the previous D and the method's exponent) to take longer than ``max_call_s`` a call, marked skipped."""
    row: dict[str, Cell] = {}
    for m in methods:
        c = row[m] = Cell(m, dim, predicted_bytes=predicted_bytes(m, dim, batch, layers, dtype.itemsize))
        if c.predicted_bytes > limit:
            c.status, c.note = (
                "skipped-memory",
                f"predicted {c.predicted_bytes / 2**30:.3g} GiB > limit {limit / 2**30:.3g} GiB",
            )
        elif m in last:
            d0, t0 = last[m]
            guess = t0 * (dim / d0) ** _TIME_EXPONENT[m]
            if guess > max_call_s:
                c.status, c.note = "skipped-time", f"predicted {guess:.3g} s per call > --max-call-s {max_call_s:g}"
    return row


def _warm_up(
    c: Cell,
    fn: Callable[[], None],
    device: torch.device,
    warmup: int,
    cpu_memory: str,
    problem: tuple[int, int, torch.dtype],
) -> float | None:
    """Untimed calls and the memory measurement; returns the last call's time, or None (cell marked
    failed) when the method ran out of memory despite the prediction."""
    batch, layers, dtype = problem
    try:
        t_first = _timed(fn, device)  # first call: allocations, kernel selection
        for _ in range(warmup - 1 if t_first < 1.0 else 0):  # slow methods need no further warm-up
            t_first = _timed(fn, device)
        if device.type == "cuda":
            c.memory_bytes, c.memory_method = _cuda_peak(fn, device), "cuda max_memory_allocated"
        elif cpu_memory == "rss":
            c.memory_bytes, c.memory_method = (
                rss_peak(c.method, c.dim, batch, layers, dtype),
                "peak RSS increase (subprocess)",
            )
        else:
            c.memory_bytes, c.memory_method = c.predicted_bytes, "predicted"
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # OOM despite the prediction
        c.status, c.note = "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return None
    return t_first


def _time_round_robin(
    row: dict[str, Cell],
    active: dict[str, Callable[[], None]],
    first: dict[str, float],
    reps: dict[str, int],
    device: torch.device,
) -> None:
    """Round-robin over the fast methods so that load changes hit them alike; methods slower than 1 s a
    call are timed afterwards on their own (their large allocations would disturb the fast ones)."""
    slow = {m for m in active if first[m] >= 1.0}
    for group in ([m for m in active if m not in slow], [m for m in active if m in slow]):
        for r in range(max((reps[m] for m in group), default=0)):
            for m in group:
                if r < reps[m]:
                    row[m].times_s.append(_timed(active[m], device))


def _warm_up_row(
    row: dict[str, Cell],
    active: dict[str, Callable[[], None]],
    last: dict[str, tuple[int, float]],
    device: torch.device,
    warmup: int,
    repeats: int,
    budget_s: float,
    cpu_memory: str,
    problem: tuple[int, int, torch.dtype],
    log: Callable[[str], None],
) -> tuple[dict[str, float], dict[str, int]]:
    """Warm up each active method of one D's ``row``: each one's last warm-up time, and how many timed calls
    fit in its budget. A method that ran out of memory leaves ``active``."""
    first: dict[str, float] = {}
    reps: dict[str, int] = {}
    for m in list(active):
        dim = row[m].dim
        if m in last and (guess := last[m][1] * (dim / last[m][0]) ** _TIME_EXPONENT[m]) >= SLOW_CALL_S:
            log(
                f"D={dim:>6} {m:>9}: about {guess:.3g} s a call (from D={last[m][0]}): one warm-up call, "
                f"then timed calls for about {max(budget_s, guess):.3g} s at most ..."
            )
        t = _warm_up(row[m], active[m], device, warmup, cpu_memory, problem)
        if t is None:
            del active[m]
            continue
        first[m] = t
        reps[m] = max(1, min(repeats, int(budget_s / max(t, 1e-9))))
    return first, reps


def run_gradients(
    dims: list[int],
    batch: int = 100,
    layers: int = 2,
    device: str | torch.device = "cpu",
    repeats: int = 10,
    warmup: int = 2,
    methods: tuple[str, ...] = METHODS,
    dtype: torch.dtype = torch.float32,
    memory_limit: int | None = None,
    max_call_s: float = 60.0,
    budget_s: float = 60.0,
    cpu_memory: str = "predicted",
    log: Callable[[str], None] = print,
) -> list[Cell]:
    """Measure every (method, D); methods predicted not to fit (memory) or too slow are skipped, not run.

    A line is logged as each D starts, and before the warm-up of a method predicted to take ``SLOW_CALL_S`` or
    more a call, so that the minute a large D can take is never silent (a row's results come at its end)."""
    device = torch.device(device)
    limit = memory_limit if memory_limit is not None else int(0.8 * available_bytes(device))
    last: dict[str, tuple[int, float]] = {}
    cells: list[Cell] = []
    for dim in dims:
        flow, x = make_problem(dim, batch, layers, device, dtype)
        row = _plan(dim, batch, layers, methods, dtype, limit, last, max_call_s)
        active = {m: step_fn(m, flow, x) for m, c in row.items() if c.status == "ok"}
        log(f"D={dim:>6}: timing {', '.join(active) or 'nothing (every method skipped)'} ...")
        first, reps = _warm_up_row(
            row, active, last, device, warmup, repeats, budget_s, cpu_memory, (batch, layers, dtype), log
        )
        _time_round_robin(row, active, first, reps, device)
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


#: Marker of a skipped / failed (method, D) on the plot's top edge, by kind of status.
_SKIP_MARKERS = {"skipped-memory": "v", "skipped-time": "x", "failed": "X"}
_SKIP_WORDS = {"skipped-memory": "memory", "skipped-time": "time", "failed": "failed"}


def draw(ax: Axes, cells: list[Cell]) -> list[str]:
    """Log–log time vs D, one line per method, like the paper's Figure 1. A (method, D) that was skipped or
    failed is a marker at its D along the top edge (one row per method, in its colour), with a legend
    entry saying why ("autodiff skipped (memory): D = 4096"). Returns the legend labels; raises
    :class:`~flowbench.errors.FlowbenchError` when no cell was measured (an empty plot says nothing)."""
    if not any(c.median_s for c in cells):
        reasons = sorted({f"{c.method} at D={c.dim}: {c.status} ({c.note})" for c in cells})
        raise FlowbenchError(
            "nothing to plot: no (method, D) was measured; "
            + "; ".join(reasons[:4])
            + ("; ..." if len(reasons) > 4 else "")
            + ". Raise --memory-limit-gb or --max-call-s, or pick smaller --dims"
        )
    import matplotlib.transforms as mtransforms  # lazy: only plotting needs matplotlib, which is slow to import

    top = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)  # x in data, y in axes units
    labels = []
    for i, m in enumerate(METHODS):
        mine = [c for c in cells if c.method == m]
        color = f"C{i}"
        pts = sorted((c.dim, c.median_s) for c in mine if c.median_s)
        if pts:
            ax.plot(*zip(*pts), marker="o", color=color, label=m)
            labels.append(m)
        for status, marker in _SKIP_MARKERS.items():
            dims = sorted(c.dim for c in mine if c.status == status)
            if dims:
                label = f"{m} skipped ({_SKIP_WORDS[status]}): D = {', '.join(map(str, dims))}"
                ax.scatter(
                    dims, [0.96 - 0.04 * i] * len(dims), transform=top, marker=marker, color=color, s=36, label=label
                )
                labels.append(label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    d = [c.dim for c in cells]
    ax.set_xlim(min(d) / 1.5, max(d) * 1.5)  # the markers are not data points: autoscaling would miss them
    ax.set_xticks(sorted(set(d)), [str(v) for v in sorted(set(d))])  # the measured D values, not powers of 10
    ax.minorticks_off()
    ax.set_xlabel("dimension D")
    ax.set_ylabel("seconds per gradient (median)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside: the top edge has markers
    return labels


def plot(cells: list[Cell], path: str | Path, title: str) -> None:
    """:func:`draw` into the PNG ``path`` (atomically; nothing is written when there is nothing to plot)."""
    with figure(path, figsize=(8.5, 4.5), dpi=120) as (_fig, ax):
        draw(ax, cells)
        ax.set_title(title)


CSV_FIELDS = ("method", "dim", "status", "median_s", "memory_bytes", "memory_method", "predicted_bytes", "note")


def write_csv(cells: list[Cell], path: str | Path) -> None:
    """One row per (method, D) with :data:`CSV_FIELDS`, atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
    w.writeheader()
    w.writerows(cells_to_dicts(cells))
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


def parse_methods(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """``"relative,mlp"`` → ``("relative", "mlp")``, checked against :data:`METHODS`."""
    methods = tuple(m.strip() for m in text.split(",") if m.strip()) if isinstance(text, str) else tuple(text)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    return methods


def _check_options(
    dims: list[int],
    batch: int,
    layers: int,
    repeats: int,
    warmup: int,
    memory_limit_gb: float | None,
    max_call_s: float,
    budget_s: float,
    cpu_memory: str,
    dtype: str,
) -> None:
    if not dims or min(dims) < 1:
        raise ConfigError(f"--dims must be positive integers; got {dims}")
    if batch < 1 or layers < 1 or repeats < 1:
        raise ConfigError("--batch, --layers and --repeats must be ≥ 1")
    if warmup < 0:
        raise ConfigError(f"--warmup must be ≥ 0; got {warmup}")
    check_number("--memory-limit-gb", memory_limit_gb)
    check_number("--max-call-s", max_call_s, allow_inf=True)  # inf: no cap
    check_number("--budget-s", budget_s)
    if cpu_memory not in ("predicted", "rss"):
        raise ConfigError(f"--cpu-memory must be predicted or rss; got {cpu_memory!r}")
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"--dtype must be float32 or float64; got {dtype!r}")


def bench_gradients(
    out: str | Path = "results",
    dims: list[int] = (16, 64, 256, 784, 2048, 4096),
    batch: int = 100,
    layers: int = 2,
    methods: str | tuple[str, ...] = METHODS,
    repeats: int = 10,
    warmup: int = 2,
    dtype: str = "float32",
    memory_limit_gb: float | None = None,
    max_call_s: float = 60.0,
    budget_s: float = 60.0,
    cpu_memory: str = "predicted",
    check: bool = True,
    device: str = "auto",
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``flowbench bench gradients``: check the options, run the float64 agreement check (unless
    ``check=False``), measure, and write ``gradients.json``, ``.csv`` and ``.png`` under ``out/bench``.
    Returns the JSON record plus ``"files"``."""
    methods = parse_methods(methods)
    dims = list(dims)
    _check_options(dims, batch, layers, repeats, warmup, memory_limit_gb, max_call_s, budget_s, cpu_memory, dtype)
    folder, dev, machine = setup(out, device, threads, log)
    agreement = None
    if check:
        agreement = check_agreement(layers=layers)
        log(f"agreement check (float64, D=12): {agreement}")
    limit = int(memory_limit_gb * 2**30) if memory_limit_gb is not None else None
    cells = run_gradients(
        dims,
        batch=batch,
        layers=layers,
        device=dev,
        repeats=repeats,
        warmup=warmup,
        methods=methods,
        dtype=getattr(torch, dtype),
        memory_limit=limit,
        max_call_s=max_call_s,
        budget_s=budget_s,
        cpu_memory=cpu_memory,
        log=log,
    )
    record = _record(cells, machine, dev, batch, layers, dtype, agreement, log)
    title = f"one exact-NLL gradient, L={layers}, B={batch}, {dev}, {machine['threads']} threads"
    files = _write_files(folder, record, cells, title)
    return {**record, "files": [str(f) for f in files]}


def _record(
    cells: list[Cell],
    machine: dict,
    dev: torch.device,
    batch: int,
    layers: int,
    dtype: str,
    agreement: dict | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The JSON record of the measurement; its summary is logged as a table."""
    rows = summary_rows(cells)
    log(tabulate(rows, headers="keys", tablefmt="github"))
    return {
        "machine": machine,
        "device": str(dev),
        "batch": batch,
        "layers": layers,
        "dtype": dtype,
        "agreement": agreement,
        "cells": cells_to_dicts(cells),
        "summary": rows,
    }


def _write_files(folder: Path, record: dict[str, Any], cells: list[Cell], title: str) -> list[Path]:
    """gradients.json, .csv and .png under ``folder``; a failed plot says which files were written."""
    files = [folder / "gradients.json", folder / "gradients.csv", folder / "gradients.png"]
    atomic_write_json(files[0], record)
    write_csv(cells, files[1])
    try:
        plot(cells, files[2], title)
    except FlowbenchError as e:
        raise FlowbenchError(f"{e} (wrote {files[0]} and {files[1]}; no plot)") from e
    return files
