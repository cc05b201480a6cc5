"""Running a sweep: skip what is recorded, schedule the rest on an executor, retry, report progress.

The executors (``flowbench.sweep.executors`` and ``flowbench.sweep.ray_backend``) only start runs and
collect their outcomes; everything else happens here, the same way for all of them.

Retries are the driver's business for every executor: a run whose attempt crashed (or whose worker died) is
queued again, at most ``retries`` more times (a :class:`~flowbench.errors.FlowbenchError` is not a crash: it
would fail the same way again, so the run fails at once), then reported as failed while the rest of the sweep goes on.
Re-running the same sweep is the resume mechanism: recorded runs are skipped, and a local run that left a
checkpoint continues from it. A run whose record ended non-finite is made again and replaces it (as
``flowbench run`` does without ``--force``); ``--dry-run`` lists it as ``rerun (non-finite record)``.

Stacking (issue 11): pending runs of one shape (equal :func:`~flowbench.training.stacked.stack_key`: they may
differ in seed, lr, weight decay, patience and epoch cap) are submitted together as one unit that trains them
as one batched computation (:func:`~flowbench.training.stacked.run_stacked`), on every executor that has
``submit_stack``. Each run still gets its own record in the single-run format (plus its ``stack`` field), and
its own state here: retries, failures and the report are per run. Stacks are at most ``max_stack`` runs; by
default :func:`~flowbench.training.stacked.stack_cap` within 1/capacity of a quarter of the memory available,
and a group is split so that free executor slots are not left idle.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable

from tabulate import tabulate

from flowbench import interrupts, utils
from flowbench.config import RunOptions, fingerprint_display_name
from flowbench.errors import ConfigError, FlowbenchError, Terminated
from flowbench.results import RunRecord, json_safe, replaceable
from flowbench.sweep.artifacts import ARTIFACTS
from flowbench.sweep.executors import make_backend
from flowbench.sweep.spec import Sweep, SweepRun
from flowbench.sweep.worker import DEFAULT_RUN_FN, RunFn
from flowbench.utils import LockHeld, atomic_write_json, check_writable, exclusive_lock, lock_holder

__all__ = [
    "RunState",
    "SweepReport",
    "Progress",
    "run_sweep",
    "check_out",
    "check_resources",
    "plan",
    "preflight",
    "dry_run_text",
    "report_path",
    "summary",
]

#: How often the live line is refreshed while nothing finishes (seconds).
TICK_S = 1.0


def report_path(name: str, out: str | Path) -> Path:
    return Path(out) / "sweeps" / f"{name}.json"


@dataclass
class RunState:
    """What happened to one run in this sweep invocation."""

    run: SweepRun
    status: str = "pending"  # pending | skipped | done | failed | elsewhere (another process is training it)
    attempts: int = 0
    error: str | None = None
    seconds: float = 0.0
    record: RunRecord | None = field(default=None, repr=False)
    options: RunOptions | None = field(default=None, repr=False)  # resolved by preflight()
    resumed: bool = False  # the current attempt continues from a checkpoint
    resume_failed: bool = False  # an attempt from the checkpoint failed: the next one starts afresh
    replaces: bool = False  # its record exists and ended non-finite: the run is made again and replaces it

    def as_dict(self, out: str | Path) -> dict[str, Any]:
        r = self.run
        d = {
            "dataset": r.dataset,
            "model": r.model,
            "tag": r.tag,
            "seed": r.seed,
            "status": self.status,
            "attempts": self.attempts,
            "error": self.error,
            "record": str(r.record_path(out)),
        }
        if self.options is not None:  # the label its record has (and a failed run's row in the report)
            d["display_name"] = fingerprint_display_name(self.options.to_dict())
        if self.record is not None:
            d.update({k: getattr(self.record, k) for k in ("best_val_ll", "test_ll", "test_ll_2se", "status")})
            d["record_status"] = d.pop("status")
            d["status"] = self.status
        return d


@dataclass
class SweepReport:
    """The outcome of :func:`run_sweep`."""

    states: list[RunState]
    seconds: float
    interrupted: bool = False
    terminated: bool = False  # the interruption was a SIGTERM (flowbench sweep exits 143, not 130)
    error: str | None = None  # what stopped the sweep, when an error did (the worker pool could not be replaced)

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.states)

    @property
    def failed(self) -> list[RunState]:
        return [s for s in self.states if s.status == "failed"]

    @property
    def nonfinite(self) -> list[RunState]:
        """Runs done whose record ended non-finite (training diverged): recorded, but not a result."""
        return [s for s in self.states if s.status == "done" and s.record is not None and s.record.status != "ok"]

    @property
    def ok(self) -> bool:
        """No run failed or ended non-finite (``flowbench run`` exits non-zero for those too), and not stopped."""
        return not self.failed and not self.nonfinite and not self.interrupted


def plan(runs: Iterable[SweepRun], out: str | Path) -> list[RunState]:
    """One state per run; those whose record already exists are ``skipped`` (the resume rule), except a record
    that ended non-finite (:func:`flowbench.results.replaceable`): that run is made again (``replaces``), as
    ``flowbench run`` would make it again without ``--force``."""
    states = []
    for r in runs:
        path = r.record_path(out)
        replaces = path.is_file() and replaceable(path)
        states.append(RunState(r, "skipped" if path.is_file() and not replaces else "pending", replaces=replaces))
    return states


#: The ``--dry-run`` action of a run that replaces its non-finite record.
RERUN = "rerun (non-finite record)"


def dry_run_text(sweep: Sweep, out: str | Path) -> str:
    """The ``--dry-run`` listing: one line per run with ``run``, ``skip``, ``rerun (non-finite record)``,
    ``resume (after epoch N)`` (``resume (in epoch N, after step S)`` mid-epoch) or ``elsewhere`` (another
    process is training it), then the totals. Checks every run's options (:func:`preflight`); writes nothing."""
    states = plan(sweep.runs, out)
    preflight(states, out)
    actions = [_dry_action(s, out) for s in states]
    rows = [(text, s.run.dataset, s.run.model, s.run.tag, s.run.seed) for (_, text), s in zip(actions, states)]
    n_skip = sum(s.status == "skipped" for s in states)
    kinds = [kind for kind, _ in actions]
    of_which = [
        f"{n} {what}"
        for n, what in (
            (kinds.count("rerun"), RERUN),
            (kinds.count("resume"), "resume from a checkpoint"),
            (kinds.count("elsewhere"), "being trained by another process (elsewhere)"),
        )
        if n
    ]
    lines = [
        f"sweep {sweep.name}: {len(states)} runs ({len(sweep.datasets)} datasets x {len(sweep.models)} models "
        f"x grid); {n_skip} already recorded in {out}/runs (skip), {len(states) - n_skip} to run"
        + (f", of which {', '.join(of_which)}" if of_which else "")
    ]
    if sweep.description:
        lines.append(sweep.description.strip())
    if rows:
        lines.append(tabulate(rows, headers=["action", "dataset", "model", "tag", "seed"], tablefmt="plain"))
    for model, keys in sorted(sweep.ignored.items()):
        lines.append(f"note: {model} does not take {', '.join(keys)}; those grid values are not applied to it")
    return "\n".join(lines)


