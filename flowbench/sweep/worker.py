"""What runs inside a worker (the driver's own process, a local worker process, or a Ray task).

Kept free of top-level torch imports: a spawned worker must be able to set its thread count before torch
loads. Failures are returned as values (type, message, traceback text) rather than raised, so that every
executor reports them the same way and nothing depends on an exception surviving pickling.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import inspect
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from flowbench import interrupts
from flowbench.errors import FlowbenchError, RunLocked, advice_format
from flowbench.sweep.artifacts import ARTIFACTS, pack_run, plant_record

if TYPE_CHECKING:  # workers import this module first; keep it light
    from flowbench.config import RunOptions
    from flowbench.results import RunRecord

__all__ = [
    "RunFn",
    "DEFAULT_RUN_FN",
    "STACK_FN",
    "resolve_run_fn",
    "execute_run",
    "execute_stack",
    "init_worker",
    "ray_execute",
    "ray_execute_stack",
]

RunFn = Callable[..., "RunRecord"]
#: ``module:function`` of the function that trains one run (the trainer's entry point).
DEFAULT_RUN_FN = "flowbench.training:run_experiment"
#: ``module:function`` that trains several runs of one shape as one stack (used with the default run_fn).
STACK_FN = "flowbench.training.stacked:run_stacked"
#: How much of a Ray task's captured output is sent back to the driver for its log file.
LOG_TAIL_CHARS = 20_000


def resolve_run_fn(run_fn: str | RunFn) -> RunFn:
    """A callable, or ``"module:function"`` imported here (so it can cross process boundaries by name)."""
    if callable(run_fn):
        return run_fn
    module, _, name = run_fn.partition(":")
    return getattr(importlib.import_module(module), name)


def init_worker(threads: int) -> None:
    """Process-pool initializer: ``threads`` torch threads per worker, so N workers don't oversubscribe."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    warnings.formatwarning = advice_format("sweep", warnings.formatwarning)  # into the run's log, as the CLI says it
    interrupts.stop_workers_on_sigterm()  # the driver stops its workers with SIGTERM: at a step, checkpoints written
    import torch  # lazy: after the thread variables are set, and this module stays light for workers

    torch.set_num_threads(threads)


def _call(fn: RunFn, options: RunOptions, progress: bool) -> RunRecord:
    try:
        takes_progress = "progress" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_progress = False
    return fn(options, progress=progress) if takes_progress else fn(options)


