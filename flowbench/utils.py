"""Small shared helpers: atomic file writes, a per-run lock file and device selection.

Every file flowbench writes goes through :func:`atomic_write`: a temporary file in the same directory,
flushed and fsynced, then renamed over the target, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # for annotations only: the functions below import numpy and torch lazily
    import numpy as np
    import torch


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(path: Path, needed: int | None, written: int | None, error: OSError):
    """The DiskFullError for a write of ``path`` that ran out of space (the temporary file is already gone)."""
    from flowbench.errors import DiskFullError

    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes are free"
    except OSError:
        free = "free space unknown"
    if needed is not None:
        size = f"it needs {needed:,} bytes"
    elif written:
        size = f"it needs more than the {written:,} bytes written before the disk filled"
    else:
        size = "its size is unknown"
    state = "the previous version is intact" if path.exists() else "nothing was written"
    err = DiskFullError(
        f"no space left on the device to write {path} ({size}; {free}); {state} (writes go to "
        "a temporary file that is renamed at the end); free some space and run again"
    )
    err.errno, err.filename = error.errno, str(path)
    return err


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, size_hint: int | None = None) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was. Running out of disk space
    raises :class:`flowbench.errors.DiskFullError` naming the file and the bytes needed (``size_hint`` when the
    caller knows the size, else what had been written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written: int | None = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would have, so records in a
        # shared results folder stay readable by the rest of the group.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                if e.errno in _NO_SPACE:
                    with contextlib.suppress(OSError, ValueError):
                        written = os.fstat(f.fileno()).st_size
                raise
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        from flowbench.errors import DiskFullError

        if isinstance(e, OSError) and e.errno in _NO_SPACE and not isinstance(e, DiskFullError):
            raise _disk_full(path, size_hint, written, e) from e
        raise


def _write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically: serialised first, so a full disk can say how much space the file needs."""
    with atomic_write(path, "wb", size_hint=len(data)) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (deterministic output), atomically."""
    _write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``numpy.save`` to ``path`` atomically."""
    import numpy as np

    with atomic_write(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically (checkpoints)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_bytes(path, buffer.getvalue())


class LockHeld(Exception):
    """Raised by :func:`exclusive_lock` when another live process holds the lock; ``pid`` is its process id."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is held by process {pid}")
        self.path, self.pid = path, pid

    @property
    def holder(self) -> str:
        """``process N``, or ``another process`` when its pid could not be read."""
        return f"process {self.pid}" if self.pid is not None else "another process"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``path`` (created, holding our pid) for the ``with`` block; removed after.

    The kernel drops a flock when its process dies, so a lock file left by a killed process does not block
    anyone: the next process simply takes it. Raises :class:`LockHeld` (with the holder's pid when it could be
    read) if a live process holds it. Without ``fcntl`` (Windows) there is no locking.
    """
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield path
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno in _NO_SPACE:  # no room even for the directory entry
                raise _lock_disk_full(path, e) from e
            raise
        if not _flock_exclusive(fcntl, fd):
            held = _held(fd, path)
            os.close(fd)
            raise held
        # The holder before us may have unlinked the file after we opened it; then our lock is on a file
        # nobody else can see, and a third process could lock a new one. Retry on the path's current file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            if e.errno in _NO_SPACE:  # a disk full to the last byte: say so here, not after the run's compute
                raise _lock_disk_full(path, e) from e
            raise
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked: nobody can take a file we are about to remove
        os.close(fd)


# A look (lock_holder) holds a shared lock for microseconds; a holder that trains holds it for hours. Trying
# again for a few milliseconds tells the two apart, so a look never turns a run away.
_LOOK_RETRIES = (0.001, 0.005, 0.02)


def _flock_exclusive(fcntl: Any, fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting on a holder; False if another process holds it."""
    pauses = iter(_LOOK_RETRIES)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pause = next(pauses, None)
            if pause is None:
                return False
            time.sleep(pause)


def _held(fd: int, path: Path) -> LockHeld:
    """The LockHeld for a lock file open on ``fd`` that another process holds, with the pid it wrote there."""
    pid = None
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
    return LockHeld(path, pid)


def lock_holder(path: str | os.PathLike) -> LockHeld | None:
    """What :func:`exclusive_lock` would raise on ``path`` now (another live process holds it), or None; a look
    that creates, writes and removes nothing (a dry run may call it). Its shared lock lasts microseconds, and
    :func:`exclusive_lock` tries again for a few milliseconds before it gives up, so a look never turns a run
    away."""
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: nobody holds it (an unreadable one: the run's own lock will say why)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _held(fd, path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock_disk_full(path: Path, error: OSError):
    """The DiskFullError for a lock file that could not be created or given its few bytes."""
    from flowbench.errors import DiskFullError

    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes are free"
    except OSError:
        free = "free space unknown"
    err = DiskFullError(
        f"no space left on the device to write the lock file {path} ({free}); nothing was "
        "trained or written: free some space (a run also needs room for its checkpoint and "
        "record) and run again"
    )
    err.errno, err.filename = error.errno, str(path)
    return err


def set_threads(threads: int) -> None:
    """``torch.set_num_threads`` with a clear error for a non-positive count (``--threads``)."""
    import torch

    from flowbench.errors import ConfigError

    if threads < 1:
        raise ConfigError(f"--threads must be a positive integer; got {threads}")
    torch.set_num_threads(threads)


#: glibc ``mallopt`` parameters (malloc.h) and the values :func:`keep_freed_memory` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit
_TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: in effect, never trim
_kept_freed_memory: bool | None = None


def keep_freed_memory() -> bool:
    """Let this process reuse the memory torch frees on the CPU instead of handing it back to the OS.

    A training step frees and re-allocates the same activation- and gradient-sized blocks every step. With
    glibc's defaults, blocks over its (adaptive) mmap threshold are returned on free, and the heap top is
    trimmed, so each step page-faults its tensors in again: measured on one CPU thread, 200–560 page faults
    per step for 16 stacked MAF(5) runs (19–20 → 22–23 ms per step) and a stacked relgrad MNIST-shape step
    1.5× slower (its 9.8 MB gradients were faulted in at every step). Fixing glibc's mmap threshold at its
    maximum (32 MiB: larger blocks, such as datasets, are still mapped and returned) and never trimming keeps
    the blocks for reuse: 0 faults per step; the resident memory stays at its peak. Idempotent; does
    nothing but return False where the C library is not glibc. Called by the trainers on the CPU.
    """
    global _kept_freed_memory
    if _kept_freed_memory is None:
        import ctypes
        import platform

        _kept_freed_memory = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(None)
                _kept_freed_memory = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
                )
            except (OSError, AttributeError):
                _kept_freed_memory = False
    return _kept_freed_memory


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators: before a model is built, so that its initial weights
    depend on the seed only."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:N`` as given (checked)."""
    import torch

    from flowbench.errors import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device auto or cpu")
    return dev


def output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the output folder ``path`` (and its parents) before any work, or say why it cannot be.

    A path that is a file, a parent that is a file, or a folder without write permission is a
    :class:`~flowbench.errors.ConfigError` naming ``flag``, instead of a traceback after the compute.
    """
    from flowbench.errors import ConfigError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder; pass a folder path (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{flag} {path}: cannot create the folder ({e.strerror or e}); pass a folder you can write to"
        ) from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the folder is not writable; pass a folder you can write to")
    return path


def check_writable(folder: str | os.PathLike, *, what: str, hint: str) -> Path:
    """Check, before any work, that ``what`` can be written into ``folder``: it is a writable folder, or can
    be created in one (nothing is created here). Otherwise a :class:`~flowbench.errors.ConfigError`
    ``cannot write <what> to <folder>: <why>; <hint>``, instead of a traceback after the work."""
    from flowbench.errors import ConfigError

    folder = Path(folder)
    # The nearest folder that exists decides: the rest of the path is created in it when the file is written.
    existing = next((p for p in (folder.absolute(), *folder.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"cannot write {what} to {folder}: {existing} is a file, not a folder; {hint}")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {what} to {folder}: the folder {existing} is not writable; {hint}")
    return folder


def output_file(
    path: str | os.PathLike, *, what: str = "the output", flag: str = "--out", suffixes: tuple[str, ...] = ()
) -> Path:
    """:func:`check_writable` for the file ``path`` (named by option ``flag``), which must not be a folder and,
    when ``suffixes`` are given, must end in one of them (a PNG is not written under a ``.txt`` name)."""
    from flowbench.errors import ConfigError

    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        kinds = " or ".join(suffixes)
        got = path.suffix or "a name without a suffix"
        raise ConfigError(f"{flag} {path}: {what} is written as {kinds}, not {got}; give a file name ending in {kinds}")
    hint = f"pass {flag} FILE in a folder you can write to"
    if path.is_dir():
        raise ConfigError(f"cannot write {what} to {path}: it is a folder; {hint}")
    check_writable(path.parent, what=f"{what} {path.name}", hint=hint)
    return path


def check_number(
    flag: str, value: float | None, *, minimum: float = 0.0, strict: bool = True, allow_inf: bool = False
) -> None:
    """Refuse a numeric option that is NaN, infinite (unless ``allow_inf``) or below ``minimum``
    (``strict``: at or below) with a :class:`~flowbench.errors.ConfigError` naming ``flag``; None passes."""
    import math

    from flowbench.errors import ConfigError

    if value is None:
        return
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    if math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0)):
        kind = "a number" if allow_inf else "a finite number"
        raise ConfigError(f"{flag} must be {kind} {bound}; got {value}")
    if value < minimum or (strict and value == minimum):
        raise ConfigError(f"{flag} must be {bound}; got {value}")


def available_memory(device: str = "cpu") -> int:
    """Bytes free now on ``device``: CUDA's ``mem_get_info``, else ``MemAvailable`` of /proc/meminfo, else
    physical memory (sysconf), else 8 GiB."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30