def _dry_action(state: RunState, out: str | Path) -> tuple[str, str]:
    """What the sweep would do with the run now, as (kind, text): skip, rerun, run, resume from its checkpoint,
    or leave it to the process training it (elsewhere)."""
    if state.status == "skipped":
        return "skip", "skip"
    if state.replaces:
        return "rerun", RERUN
    held = lock_holder(state.run.lock_path(out))
    if held is not None:
        return "elsewhere", f"elsewhere ({held.holder} is training it)"
    ckpt = state.run.checkpoint_path(out)
    if not ckpt.is_file():
        return "run", "run"
    from flowbench.training.trainer import checkpoint_where  # lazy: imports torch (see _Scheduler._key)

    where = checkpoint_where(ckpt)
    return ("resume", f"resume ({where})") if where is not None else ("run", "run (checkpoint unreadable)")


def preflight(states: list[RunState], out: str | Path) -> None:
    """Resolve and check every pending run's options before anything starts.

    A bad value (``activation = "gelu"``) then stops the sweep at once with the run it concerns, instead of
    failing that run (three times) hours into the sweep.
    """
    for state in states:
        if state.status != "pending":
            continue
        try:
            options = state.run.options(out)  # checks every value against the options and the model's spec
        except ConfigError as e:
            raise ConfigError(f"run {state.run.label}: {e}") from e
        state.options = options


