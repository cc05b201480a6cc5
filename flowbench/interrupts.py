"""Stopping between two optimiser steps: a signal asks, the training loop answers.

A cluster's time limit sends SIGTERM (and SIGKILL a grace period later); a user presses Ctrl-C. Raised at once,
wherever the signal lands, the interrupt lost every step since the run's last checkpoint (up to an epoch: 16,600
steps on POWER) and could land inside an optimiser step. While a training loop listens (:func:`listening`), the
first signal is only noted; the loop ends the step in progress, writes each run's checkpoint at that position
(mid-epoch, with its running loss) and raises the signal's exception, so that a resumed run takes exactly the
steps an uninterrupted one would. A second Ctrl-C stops at once (the last checkpoint stays); a repeated SIGTERM
changes nothing. Outside a training loop a signal raises at once, as Python's own handler does, except where
raising could break the process: inside an import (a module left half initialised) and inside
:func:`deferred` (a sweep's driver of workers elsewhere, whose waits hold locks); there it is noted too, and the
next loop, the driver's next tick or the block's end raises it; a stop noted in an import with none of these
to take it is raised as soon as the import is over.

``flowbench``'s commands install the handlers (:func:`handling_signals`); code that trains through the API may do
the same::

    with flowbench.interrupts.handling_signals():
        trainer.fit()
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType
from typing import Iterator

from flowbench.errors import Terminated

__all__ = [
    "ask",
    "asked",
    "deferred",
    "handling_signals",
    "listening",
    "raise_asked",
    "stop_workers_on_sigterm",
    "worker_task",
]

_listeners = 0
_asked: type[KeyboardInterrupt] | None = None
_in_worker = False  # a sweep's worker process (stop_workers_on_sigterm)
_in_task = False  # ... running a task (worker_task)
_deferring = 0  # blocks of deferred() entered


def ask(exc_type: type[KeyboardInterrupt], frame: FrameType | None = None) -> None:
    """A signal handler's part: note the stop while a loop listens, else raise ``exc_type`` at once. ``frame``:
    where the signal landed; inside an import the stop is only noted, and raised as soon as the import is over
    unless a loop or a deferred block takes it first."""
    if _deferring or _importing(frame):  # raised here, it could break a lock or a half-imported module
        _note(exc_type)
        if not _deferring and _listeners == 0:
            _raise_after_import()
    elif _listeners == 0 or (_asked is not None and exc_type is KeyboardInterrupt):  # nobody listens; a 2nd Ctrl-C
        raise exc_type()
    else:
        _note(exc_type)


def _note(exc_type: type[KeyboardInterrupt]) -> None:
    """The stop asked for: the first signal's."""
    global _asked
    _asked = _asked or exc_type


def _importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside an import. An exception raised there can leave a module half initialised
    for good: a SIGTERM in a sweep's first second once left numpy so, the stop was lost and the sweep later died
    of a RecursionError in numpy's __getattr__ (2 of 16 tries at 0.4-1.4 s)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


#: Seconds between two looks, by a timer (SIGALRM), whether the import a stop was noted in is over.
RETRY_S = 0.05
_NOT_ARMED = object()
_alarm_before: object = _NOT_ARMED  # SIGALRM's handler before the timer was armed


def _raise_after_import() -> None:
    """Arm the timer that raises a stop noted inside an import once the import is over. Nothing else would raise
    it in a command that runs no training loop: Ctrl-C in the second or two a command spends importing torch
    was dropped, and ``flowbench bench`` ran on for minutes. Where there is no such timer (Windows), the stop
    waits for the next loop, or goes with the command."""
    global _alarm_before
    if not hasattr(signal, "setitimer"):
        return
    try:
        before = signal.signal(signal.SIGALRM, _on_alarm)
    except ValueError:  # not the main thread
        return
    if _alarm_before is _NOT_ARMED:
        _alarm_before = before
    signal.setitimer(signal.ITIMER_REAL, RETRY_S)


def _disarm() -> None:
    global _alarm_before
    if _alarm_before is not _NOT_ARMED:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, _alarm_before)  # type: ignore[arg-type]
        _alarm_before = _NOT_ARMED


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    mine = _asked is not None and _listeners == 0 and not _deferring  # else taken, or a loop or block takes it
    if mine and _importing(frame):
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    _disarm()
    if mine:
        raise_asked()