def execute_run(
    options: RunOptions,
    run_fn: str | RunFn = DEFAULT_RUN_FN,
    log_path: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one run; returns ``{"ok": True, "record": ...}`` or ``{"ok": False, "error": ..., "traceback": ...,
    "retry": bool, "locked": bool}`` (``retry`` False for a FlowbenchError, which is deterministic; ``locked``:
    another process holds the run's lock, so the run's files are that process's).

    With ``log_path`` the run's output (its epoch lines) is appended to that file instead of going to the
    terminal, so parallel runs don't interleave. KeyboardInterrupt is not caught: it stops the sweep.
    """
    t0 = time.perf_counter()
    with interrupts.worker_task(), _output_to(log_path):
        try:
            record = _call(resolve_run_fn(run_fn), options, progress)
        except Exception as e:  # noqa: BLE001 - any failure of one run is reported, the sweep goes on
            return {**_failure(e, log_path), "seconds": time.perf_counter() - t0}
    return {"ok": True, "record": record, "seconds": time.perf_counter() - t0}


@contextlib.contextmanager
def _output_to(log_path: str | None) -> Iterator[None]:
    """The run's stdout and stderr (epoch lines; no progress bars, as for any file) appended to ``log_path``,
    line-buffered, after a line that dates the attempt: a resumed or retried run keeps its earlier lines.
    None: as is."""
    if log_path is None:
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"# {dt.datetime.now().isoformat(sep=' ', timespec='seconds')}: started in process {os.getpid()}")
        yield


def _failure(e: Exception, log_path: str | None) -> dict[str, Any]:
    """The outcome of a run (or stack) that raised; ``retry`` is False for a FlowbenchError, which is
    deterministic (a usage error fails the same way again)."""
    tb = traceback.format_exc()
    if log_path is not None:
        print(tb, file=sys.stderr)
    return {
        "ok": False,
        "error": f"{type(e).__name__}: {e}",
        "traceback": tb,
        "retry": not isinstance(e, FlowbenchError),
        "locked": isinstance(e, RunLocked),
    }


@contextlib.contextmanager
def _scratch(threads: int) -> Iterator[str]:
    """A Ray task's node-local scratch folder (deleted afterwards, checkpoints with it), ``threads`` torch threads."""
    import torch  # lazy: this module stays light for workers (see the module docstring)

    torch.set_num_threads(max(1, threads))
    scratch = tempfile.mkdtemp(prefix="flowbench-sweep-")
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _sign(outcome: dict[str, Any], log: str) -> dict[str, Any]:
    """The outcome with the tail of the task's log (for the driver's log file) and the node's name."""
    with contextlib.suppress(OSError):
        outcome["log"] = Path(log).read_text(errors="replace")[-LOG_TAIL_CHARS:]
    outcome["node"] = os.uname().nodename
    return outcome


def ray_execute(options: RunOptions, run_fn: str, threads: int, replaces: bytes | None = None) -> dict[str, Any]:
    """Body of a Ray task: train into a node-local scratch folder and return the run to the driver.

    Results strategy (one, on purpose): records travel back to the driver, which writes them into its own
    results folder. Nodes need no shared filesystem, only flowbench and the prepared data (``data-root``).
    The price: checkpoints stay on the node and are deleted with the scratch folder, so a run that is
    retried on Ray starts again from epoch 0. The small model-state and per-point files travel back with the
    record (:func:`flowbench.sweep.artifacts.pack_run`). ``replaces``: the non-finite record the run replaces
    (:func:`flowbench.sweep.artifacts.replaced_record`), put where the run finds it.
    """
    with _scratch(threads) as scratch:
        opts = options.replace(out=scratch, resume=False)
        plant_record(opts, replaces)
        log = os.path.join(scratch, "run.log")
        outcome = _sign(execute_run(opts, run_fn, log_path=log, progress=True), log)
        if outcome["ok"]:
            outcome[ARTIFACTS] = pack_run(outcome["record"], scratch, options.out)
        return outcome


def execute_stack(
    options: list[RunOptions],
    log_paths: list[str] | None = None,
    progress: bool = True,
    stack_fn: str | Callable = STACK_FN,
) -> dict[str, Any]:
    """Train runs of one shape as one stack (:func:`flowbench.training.stacked.run_stacked`); returns
    ``{"ok": True, "records": [one per run, in order]}`` or the failure dict of :func:`execute_run`.

    The stack's output goes to the first log path, and what it added there is appended to the others, stopped or
    not: every run keeps its log, with its earlier attempts' lines (a run may have trained alone or in another
    stack before).
    """
    t0 = time.perf_counter()
    first = log_paths[0] if log_paths else None
    with interrupts.worker_task():
        start = _size(first)
        try:
            with _output_to(first):
                if first is not None:
                    print(f"# a stack of {len(options)} runs (seeds {[o.seed for o in options]}): one log for all")
                try:
                    records = resolve_run_fn(stack_fn)(list(options), progress=progress)
                    outcome = {"ok": True, "records": records}
                except Exception as e:  # noqa: BLE001 - the stack's failure is each of its runs' failure
                    outcome = _failure(e, first)
        finally:
            _append_from(first, (log_paths or [])[1:], start)
    outcome["seconds"] = time.perf_counter() - t0
    return outcome


def _size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path is not None else 0
    except OSError:
        return 0


def _append_from(source: str | None, targets: list[str], start: int) -> None:
    """Append ``source`` from byte ``start`` on to each of ``targets``."""
    if source is None or not targets:
        return
    with open(source, "rb") as f:
        f.seek(start)
        added = f.read()
    for target in targets:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with open(target, "ab") as out:
            out.write(added)


def ray_execute_stack(
    options: list[RunOptions], threads: int, replaces: list[bytes | None] | None = None
) -> dict[str, Any]:
    """:func:`ray_execute` for a stack: train into a scratch folder, return every run to the driver (its packed
    files a list, one per run, in order)."""
    with _scratch(threads) as scratch:
        opts = [o.replace(out=scratch, resume=False) for o in options]
        for o, data in zip(opts, replaces or [None] * len(opts)):
            plant_record(o, data)
        log = os.path.join(scratch, "run.log")
        outcome = _sign(execute_stack(opts, [log], progress=True), log)
        if outcome["ok"]:
            outcome[ARTIFACTS] = [pack_run(r, scratch, o.out) for o, r in zip(options, outcome["records"])]
        return outcome
