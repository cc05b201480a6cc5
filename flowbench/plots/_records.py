"""The one place where figures and reports read run records.

Records are :class:`flowbench.results.RunRecord` objects; every read goes through :func:`field` (which also
takes a mapping, for the sweep reports' JSON), so a change of the record's fields is an edit to this file only.
Which configurations a figure shows is chosen by :func:`flowbench.aggregate.choose`, as in the table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np

from flowbench import status as S
from flowbench.errors import ConfigError, FlowbenchError
from flowbench.results import PendingRun, read_field

__all__ = [
    "FailedRun",
    "History",
    "RunInProgress",
    "checkpoint",
    "failed_runs",
    "field",
    "history",
    "label",
    "load_runs",
    "published_ll",
    "replace",
    "read_progress",
    "select_runs",
]

Record = Any  # a RunRecord (or a mapping with the same keys)


field = read_field  # one reader of a record or its mapping, shared with flowbench.status


def replace(rec: Record, **changes: Any) -> Record:
    """A copy of ``rec`` with some fields changed (the record on disk is untouched)."""
    if isinstance(rec, Mapping):
        return {**rec, **changes}
    import dataclasses

    return dataclasses.replace(rec, **changes)


def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def dataset(rec: Record) -> str:
    return field(rec, "dataset")


def model(rec: Record) -> str:
    return field(rec, "model")


def model_key(rec: Record) -> str:
    """What rebuilds the record's model in any process: a plugged-in model's reference, else its name."""
    return field(rec, "model_ref") or model(rec)


def dataset_key(rec: Record) -> str:
    return field(rec, "dataset_ref") or dataset(rec)


def tag(rec: Record) -> str | None:
    return field(rec, "tag")


def seed(rec: Record) -> int:
    return int(field(rec, "seed"))


def status(rec: Record) -> str:
    return field(rec, "status") or "ok"


def failure(rec: Record) -> str | None:
    return field(rec, "failure")


def stop_reason(rec: Record) -> str:
    return field(rec, "stop_reason") or ""


def epochs(rec: Record) -> int:
    return int(field(rec, "epochs") or 0)


def best_epoch(rec: Record) -> int | None:
    b = field(rec, "best_epoch")
    return None if b is None else int(b)


def best_step(rec: Record) -> int | None:
    b = field(rec, "best_step")
    return None if b is None else int(b)


evaluates_by_step = S.evaluates_by_step


def best_val_ll(rec: Record) -> float:
    return _float(field(rec, "best_val_ll"))


def test_ll(rec: Record) -> float:
    return _float(field(rec, "test_ll"))


def test_ll_2se(rec: Record) -> float:
    value = field(rec, "test_ll_2se")
    return _float(field(rec, "test_ll_se2") if value is None else value)


def wall_time_s(rec: Record) -> float:
    return _float(field(rec, "wall_time_s"))


def params(rec: Record) -> int | None:
    return field(rec, "params")


def hparams(rec: Record) -> dict[str, Any]:
    return dict(field(rec, "hparams") or {})


def data_root(rec: Record) -> str | None:
    return (field(rec, "config") or {}).get("data_root")


def record_path(rec: Record) -> Path | None:
    p = field(rec, "_path") or field(rec, "path")
    return Path(p) if p else None


def label(rec: Record, with_tag: bool = False) -> str:
    """The table's row label (``MAF (5)``, ``MAF (5) [matched to relgrad]``), optionally with ``[tag]``."""
    text = field(rec, "display_name") or model(rec)
    against = (field(rec, "match_target") or {}).get("against")
    if against:
        text += f" [matched to {against}]"
    if with_tag and tag(rec):
        text += f" [{tag(rec)}]"
    return text


_ABSENT = object()  # a history row without the key (older records), as against one whose value is null


