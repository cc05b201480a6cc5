"""Local executors: in this process, or in N spawned worker processes.

An executor has ``capacity`` (runs at once), ``submit(run, options, out) -> token``,
``wait(tokens, timeout) -> [(token, outcome)]`` and ``shutdown(cancel)``; optionally ``finish`` (write a
record the worker returned), ``save_log`` and ``submit_stack(runs, options, out) -> token`` (several runs of
one shape as one stack; the sweep stacks runs only on executors that have it). Outcomes are
:func:`flowbench.sweep.worker.execute_run` dicts, or :func:`~flowbench.sweep.worker.execute_stack` dicts for
stacks.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable

from flowbench import interrupts
from flowbench.config import RunOptions
from flowbench.errors import ConfigError, UsageError
from flowbench.sweep.ray_backend import RayExecutor
from flowbench.sweep.spec import SweepRun
from flowbench.sweep.worker import RunFn, execute_run, execute_stack, init_worker

__all__ = ["SequentialExecutor", "ProcessExecutor", "make_backend"]


class SequentialExecutor:
    """In this process, one run at a time, with the trainer's own progress output."""

    capacity = 1
    announce_start = True  # the trainer's output follows: say which run it belongs to
    trains_here = True  # a stop is the training loop's to answer (interrupts.listening), not the driver's

    def __init__(self, run_fn: str | RunFn):
        self.run_fn = run_fn
        self._results: dict[int, dict] = {}
        self._next = 0

    def submit(self, run: SweepRun, options: RunOptions, out: str | Path) -> int:
        token, self._next = self._next, self._next + 1
        self._results[token] = execute_run(options, self.run_fn, log_path=None, progress=True)
        return token

    def submit_stack(self, runs: list[SweepRun], options: list[RunOptions], out: str | Path) -> int:
        token, self._next = self._next, self._next + 1
        self._results[token] = execute_stack(options, None, progress=True)
        return token

    def wait(self, tokens: list, timeout: float) -> list[tuple[Any, dict]]:
        return [(t, self._results.pop(t)) for t in tokens if t in self._results]

    def shutdown(self, cancel: bool = False) -> None:
        pass


class ProcessExecutor:
    """``workers`` spawned processes; spawn (not fork) because forking a process that holds torch threads is
    unsafe, and it starts workers with a clean interpreter on every platform."""

    def __init__(self, run_fn: str | RunFn, workers: int, threads: int = 1):
        self.run_fn, self.capacity, self.threads = run_fn, workers, threads
        self._ctx = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            self.capacity, mp_context=self._ctx, initializer=init_worker, initargs=(self.threads,)
        )
        # CPython starts a spawn pool's workers one per submit and wakes its manager thread before the new
        # worker exists, so the manager may not watch the last one: that worker dying (killed, out of memory)
        # went unnoticed until another worker finished its run, and its run waited hours for the retry. Every
        # worker started at once, with a no-op, and its result awaited: the manager watches them all.
        try:
            with interrupts.deferred():  # before the sweep's loop (which defers its own ticks): a stop waits for it
                for started in [pool.submit(os.getpid) for _ in range(self.capacity)]:
                    started.result()
        except BrokenProcessPool as e:
            raise UsageError(
                f"the sweep's worker processes could not start ({e}); run it with --workers 1 to see why"
            ) from e
        except BaseException:  # stopped while it started: no one else knows of its workers
            _stop(pool)
            raise
        return pool

    def submit(self, run: SweepRun, options: RunOptions, out: str | Path) -> Future:
        log = str(run.log_path(out))
        try:
            return self._pool.submit(execute_run, options, self.run_fn, log, True)
        except BrokenProcessPool:
            self._pool = self._new_pool()  # a worker died earlier; later runs get a fresh pool
            return self._pool.submit(execute_run, options, self.run_fn, log, True)

    def submit_stack(self, runs: list[SweepRun], options: list[RunOptions], out: str | Path) -> Future:
        logs = [str(r.log_path(out)) for r in runs]
        try:
            return self._pool.submit(execute_stack, options, logs, True)
        except BrokenProcessPool:
            self._pool = self._new_pool()
            return self._pool.submit(execute_stack, options, logs, True)

    def wait(self, tokens: list, timeout: float) -> list[tuple[Any, dict]]:
        done, _ = wait(tokens, timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        broken = False
        for fut in done:
            try:
                out.append((fut, fut.result()))
            except BrokenProcessPool as e:  # the worker process died (killed, out of memory, segfault)
                broken = True
                out.append((fut, {"ok": False, "error": f"worker process died: {e}", "traceback": ""}))
            except Exception as e:  # noqa: BLE001 - e.g. options that cannot be pickled
                out.append((fut, {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": ""}))
        if broken:
            self._replace_pool()
        return out

    def _replace_pool(self) -> None:
        """A broken pool fails every run in it and terminates its other workers; wait until they have exited
        before the runs are retried: a worker being terminated still holds its run's lock, and its run would be
        set aside as trained elsewhere by a process about to die."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._new_pool()

    def shutdown(self, cancel: bool = False) -> None:
        if cancel:
            # Interrupted (Ctrl-C, a SIGTERM to this process alone): the runs in flight stop too, from their last
            # checkpoints; left running, they would train on unwatched, and this process would wait for them at
            # exit.
            _stop(self._pool)
        else:
            self._pool.shutdown()


def _stop(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's workers (SIGTERM: each running one stops at a step and writes its checkpoints) and
    shut it down without waiting. The pool offers no public way before Python 3.14's terminate_workers()."""
    stop = getattr(pool, "terminate_workers", None)
    if stop is not None:
        stop()
    else:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def make_backend(
    executor: str,
    run_fn: str | RunFn,
    workers: int,
    address: str | None,
    cpus_per_run: int,
    gpus_per_run: float,
    announce: Callable[[str], None] | None = None,
) -> Any:
    """The executor object for ``--executor`` / ``--workers``."""
    if executor == "local":
        if address is not None or gpus_per_run:
            raise ConfigError("--address and --gpus-per-run are for --executor ray")
        return SequentialExecutor(run_fn) if workers == 1 else ProcessExecutor(run_fn, workers, cpus_per_run)
    if executor == "ray":
        if not isinstance(run_fn, str):
            raise ConfigError("the Ray executor needs run_fn as an importable 'module:function' string")
        # --workers N: at most N runs at once; a local instance started here then gets N x C CPUs.
        limit = workers if workers > 1 else None
        return RayExecutor(
            run_fn,
            address=address,
            cpus_per_run=cpus_per_run,
            gpus_per_run=gpus_per_run,
            max_concurrent=limit,
            num_cpus=limit * cpus_per_run if limit else None,
            announce=announce,
        )
    raise ConfigError(f"unknown executor {executor!r}; choose local or ray")
