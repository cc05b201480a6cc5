"""Run records: one JSON file per run, written atomically, never silently overwritten.

Path scheme: ``<out>/runs/<dataset>/<model>/seed<k>.json``, or ``<out>/runs/<dataset>/<model>/<tag>/seed<k>.json``
when the run has a tag (sweeps tag each configuration so they don't collide). The checkpoint lives beside the
record as ``seed<k>.ckpt``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

from flowbench.errors import ConfigError
from flowbench.utils import atomic_write_json

__all__ = [
    "REQUIRED_KEYS",
    "run_dir",
    "record_path",
    "checkpoint_path",
    "check_overwrite",
    "write_record",
    "read_record",
    "iter_records",
    "system_info",
    "json_safe",
]

#: Keys every record has (validated on read, so the table never meets a half-formed record).
REQUIRED_KEYS = (
    "dataset",
    "model",
    "display_name",
    "tag",
    "seed",
    "config",
    "params",
    "match_target",
    "epochs",
    "best_epoch",
    "best_val_ll",
    "test_ll",
    "test_ll_se2",
    "n_test",
    "wall_time_s",
    "device",
    "torch",
    "python",
    "git_commit",
    "timestamp",
    "status",
    "failure",
    "jacobian_spectral_norm",
)

_SAFE = re.compile(r"^[A-Za-z0-9._=,+-]+$")


def _component(value: str, what: str) -> str:
    """A path component from user input: no separators, no '..', so a tag cannot escape ``<out>``."""
    if not value or not _SAFE.match(value) or value in (".", ".."):
        raise ConfigError(
            f"{what} {value!r} cannot be used in a file name; use letters, digits and . _ = , + - only"
        )
    return value


def run_dir(out: str | Path, dataset: str, model: str, tag: str | None = None) -> Path:
    d = Path(out) / "runs" / _component(dataset, "dataset") / _component(model, "model")
    return d / _component(tag, "tag") if tag else d


def record_path(out: str | Path, dataset: str, model: str, seed: int, tag: str | None = None) -> Path:
    return run_dir(out, dataset, model, tag) / f"seed{int(seed)}.json"


def checkpoint_path(out: str | Path, dataset: str, model: str, seed: int, tag: str | None = None) -> Path:
    return run_dir(out, dataset, model, tag) / f"seed{int(seed)}.ckpt"


def json_safe(obj: Any) -> Any:
    """Replace NaN/inf by None (JSON has neither) and numpy scalars by Python numbers, recursively."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def check_overwrite(path: str | Path, force: bool) -> None:
    """Refuse to replace an existing record unless ``force`` (callers check before spending compute too)."""
    if Path(path).exists() and not force:
        raise ConfigError(f"a record already exists at {path}; pass --force to overwrite it or choose another --seed/--tag")


def write_record(path: str | Path, record: dict[str, Any], force: bool = False) -> Path:
    """Write ``record`` as JSON atomically; refuse to replace an existing record unless ``force``."""
    path = Path(path)
    check_overwrite(path, force)
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"record is missing keys {missing}")
    atomic_write_json(path, json_safe(record))
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    """Load one record, checking it has every required key."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not a valid run record (bad JSON: {e}); delete or re-run it") from e
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ConfigError(f"{path} is not a valid run record (missing {', '.join(missing)}); delete or re-run it")
    record["_path"] = str(path)
    return record


def iter_records(results: str | Path) -> Iterator[dict[str, Any]]:
    """Every record under ``<results>/runs`` in sorted path order (deterministic)."""
    root = Path(results) / "runs"
    if not root.is_dir():
        raise ConfigError(f"no run records under {root}; train something first with `flowbench run`")
    for path in sorted(root.rglob("seed*.json")):
        yield read_record(path)


def _git_commit() -> str | None:
    """The checkout's commit (read-only ``git rev-parse``), or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def system_info() -> dict[str, Any]:
    """Versions, commit and a UTC timestamp for the record."""
    import torch

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