class Progress:
    """done / running / failed / left: a live line on a terminal, one line per change otherwise."""

    def __init__(self, total: int, skipped: int, stream: IO[str] | None, live: bool | None = None):
        self.total, self.skipped, self.stream = total, skipped, stream
        self.live = bool(stream is not None and getattr(stream, "isatty", lambda: False)()) if live is None else live
        self.t0 = time.monotonic()
        self._last = ""
        self._shown = False

    def line(self, done: int, running: int, failed: int, left: int) -> str:
        secs = int(time.monotonic() - self.t0)
        return (
            f"sweep: {done} done, {running} running, {failed} failed, {left} left "
            f"(of {self.total}; {self.skipped} already recorded) [{secs // 60}m{secs % 60:02d}s]"
        )

    def update(self, done: int, running: int, failed: int, left: int) -> None:
        if self.stream is None:
            return
        text = self.line(done, running, failed, left)
        if self.live:
            self.stream.write("\r\033[K" + text)
            self._shown = True
        elif text.split(" [")[0] != self._last:  # non-terminals (CI logs) get a line per change only
            self.stream.write(text + "\n")
        self._last = text.split(" [")[0]
        self.stream.flush()

    def event(self, message: str) -> None:
        """A full line (a run finished or failed) above the live line."""
        if self.stream is None:
            return
        if self.live and self._shown:
            self.stream.write("\r\033[K")
            self._shown = False
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.live and self._shown:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------- driver
def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _done_message(state: RunState) -> str:
    rec = state.record
    bits = []
    for key, label in (("best_val_ll", "val LL"), ("test_ll", "test LL")):
        value = getattr(rec, key, None)
        if isinstance(value, (int, float)):
            bits.append(f"{label} {value:.3f}")
    if rec is not None and rec.status != "ok":
        bits.append(f"status {rec.status}")
    if state.replaces:
        bits.append("replaced the non-finite record")
    return f"done   {state.run.label}: {', '.join(bits) or 'recorded'} ({_fmt_time(state.seconds)})"


def _not_newer(path: Path, than: Path) -> bool:
    """Whether file ``path`` exists and was last written no later than ``than`` (False if either is missing)."""
    try:
        return path.stat().st_mtime_ns <= than.stat().st_mtime_ns
    except OSError:
        return False


def check_resources(workers: int, retries: int, cpus_per_run: int, gpus_per_run: float) -> None:
    """The sweep's own flags (``--dry-run`` checks them too, before any run is listed)."""
    if retries < 0:
        raise ConfigError(f"--retries must be >= 0; got {retries}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1; got {workers}")
    if cpus_per_run < 1:  # 0 threads per worker kills every worker with OpenMP errors
        raise ConfigError(f"--cpus-per-run must be a positive integer; got {cpus_per_run}")
    if not 0 <= gpus_per_run < float("inf"):
        raise ConfigError(f"--gpus-per-run must be a number >= 0; got {gpus_per_run}")


def check_out(sweep: Sweep, out: str | Path) -> None:
    """Every run's record and the sweep's report go under ``out``: checked once, before any run starts (else
    every run fails on it, and then the report cannot be written)."""
    hint = "pass --out DIR, a folder you can write to"
    check_writable(Path(out) / "runs", what="the runs' records", hint=hint)
    check_writable(report_path(sweep.name, out).parent, what="the sweep report", hint=hint)


