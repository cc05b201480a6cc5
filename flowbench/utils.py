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