def asked() -> bool:
    """Whether a stop was asked for (the loop checks before each optimiser step)."""
    return _asked is not None


def raise_asked(saved: str | None = None) -> None:
    """Raise the exception of the stop asked for (``saved``: where a training loop wrote the checkpoints, for the
    hint; None: no loop wrote any)."""
    global _asked
    exc_type, _asked = _asked, None
    if exc_type is not None:
        e = exc_type()
        if saved is not None:
            e.saved = saved  # type: ignore[attr-defined]
        raise e


@contextlib.contextmanager
def listening() -> Iterator[None]:
    """A training loop runs: signals are noted, not raised. A stop asked for after the loop's last step (while it
    restores the best state) is raised when the loop ends."""
    global _listeners, _asked
    _listeners += 1
    try:
        yield
    except BaseException:
        if _listeners == 1:  # left by an exception (the stop itself, or another): the next loop starts clean
            _asked = None
        raise
    finally:
        _listeners -= 1
    if _listeners == 0:
        raise_asked("after its last step")


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block every signal is only noted; the first one's exception is raised when the block ends, or
    where the code checks (:func:`asked`, :func:`raise_asked`). A sweep's driver of workers elsewhere runs its
    loop in it and checks once a tick, and starts its worker pool in it: raised inside a wait, the interrupt
    could land between the release and the re-acquiring of a ``threading.Condition``'s lock, whose ``with`` then
    released the lock a second time: "RuntimeError: release unlocked lock" replaced the interrupt, and the sweep
    died without stopping its workers (seen once in CI). A run's end writes its record and removes its
    checkpoint in one, so that a stop cannot leave a finished run's checkpoint beside its record."""
    global _deferring, _asked
    _deferring += 1
    try:
        yield
    except BaseException:
        if _deferring == 1 and _listeners == 0:  # left by an exception: the stop goes with it
            _asked = None
        raise
    finally:
        _deferring -= 1
    if _deferring == 0 and _listeners == 0:
        raise_asked()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    ask(Terminated if signum == signal.SIGTERM else KeyboardInterrupt, frame)


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM go through :func:`ask` within the block (the main thread only; elsewhere a no-op). A
    signal the process was started ignoring stays ignored (a shell's background job ignores Ctrl-C)."""
    global _asked
    previous = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is not signal.SIG_IGN:
                previous[s] = signal.signal(s, _on_signal)
    except ValueError:  # not the main thread: signals cannot be set
        pass
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _disarm()
        if _listeners == 0:  # a stop noted (in an import) that no loop took: the work it asked to stop is done
            _asked = None


def _worker_sigterm(signum: int, frame: FrameType | None) -> None:
    if _listeners or _deferring or (_in_task and _importing(frame)):  # for its loop, block or the task's end
        _note(Terminated)
    elif _in_task:  # loading data, writing a record: unwind (temporary files removed), then worker_task exits
        raise Terminated()
    else:  # idle: die as by default
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def stop_workers_on_sigterm() -> None:
    """A sweep's worker process: Ctrl-C is the driver's (it stops the workers with SIGTERM, and a second signal
    would stop a run before its checkpoint); SIGTERM ends the step in progress and writes the checkpoints there."""
    global _in_worker
    _in_worker = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


@contextlib.contextmanager
def worker_task() -> Iterator[None]:
    """A task of a sweep's worker process: stopped by SIGTERM, the process exits (status 143) once the task has
    unwound, instead of going back to the pool. Its pool mates, killed while they waited for a task, may have
    died holding the pool's queue lock, which would block a worker that went back for ever (and the sweep with
    it); a worker stopped alone is a dead worker to the sweep, which retries its run from the checkpoint. Outside
    a worker process: nothing."""
    global _in_task
    if not _in_worker:
        yield
        return
    _in_task = True
    try:
        yield
        if _asked is not None:  # noted in an import, and no loop took it: stop here as a stopped task does
            raise _asked()
    except KeyboardInterrupt:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(143)
    finally:
        _in_task = False