def run_sweep(
    sweep: Sweep,
    out: str | Path = "results",
    *,
    executor: str = "local",
    workers: int = 1,
    retries: int = 2,
    run_fn: str | RunFn = DEFAULT_RUN_FN,
    stream: IO[str] | None = sys.stderr,
    live: bool | None = None,
    address: str | None = None,
    cpus_per_run: int = 1,
    gpus_per_run: float = 0,
    backend: Any = None,
    max_stack: int | None = None,
) -> SweepReport:
    """Run every run of ``sweep`` whose record is missing; returns what happened to each.

    ``run_fn`` trains one run from its options dict and returns the record (default: the trainer's
    ``run_experiment``); tests inject a fake. ``backend`` replaces the executor object (tests).
    ``max_stack``: most runs per stack (1: no stacking; None: from memory). Runs are stacked only with the
    default ``run_fn`` (a custom one trains one run at a time).
    """
    check_resources(workers, retries, cpus_per_run, gpus_per_run)
    if max_stack is not None and max_stack < 1:
        raise ConfigError("--max-stack must be >= 1 (1: no stacking)")
    check_out(sweep, out)
    out = str(out)
    t0 = time.monotonic()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    sched = _plan_scheduler(sweep, out, executor, retries, stream, live)
    sched.max_stack = max_stack

    def start() -> Any:
        made = backend
        if sched.todo and made is None:
            made = make_backend(executor, run_fn, workers, address, cpus_per_run, gpus_per_run, sched.progress.event)
        sched.stacking = run_fn == DEFAULT_RUN_FN and hasattr(made, "submit_stack") and max_stack != 1
        return made

    _drive(sched, sweep, out, executor, started, t0, start)
    return sched.report


def _plan_scheduler(
    sweep: Sweep, out: str, executor: str, retries: int, stream: IO[str] | None, live: bool | None
) -> _Scheduler:
    """Plan the sweep's runs and check them before anything starts; the scheduler (no executor yet) for them."""
    states = plan(sweep.runs, out)
    preflight(states, out)
    skipped = sum(s.status == "skipped" for s in states)
    return _Scheduler(states, out, executor, retries, Progress(len(states), skipped, stream, live))


def _drive(
    sched: _Scheduler, sweep: Sweep, out: str, executor: str, started: str, t0: float, start: Callable[[], Any]
) -> None:
    """Start the executor (``start``), run the scheduler to the end (Ctrl-C: cancel and stop cleanly), shut the
    executor down, write the report: a sweep stopped while its worker pool starts is reported too."""
    try:
        sched.backend = start()
        sched.run()
    except BaseException as e:
        backend = sched.backend
        sched.report.interrupted = True
        sched.report.terminated = isinstance(e, Terminated)
        if not isinstance(e, KeyboardInterrupt):
            sched.report.error = str(e) if isinstance(e, FlowbenchError) else f"{type(e).__name__}: {e}"
        if backend is not None:
            backend.shutdown(cancel=True)
        # Ctrl-C: stop cleanly and report; running runs stay "pending" (their checkpoints let a rerun resume).
        if not isinstance(e, KeyboardInterrupt):
            raise
    else:
        if sched.backend is not None:
            sched.backend.shutdown()
    finally:
        sched.release_all()
        sched.progress.close()
        sched.report.seconds = time.monotonic() - t0
        _write_report(sweep, sched.report, out, executor, started)