@dataclass(frozen=True)
class History:
    """Per-evaluation values of one run, as arrays (NaN where the record has null). ``epoch`` is the epoch each
    evaluation fell in, ``step`` the optimiser steps taken by then (``has_step`` False for records written
    before steps were kept). ``train_nll`` is the exact NLL on the fixed training subsample; ``has_train_nll``
    is False for records written before it was kept."""

    epoch: np.ndarray
    train_loss: np.ndarray
    val_ll: np.ndarray
    train_nll: np.ndarray
    has_train_nll: bool = True
    step: np.ndarray = dataclass_field(default_factory=lambda: np.zeros(0, dtype=int))
    has_step: bool = False


def _has(rows: list[Any], key: str) -> bool:
    return bool(rows) and all(
        (r.get(key, _ABSENT) if isinstance(r, Mapping) else getattr(r, key, _ABSENT)) is not _ABSENT for r in rows
    )


def history(rec: Record) -> History:
    rows = field(rec, "history") or []
    get = (lambda r, k: r.get(k)) if rows and isinstance(rows[0], Mapping) else (lambda r, k: getattr(r, k, None))
    has_step = _has(rows, "step") and all(get(r, "step") is not None for r in rows)
    return History(
        np.array([int(get(r, "epoch")) for r in rows], dtype=int),
        np.array([_float(get(r, "train_loss")) for r in rows]),
        np.array([_float(get(r, "val_ll")) for r in rows]),
        np.array([_float(get(r, "train_nll")) for r in rows]),
        _has(rows, "train_nll"),
        np.array([int(get(r, "step")) for r in rows] if has_step else [], dtype=int),
        has_step,
    )


def checkpoint(rec: Record) -> Path:
    """The run's checkpoint ``seed<k>.ckpt`` (beside the record; else where ``config.out`` puts it)."""
    path = record_path(rec)
    if path is not None:
        return path.with_suffix(".ckpt")
    from flowbench.results import checkpoint_path

    out = (field(rec, "config") or {}).get("out") or "results"
    return checkpoint_path(out, dataset(rec), model(rec), seed(rec), tag(rec))


def load_runs(results: str | Path) -> list[Record]:
    """Every record under ``<results>/runs`` (sorted by path: deterministic)."""
    from flowbench.results import iter_records

    return list(iter_records(results))


def _check_present(what: str, wanted: Iterable[str] | None, present: set[str]) -> None:
    missing = sorted(set(wanted or ()) - present)
    if missing:
        have = ", ".join(sorted(present)) or "none"
        raise ConfigError(f"no records for {what} {', '.join(missing)}; the results hold: {have}")


def select_runs(
    records: list[Record],
    datasets: Iterable[str] | None = None,
    models: Iterable[str] | None = None,
    tags: Iterable[str] | None = None,
) -> list[Record]:
    """The records of the given datasets, models (registry names) and tags; ``None`` keeps all.

    Raises:
        ConfigError: a requested dataset, model or tag has no record, or nothing is left.
    """
    datasets, models, tags = (list(x) if x else None for x in (datasets, models, tags))
    _check_present("dataset", datasets, {dataset(r) for r in records})
    kept = [r for r in records if datasets is None or dataset(r) in datasets]
    _check_present("model", models, {model(r) for r in kept})
    kept = [r for r in kept if models is None or model(r) in models]
    _check_present("tag", tags, {tag(r) for r in kept if tag(r)})
    kept = [r for r in kept if tags is None or tag(r) in tags]
    if not kept:
        raise ConfigError("no run records match the selection")
    return kept


def published_ll(rec: Record, sources: Iterable[str]) -> float | None:
    """The published test LL for this row label and dataset (first source that has it), or None."""
    from flowbench.published import published

    for p in published(list(sources)):
        if p.model == label(rec) and p.dataset == dataset(rec):
            return p.mean
    return None


