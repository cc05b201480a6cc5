"""Small shared helpers: atomic file writes and device selection.

Every file flowbench writes goes through :func:`atomic_write`: a temporary file in the same directory,
flushed and fsynced, then renamed over the target, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would have, so records in a
        # shared results folder stay readable by the rest of the group.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (deterministic output), atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    """``numpy.save`` to ``path`` atomically."""
    import numpy as np

    with atomic_write(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically (checkpoints)."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def set_threads(threads: int) -> None:
    """``torch.set_num_threads`` with a clear error for a non-positive count (``--threads``)."""
    import torch

    from flowbench.errors import ConfigError

    if threads < 1:
        raise ConfigError(f"--threads must be a positive integer; got {threads}")
    torch.set_num_threads(threads)


def resolve_device(device: str = "auto"):
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
        raise ConfigError(f"{flag} {path}: cannot create the folder ({e.strerror or e}); "
                          "pass a folder you can write to") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the folder is not writable; pass a folder you can write to")
    return path


def check_number(flag: str, value: float | None, *, minimum: float = 0.0, strict: bool = True,
                 allow_inf: bool = False) -> None:
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
