"""User-facing errors.

Everything a user can cause (bad input, missing data, corrupt archive) raises a subclass of
:class:`FlowbenchError` whose message says what is wrong and what to do. The CLI prints the message
without a traceback and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent  # a warning raised in here is flowbench's own (advice_format)


def advice_format(command: str, shown: Callable[..., str]) -> Callable[..., str]:
    """A ``warnings.formatwarning`` for a command: flowbench's own warnings are advice to the user, not about a
    source line, so they are said as its errors are; any other warning as ``shown`` says it."""

    def fmt(message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None):
        if Path(filename).resolve().is_relative_to(_PACKAGE):
            return f"flowbench {command}: warning: {message}\n"
        return shown(message, category, filename, lineno, line)

    return fmt


class FlowbenchError(Exception):
    """Base class for errors whose message is meant for the user."""


class ConfigError(FlowbenchError, ValueError):
    """An unknown or invalid option, hyperparameter or config key."""


class InputError(FlowbenchError, ValueError):
    """Data handed to a model or tool is unusable: wrong shape, NaN/inf values."""


class UsageError(FlowbenchError):
    """The request conflicts with what is on disk or running: a record exists, a checkpoint would be lost,
    another process holds the run's lock."""


class RunLocked(UsageError):
    """Another live process holds the run's lock: it is training this run now. Not the run's own failure, so a
    sweep neither retries it nor touches the run's files (its checkpoint is that process's)."""


class DiskFullError(UsageError, OSError):
    """A write ran out of disk space (ENOSPC, EDQUOT); the file it would have replaced is intact.

    Also an OSError, so code that tolerates an unwritable cache (``except OSError``) keeps doing so."""

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno 28] ...: filename"
        return str(self.args[0]) if self.args else ""


class DatasetNotFoundError(FlowbenchError, FileNotFoundError):
    """Raw or prepared data is missing; the message carries the `flowbench download` command."""


class DataIntegrityError(FlowbenchError):
    """Data is corrupt: checksum mismatch, NaN/inf, zero-variance column, unexpected archive member."""


class DownloadError(FlowbenchError):
    """The archive could not be fetched (network, HTTP status, disk)."""


class UnsafePickleError(DataIntegrityError):
    """A pickle referenced a global that the restricted unpickler does not allow."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's time limit, ``kill``), taken on the interrupt's path: a run says how to resume, a
    sweep writes its report and stops its workers, as on Ctrl-C; ``flowbench`` then exits with status 143."""


class InverseNotAvailable(FlowbenchError, NotImplementedError):
    """The transform has no (cheap or closed-form) inverse."""