@dataclass(frozen=True)
class FailedRun:
    """A sweep run that failed and left no record (from ``<results>/sweeps/<name>.json``)."""

    dataset: str
    model: str
    tag: str | None
    seed: int
    error: str
    sweep: str
    reported: float = 0.0  # when the sweep report was written (its modification time)
    display_name: str | None = None  # the label its record would have had (older sweep reports lack it)

    @property
    def label(self) -> str:
        """Its row label with the tag, as a record's would read: ``MADE MoG [hidden-layers=2]``."""
        return (self.display_name or self.model) + (f" [{self.tag}]" if self.tag else "")


def failed_runs(results: str | Path) -> tuple[list[FailedRun], list[str]]:
    """Failed sweep runs without a record, and the sweep reports that could not be read (as messages)."""
    from flowbench.results import record_path as record_file

    failed: list[FailedRun] = []
    problems: list[str] = []
    for path in sorted((Path(results) / "sweeps").glob("*.json")):
        try:
            runs = json.loads(path.read_text())["runs"]
            reported = path.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"could not read sweep report {path} ({type(e).__name__}: {e})")
            continue
        for r in runs:
            if r.get("status") != "failed":
                continue
            # A later sweep may have retried it successfully: the record is then the truth.
            if record_file(results, r["dataset"], r["model"], int(r["seed"]), r.get("tag")).is_file():
                continue
            failed.append(
                FailedRun(
                    r["dataset"],
                    r["model"],
                    r.get("tag"),
                    int(r["seed"]),
                    r.get("error") or "unknown error",
                    path.stem,
                    reported,
                    r.get("display_name"),
                )
            )
    return failed, problems


@dataclass(frozen=True)
class RunInProgress(PendingRun):
    """A pending run (a training checkpoint and no record yet: training now, or stopped and waiting for
    ``--resume``; runs on a large dataset span sessions) with what its checkpoint says: ``progress``
    (:class:`flowbench.training.trainer.Progress`) and ``written``, the checkpoint's modification time."""

    progress: Any
    written: float

    def training_now(self) -> str:
        """``yes (process N)`` while a process holds the run's lock (trains it), else ``no`` (waiting to be
        resumed, or killed: a lock file a dead process left holds nothing)."""
        held = self.holder()
        return "no" if held is None else f"yes ({held.holder})"

    def record(self) -> dict[str, Any]:
        """The run so far as a record mapping, for the curves: its history and best so far, status ``in
        progress``, and the row label its record will have."""
        from flowbench.config import fingerprint_display_name

        p = self.progress
        name = fingerprint_display_name({"model": self.model, **p.options}) or self.model
        return {
            "dataset": self.dataset,
            "model": self.model,
            "display_name": name,
            "tag": self.tag,
            "seed": self.seed,
            "config": p.options,
            "history": p.history,
            "epochs": p.epoch,
            "steps": p.step,
            "best_epoch": p.best_epoch,
            "best_step": p.best_step,
            "best_val_ll": p.best_val_ll,
            "status": "ok",
            "ended": "in progress",
            "stop_reason": "in progress",
        }


def read_progress(pending: Iterable[PendingRun]) -> tuple[list[RunInProgress], list[str]]:
    """Each run's progress read from its checkpoint, and the checkpoints that could not be read (as messages).
    A checkpoint beside a record (``--keep-checkpoint``) belongs to a finished run and is not pending; one marked
    finished without a record is a seed of a stack that stopped before the others (the stack writes the records
    when it ends), and is listed."""
    from flowbench.training.trainer import checkpoint_progress  # lazy: it imports torch

    runs: list[RunInProgress] = []
    problems: list[str] = []
    for run in pending:
        try:
            progress = checkpoint_progress(run.checkpoint)
            written = run.checkpoint.stat().st_mtime
        except (FlowbenchError, OSError) as e:  # one bad file must not hide the others
            problems.append(str(e))
            continue
        runs.append(RunInProgress(**vars(run), progress=progress, written=written))
    return runs, problems