class _Scheduler:
    """The sweep loop: keep the executor's slots busy, then record, retry or fail each finished run."""

    def __init__(self, states: list[RunState], out: str, executor: str, retries: int, progress: Progress):
        self.out, self.executor, self.retries, self.progress = out, executor, retries, progress
        self.todo = collections.deque(s for s in states if s.status == "pending")
        self.inflight: dict[Any, RunState] = {}
        self.stacks: dict[Any, list[RunState]] = {}  # token -> the runs of a stack in flight
        self.report = SweepReport(states, 0.0)
        self.backend: Any = None
        self.locks: dict[int, contextlib.ExitStack] = {}  # id(state) -> the run's lock, held by the driver
        self.stacking, self.max_stack = False, None
        self._keys: dict[int, tuple | None] = {}
        self._caps: dict[tuple, int] = {}

    def counts(self) -> tuple[int, int, int, int]:
        running = len(self.inflight) + sum(len(g) for g in self.stacks.values())
        return self.report.count("done"), running, self.report.count("failed"), len(self.todo)

    def run(self) -> None:
        if getattr(self.backend, "announce_start", False):
            self.progress.live = False  # the trainer's own output would overwrite a live line: print lines
        if getattr(self.backend, "trains_here", False):  # the training loop in this process answers a stop
            self._loop(watch=False)
        else:  # a driver of workers elsewhere takes a stop between two ticks, never in a lock or a record's write
            with interrupts.deferred():
                self._loop(watch=True)

    def _loop(self, watch: bool) -> None:
        self.progress.update(*self.counts())
        while self.todo or self.inflight or self.stacks:
            if watch and interrupts.asked():
                interrupts.raise_asked()
            while self.todo and len(self.inflight) + len(self.stacks) < self.backend.capacity:
                group = self.take()
                if len(group) == 1:
                    self.submit(group[0])
                else:
                    self.submit_stack(group)
            for token, outcome in self.backend.wait([*self.inflight, *self.stacks], TICK_S):
                if token in self.stacks:
                    self.finished_stack(self.stacks.pop(token), outcome)
                else:
                    self.finished(self.inflight.pop(token), outcome)
            self.progress.update(*self.counts())

    def _lock(self, state: RunState) -> bool:
        """False, and the run set aside (``elsewhere``), if another process is training it (holds its lock): a
        second sweep over the same runs, or ``flowbench run``; not a failure of the run. Runs whose record the
        driver writes (Ray) train elsewhere, so the driver holds their lock from the first submit to the record;
        local runs take it themselves, in run_experiment, and here it is only tried, so that a stack trains
        without the run another process has (the run's own lock stays the guard against a race)."""
        if id(state) in self.locks:
            return True
        path = state.run.lock_path(self.out)
        held = self._hold(state, path) if hasattr(self.backend, "finish") else lock_holder(path)
        if held is not None:
            state.status = "elsewhere"
            state.error = f"{held.holder} is training this run (lock {path})"
            self.progress.event(f"elsewhere {state.run.label}: {state.error}; its record comes from that process")
            return False
        return True

    def _hold(self, state: RunState, path: Path) -> LockHeld | None:
        """Take the run's lock for the driver, until release(); the LockHeld if another process has it."""
        stack = contextlib.ExitStack()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive_lock(path))
        except LockHeld as e:
            return e
        self.locks[id(state)] = stack
        return None

    def release(self, state: RunState) -> None:
        stack = self.locks.pop(id(state), None)
        if stack is not None:
            stack.close()

    def release_all(self) -> None:
        for stack in self.locks.values():
            stack.close()
        self.locks.clear()

    # -- stacking -----------------------------------------------------------------------------------
    def _key(self, state: RunState) -> tuple | None:
        """The run's stack key, or None when it trains alone."""
        if id(state) not in self._keys:
            # lazy: flowbench.training imports torch, and the sweep driver and its workers stay light
            from flowbench.training.stacked import stack_key, unstackable

            opts = state.options or state.run.options(self.out)
            self._keys[id(state)] = None if unstackable(opts) else stack_key(opts)
        return self._keys[id(state)]

    def _cap(self, state: RunState, key: tuple) -> int:
        if self.max_stack is not None:
            return self.max_stack
        if key not in self._caps:
            from flowbench.training.stacked import MEMORY_SHARE, stack_cap  # lazy: imports torch (see _key)

            opts = state.options or state.run.options(self.out)
            device = opts.device if opts.device != "auto" else "cuda"
            budget = int(MEMORY_SHARE * utils.available_memory(device) / max(1, self.backend.capacity))
            try:
                self._caps[key] = stack_cap(opts, budget)
            except Exception:  # noqa: BLE001 - a model that cannot be built fails as its own run, alone
                self._caps[key] = 1
        return self._caps[key]

    def take(self) -> list[RunState]:
        """The next unit to submit: the first pending run, with the pending runs that share its stack key
        (up to the cap; fewer when that leaves free slots that the other pending groups cannot fill)."""
        first = self.todo.popleft()
        key = self._key(first) if self.stacking else None
        if key is None:
            return [first]
        same = [s for s in self.todo if self._key(s) == key]
        cap = self._cap(first, key)
        if not same or cap <= 1:
            return [first]
        free = self.backend.capacity - len(self.inflight) - len(self.stacks)
        others = len({self._key(s) if self._key(s) is not None else id(s) for s in self.todo} - {key})
        spare, n = free - others, 1 + len(same)
        size = min(cap, n if spare <= 1 else math.ceil(n / spare))
        group = [first, *same[: size - 1]]
        for s in group[1:]:
            self.todo.remove(s)
        return group

    def submit_stack(self, group: list[RunState]) -> None:
        group = [s for s in group if self._lock(s)]
        if not group:
            return
        if len(group) == 1:  # the others are set aside: it trains as a single run does
            self._start(group[0])
            return
        options = [self._attempt(s) for s in group]
        done, running, failed, left = self.counts()
        self.progress.update(done, running + len(group), failed, left)
        if getattr(self.backend, "announce_start", False):
            self.progress.event(
                f"start  a stack of {len(group)}: "
                + ", ".join(s.run.label + (" (resuming)" if s.resumed else "") for s in group)
            )
        self.stacks[self.backend.submit_stack([s.run for s in group], options, self.out)] = group

    def finished_stack(self, group: list[RunState], outcome: dict[str, Any]) -> None:
        """Each run of the stack as if it had finished alone (a stack's failure is each run's failure)."""
        records = outcome.get("records") if outcome["ok"] else None
        packed = outcome.get(ARTIFACTS)  # Ray: each run's files, to be written by the driver
        common = {k: v for k, v in outcome.items() if k not in ("records", ARTIFACTS)}
        for i, state in enumerate(group):
            one = dict(common)
            if records is not None:
                one["record"] = records[i]
            if packed is not None:
                one[ARTIFACTS] = packed[i]
            self.finished(state, one)

    # -- single runs --------------------------------------------------------------------------------
    def _attempt(self, state: RunState) -> RunOptions:
        """Count an attempt and return the options it runs with."""
        state.attempts += 1
        options = state.options or state.run.options(self.out)
        # An earlier attempt or sweep was cut short and left a checkpoint: continue it (local only; Ray runs
        # keep no checkpoints). If that fails, the retry starts from scratch.
        ckpt = state.run.checkpoint_path(self.out)
        local = self.executor == "local"
        # A run that replaces its non-finite record continues a checkpoint written after that record (an
        # interrupted rerun), not the one its run kept (--keep-checkpoint): that run is what is being replaced.
        stale = local and state.replaces and _not_newer(ckpt, state.run.record_path(self.out))
        state.resumed = local and not state.resume_failed and not stale and ckpt.is_file()
        if local and (state.resume_failed or stale):
            # Continuing from it failed (or would continue the replaced run): this attempt starts afresh, which
            # `run` refuses over a checkpoint.
            _discard_checkpoint(ckpt, state.run.lock_path(self.out))
        options = options.replace(resume=state.resumed)
        return options

    def submit(self, state: RunState) -> None:
        if self._lock(state):
            self._start(state)

    def _start(self, state: RunState) -> None:
        """Submit a run whose lock _lock has seen free (or holds, for Ray)."""
        options = self._attempt(state)
        done, running, failed, left = self.counts()
        self.progress.update(done, running + 1, failed, left)  # before submit: sequential runs inside it
        if getattr(self.backend, "announce_start", False):
            self.progress.event(f"start  {state.run.label}" + (" (resuming)" if state.resumed else ""))
        self.inflight[self.backend.submit(state.run, options, self.out)] = state

    def finished(self, state: RunState, outcome: dict[str, Any]) -> None:
        state.seconds += float(outcome.get("seconds", 0.0))
        if outcome["ok"] and hasattr(self.backend, "finish"):
            try:
                self.backend.finish(state, outcome, self.out)  # Ray: the driver writes the record
            except Exception as e:  # noqa: BLE001 - e.g. a record written meanwhile by another sweep
                outcome = {"ok": False, "error": f"could not write the record: {type(e).__name__}: {e}"}
        if outcome["ok"]:
            state.record = outcome["record"]
            state.status, state.error = "done", None
            self.release(state)
            self.progress.event(_done_message(state))
        elif outcome.get("locked"):
            # A lock taken by another process after our look at it (a race). Held on this run: set aside (by
            # _lock). Free: a stack mate's lock stopped the stack, which says nothing about this run, so it goes
            # again as it was (from its checkpoint, if any), the attempt not counted.
            if self._lock(state):
                state.attempts -= 1
                self.todo.append(state)
                self.progress.event(f"again  {state.run.label}: its stack stopped at another run's lock")
        elif state.attempts <= self.retries and (outcome.get("retry", True) or state.resumed):
            # A flowbench error (a record in the way, a bad option) is deterministic: retrying cannot help,
            # except from scratch when continuing a checkpoint was what failed.
            state.error = outcome["error"]
            state.resume_failed = state.resume_failed or state.resumed
            self.todo.append(state)  # to the back: other runs go first, a transient cause may pass
            self.progress.event(
                f"retry  {state.run.label}: attempt {state.attempts}/{self.retries + 1} failed: {outcome['error']}"
            )
        else:
            state.status, state.error = "failed", outcome["error"]
            self.release(state)
            if hasattr(self.backend, "save_log"):
                self.backend.save_log(state, outcome, self.out)
            self.progress.event(f"FAILED {state.run.label} after {state.attempts} attempt(s): {outcome['error']}")


