"""A Ray run's files on their way from the node that trained it to the driver that keeps them.

A Ray task trains into a node-local scratch folder (:func:`flowbench.sweep.worker.ray_execute`), where
:func:`flowbench.training.lifecycle.finish_run` writes what a local run writes into the results folder: the model
state ``seed<k>.model.pt``, the per-point test LLs ``seed<k>.testll.npy`` and the record, which names both. On
the node :func:`pack_run` takes a finished run's record and the bytes of its two files into the task's outcome;
on the driver :func:`land_run` writes them under the driver's results folder in finish_run's order (the state,
the per-point file, then the record), each atomically.

A sweep reruns a run whose record ended non-finite (:func:`flowbench.results.replaceable`). Such a record goes to
the node too (:func:`replaced_record`, :func:`plant_record`), so that the run finds it where a local run would
and notes in its record that it replaced it, as a local run does.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from flowbench.results import (
    check_overwrite,
    model_state_path,
    per_point_path,
    record_path,
    replaceable,
    write_record,
)
from flowbench.utils import atomic_write

if TYPE_CHECKING:  # Ray workers import this module before torch: keep it light
    from flowbench.config import RunOptions
    from flowbench.results import RunRecord
    from flowbench.sweep.spec import SweepRun

__all__ = ["ARTIFACTS", "pack_run", "land_run", "replaced_record", "plant_record"]

#: The outcome's key for :func:`pack_run`'s dict (a list of them, one per run, for a stack).
ARTIFACTS = "artifacts"


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    with contextlib.suppress(OSError):
        return path.read_bytes()
    return None


def pack_run(record: RunRecord, scratch: str, out: str) -> dict[str, bytes | None]:
    """On the node, a run finished in ``scratch``: the bytes of the files its record names (``model_state``,
    ``test_points``; None for one it does not name or that cannot be read), and the record changed to describe
    the driver's results folder ``out``, as if the run had been made there."""
    key = (record.dataset, record.model, record.seed, record.tag)
    record.config["out"] = out
    return {
        "model_state": _read(model_state_path(scratch, *key) if record.model_state else None),
        "test_points": _read(per_point_path(scratch, *key) if record.test_points else None),
    }


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path, "wb", size_hint=len(data)) as f:
        f.write(data)


def land_run(run: SweepRun, record: RunRecord, artifacts: Mapping[str, bytes | None] | None, out: str) -> Path:
    """On the driver: write a run packed by :func:`pack_run` under ``out`` as finish_run writes a local run (the
    model state, the per-point test LLs, then the record, which names them), each atomically; returns the
    record's path. The record gets the user's command, as local records do (not the Ray worker's). A file that
    did not come back is dropped from the record: without per-point LLs the table falls back to the best-value
    rule. A record in the way stops it before anything is written, unless that record is non-finite
    (:func:`flowbench.results.check_overwrite`)."""
    artifacts = artifacts or {}
    key = (run.dataset, run.model, run.seed, run.tag)
    check_overwrite(run.record_path(out), force=False)  # before the files, which would overwrite another run's
    record.command = " ".join(sys.argv) if sys.argv and sys.argv[0] else None
    state = artifacts.get("model_state")
    if state is None:
        record.model_state = None
    else:
        _write_bytes(model_state_path(out, *key), state)
    points = artifacts.get("test_points")
    if points is None:
        record.test_points = None
    else:
        _write_bytes(per_point_path(out, *key), points)
    return write_record(run.record_path(out), record)


def replaced_record(run: SweepRun, out: str) -> bytes | None:
    """On the driver, before a run is sent: its record's bytes when the run is to replace it (a non-finite
    record), else None."""
    path = run.record_path(out)
    return _read(path) if replaceable(path) else None


def plant_record(options: RunOptions, data: bytes | None) -> None:
    """On the node: put the record that the run replaces (:func:`replaced_record`) where the run (``options``,
    its ``out`` the scratch folder) looks for it."""
    if data is None:
        return
    path = record_path(options.out, options.dataset, options.model, options.seed, options.tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