def _discard_checkpoint(ckpt: Path, lock: Path) -> None:
    """Remove a run's checkpoint, only under the run's lock: a checkpoint another process is training from is
    that process's (the attempt then stops at the lock, and the run is set aside)."""
    if not ckpt.is_file():
        return
    with contextlib.suppress(LockHeld), exclusive_lock(lock):
        ckpt.unlink(missing_ok=True)


def _write_report(sweep: Sweep, report: SweepReport, out: str, executor: str, started: str) -> None:
    """``<out>/sweeps/<name>.json``: every run's status, attempts and last error (a record of the sweep)."""
    counts = {k: report.count(k) for k in ("done", "skipped", "failed", "elsewhere", "pending")}
    counts["nonfinite"] = len(report.nonfinite)  # of the done: recorded with status nonfinite
    atomic_write_json(
        report_path(sweep.name, out),
        json_safe(
            {
                "sweep": str(sweep.path) if sweep.path else sweep.name,
                "executor": executor,
                "started": started,
                "seconds": round(report.seconds, 3),
                "interrupted": report.interrupted,
                **({"error": report.error} if report.error is not None else {}),
                "counts": counts,
                "runs": [s.as_dict(out) for s in report.states],
            }
        ),
    )


def summary(report: SweepReport, sweep: Sweep, out: str | Path) -> str:
    """The end-of-sweep text: counts, every failure with its error, and where to look next."""
    lines = [
        f"sweep {sweep.name} {'interrupted' if report.interrupted else 'finished'} in {_fmt_time(report.seconds)}: "
        f"{report.count('done')} done"
        + (f" ({n} of them non-finite)" if (n := len(report.nonfinite)) else "")
        + f", {report.count('skipped')} skipped (already recorded), "
        f"{report.count('failed')} failed, {report.count('pending')} left"
        + (f", {n} trained elsewhere" if (n := report.count("elsewhere")) else "")
    ]
    for s in report.failed:
        lines.append(f"  FAILED {s.run.label} after {s.attempts} attempt(s): {s.error}")
    if report.failed:
        lines.append("  (logs of parallel and Ray runs: <out>/sweeps/logs/; run the sweep again to retry the failures)")
    for s in report.nonfinite:
        lines.append(f"  NONFINITE {s.run.label}: {s.record.failure}")
    if report.nonfinite:
        lines.append(
            "  (their records say status nonfinite; change what the message says, e.g. a lower lr in the sweep "
            "file, and run the sweep again: it reruns them and replaces those records)"
        )
    elsewhere = [s for s in report.states if s.status == "elsewhere"]
    for s in elsewhere:
        lines.append(f"  elsewhere {s.run.label}: {s.error}")
    if elsewhere:
        lines.append(
            "  (their records come from the processes training them; if one stops first, run the sweep again: "
            "it resumes that run from its checkpoint)"
        )
    if report.interrupted or report.count("pending"):
        lines.append("  run the same command again to continue: recorded runs are skipped")
    lines.append(f"report: {report_path(sweep.name, out)}")
    lines.append(f"table:  flowbench table --results {out} --select best-val")
    return "\n".join(lines)
