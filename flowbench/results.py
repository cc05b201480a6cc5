"""Run records: one JSON file per run, written atomically, never silently overwritten.

Path scheme: ``<out>/runs/<dataset>/<model>/seed<k>.json``, or ``<out>/runs/<dataset>/<model>/<tag>/seed<k>.json``
when the run has a tag (sweeps tag each configuration so they don't collide). The checkpoint lives beside the
record as ``seed<k>.ckpt`` while the run trains; once the record is written only the evaluated model's state
is kept, in ``seed<k>.model.pt`` (the record's ``model_state``), unless ``--keep-checkpoint``. The per-point
test log-likelihoods go beside the record too, in ``seed<k>.testll.npy`` (the record's ``test_points``; see
:func:`write_per_point`): the paired t-test behind the table's bolding needs them. A run being trained holds
``seed<k>.lock`` (see :func:`flowbench.utils.exclusive_lock`).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import platform
import re
import subprocess
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from flowbench.errors import ConfigError, UsageError
from flowbench.utils import LockHeld, atomic_save_npy, atomic_write_json, lock_holder

__all__ = [
    "FORMAT_VERSION",
    "RunRecord",
    "run_dir",
    "RunFiles",
    "record_path",
    "checkpoint_path",
    "model_state_path",
    "per_point_path",
    "PER_POINT_DTYPE",
    "write_per_point",
    "read_per_point",
    "sha256_of_test_set",
    "lock_path",
    "check_overwrite",
    "replaceable",
    "write_record",
    "read_record",
    "iter_records",
    "PendingRun",
    "runs_without_record",
    "system_info",
    "json_safe",
    "read_field",
]

#: Version 2 renamed the ``*_se2`` fields (twice the standard error, not its square) to ``*_2se``.
FORMAT_VERSION = 2
_RENAMED_V1 = {
    "test_ll_se2": "test_ll_2se",
    "test_ll_pixel_se2": "test_ll_pixel_2se",
    "bits_per_pixel_se2": "bits_per_pixel_2se",
}
_NUMBERS = (
    "test_ll",
    "test_ll_2se",
    "best_val_ll",
    "test_ll_pixel",
    "test_ll_pixel_2se",
    "bits_per_pixel",
    "bits_per_pixel_2se",
    "train_time_s",
    "wall_time_s",
    "test_ll_finite",
    "test_ll_finite_2se",
    "n_nonfinite_val",
    "n_nonfinite_test",
    "test_ll_conditional",
    "test_ll_conditional_2se",
    "test_accuracy",
    "test_accuracy_2se",
)


@dataclass
class RunRecord:
    """One run's result: what was trained, how, and what it scored (test LL in nats, ± 2 standard errors).

    Written as JSON (``to_json``) with ``format`` = :data:`FORMAT_VERSION`; ``from_json`` reads format 1
    (``*_se2`` names) and 2. Fields a writer added that this version does not know are kept in ``extra``.
    """

    dataset: str
    model: str
    display_name: str
    seed: int
    config: dict[str, Any]
    hparams: dict[str, Any]
    params: int
    epochs: int
    best_epoch: int | None
    best_val_ll: float | None
    test_ll: float | None
    test_ll_2se: float | None
    n_test: int
    status: str
    tag: str | None = None
    match_target: dict[str, Any] | None = None
    stop_reason: str = ""
    #: How training ended, one of :data:`flowbench.status.KINDS`, as the trainer wrote it (None in records written
    #: before the field: :func:`flowbench.status.run_status` then reads ``stop_reason``).
    ended: str | None = None
    steps: int | None = None  # optimiser steps taken (the step-budget protocols report it)
    best_step: int | None = None
    test_ll_pixel: float | None = None
    test_ll_pixel_2se: float | None = None
    bits_per_pixel: float | None = None
    bits_per_pixel_2se: float | None = None
    #: A class-conditional model (MAF Table 2): ``test_ll`` is log p(x) = logsumexp_y log p(x | y) − log K (uniform
    #: label prior, MAF's ``experiments.evaluate_logprob``); beside it the mean log p(x | y) at the true labels
    #: (what validation scores) and the accuracy of the classifier argmax_y p(x | y), as MAF's ``evaluate`` prints.
    conditional: bool = False
    test_ll_conditional: float | None = None
    test_ll_conditional_2se: float | None = None
    test_accuracy: float | None = None
    test_accuracy_2se: float | None = None
    #: Points whose log-density was not finite (−inf): on the validation set at the best epoch, on the test
    #: set. With any on the test set ``test_ll`` is −inf (the protocol's mean over all points; JSON null,
    #: read back as −inf) and ``test_ll_finite`` ± ``test_ll_finite_2se`` is the mean over the finite ones.
    n_nonfinite_val: int = 0
    n_nonfinite_test: int = 0
    test_ll_finite: float | None = None
    test_ll_finite_2se: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    device: str = "cpu"
    threads: int | None = None
    torch: str | None = None
    python: str | None = None
    platform: str | None = None
    git_commit: str | None = None
    timestamp: str | None = None
    failure: str | None = None
    jacobian_spectral_norm: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    command: str | None = None
    provenance: dict[str, Any] | None = None
    #: Stacked runs: ``{"seeds": [...], "size": R, "id": ...}`` of the stack it trained in (no ``id`` in records
    #: written before it was kept); ``wall_time_s`` is then the whole stack's.
    stack: dict[str, Any] | None = None
    model_state: str | None = None  # file name, beside the record, of the evaluated model's state_dict
    #: A plugged-in model's reference (``module:ATTR``, ``/abs/file.py:ATTR``; None for a registered name), by
    #: which a resumed or re-plotted run finds the same spec, and where its spec came from
    #: (``{"kind": "built-in" | "plugin" | "module" | "file", "detail", "reference", "sha256"}``).
    model_ref: str | None = None
    model_origin: dict[str, Any] | None = None
    dataset_ref: str | None = None
    #: The per-point test log-likelihoods kept beside the record (:func:`write_per_point`):
    #: ``{"file", "n", "dtype", "test_sha256"}``; None in records written before they were kept.
    test_points: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # where it was read from (not written)

    def to_json(self) -> dict[str, Any]:
        """The JSON object (NaN/inf as null), ``format`` first."""
        out: dict[str, Any] = {"format": FORMAT_VERSION}
        for f in fields(self):
            if f.name not in ("extra", "path"):
                out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        return json_safe(out)

    @classmethod
    def from_json(cls, data: Any, source: str = "record") -> RunRecord:
        """Build from a parsed JSON object of format 1 or 2; a ConfigError names what is wrong."""
        bad = f"{source} is not a valid run record"
        if not isinstance(data, dict):
            raise ConfigError(f"{bad} (not a JSON object); delete or re-run it")
        data = dict(data)
        version = data.pop("format", 1)
        if version not in (1, FORMAT_VERSION):
            raise ConfigError(
                f"{source} has record format {version!r}; this flowbench reads formats 1 and "
                f"{FORMAT_VERSION} — upgrade flowbench"
            )
        if version == 1:
            data = {_RENAMED_V1.get(k, k): v for k, v in data.items()}
        names = {f.name for f in fields(cls)} - {"extra", "path"}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"{bad} (missing {', '.join(missing)}); delete or re-run it")
        for key in _NUMBERS:
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{bad} ({key} is {value!r}, not a number); delete or re-run it")
        known = {k: v for k, v in data.items() if k in names}
        if known.get("test_ll") is None and (known.get("n_nonfinite_test") or 0) > 0:
            known["test_ll"] = -math.inf  # JSON has no −inf; a mean over points that include −inf is −inf
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def example(cls, **overrides: Any) -> RunRecord:
        """A complete, plausible record (MAF (5) on POWER) for tests; ``overrides`` replace fields."""
        base: dict[str, Any] = dict(
            dataset="power",
            model="maf",
            display_name="MAF (5)",
            seed=0,
            tag=None,
            config={"dataset": "power", "model": "maf", "seed": 0},
            hparams={"layers": 5},
            params=9620,
            epochs=10,
            best_epoch=8,
            best_val_ll=0.1,
            test_ll=0.1,
            test_ll_2se=0.01,
            n_test=1000,
            status="ok",
            stop_reason="no improvement for 30 epochs",
            history=[{"epoch": i, "train_loss": 1.0 / i, "val_ll": 0.01 * i} for i in range(1, 11)],
        )
        base.update(overrides)
        return cls(**base)


_SAFE = re.compile(r"^[A-Za-z0-9._=,+-]+$")


def _component(value: str, what: str) -> str:
    """A path component from user input: no separators, no '..', so a tag cannot escape ``<out>``."""
    if not value or not _SAFE.match(value) or value in (".", ".."):
        raise ConfigError(f"{what} {value!r} cannot be used in a file name; use letters, digits and . _ = , + - only")
    return value


def read_field(rec: Any, key: str, default: Any = None) -> Any:
    """``rec[key]`` for a record read as a mapping (sweep reports' JSON), ``rec.key`` for a :class:`RunRecord`;
    ``default`` when absent."""
    if isinstance(rec, Mapping):
        return rec.get(key, default)
    return getattr(rec, key, default)


def run_dir(out: str | Path, dataset: str, model: str, tag: str | None = None) -> Path:
    d = Path(out) / "runs" / _component(dataset, "dataset") / _component(model, "model")
    return d / _component(tag, "tag") if tag else d


@dataclass(frozen=True)
class RunFiles:
    """One run's files, side by side in its :func:`run_dir`: the record, the resume checkpoint, the kept model
    state, the per-point test LLs and the lock (see the module docstring)."""

    folder: Path
    seed: int

    @classmethod
    def of(cls, out: str | Path, dataset: str, model: str, seed: int, tag: str | None = None) -> RunFiles:
        return cls(run_dir(out, dataset, model, tag), int(seed))

    def _file(self, suffix: str) -> Path:
        return self.folder / f"seed{self.seed}{suffix}"

    @property
    def record(self) -> Path:
        return self._file(".json")

    @property
    def checkpoint(self) -> Path:
        return self._file(".ckpt")

    @property
    def model_state(self) -> Path:
        return self._file(".model.pt")

    @property
    def per_point(self) -> Path:
        return self._file(".testll.npy")

    @property
    def lock(self) -> Path:
        return self._file(".lock")


def record_path(out: str | Path, dataset: str, model: str, seed: int, tag: str | None = None) -> Path:
    return RunFiles.of(out, dataset, model, seed, tag).record


def checkpoint_path(out: str | Path, dataset: str, model: str, seed: int, tag: str | None = None) -> Path:
    return RunFiles.of(out, dataset, model, seed, tag).checkpoint


def model_state_path(out: str | Path, dataset: str, model: str, seed: int, tag: str | None = None) -> Path:
    return RunFiles.of(out, dataset, model, seed, tag).model_state


def per_point_path(out: str | Path, dataset: str, model: str, seed: int, tag: str | None = None) -> Path:
    return RunFiles.of(out, dataset, model, seed, tag).per_point


def lock_path(out: str | Path, dataset: str, model: str, seed: int, tag: str | None = None) -> Path:
    return RunFiles.of(out, dataset, model, seed, tag).lock


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


def replaceable(path: str | Path) -> bool:
    """Whether the record at ``path`` may be replaced without ``--force``: a run that ended non-finite (a
    diverged setting) holds no result worth keeping from the run that is to fix it."""
    try:
        return json.loads(Path(path).read_text()).get("status") == "nonfinite"
    except (OSError, ValueError, AttributeError):
        return False


def check_overwrite(path: str | Path, force: bool) -> None:
    """Refuse to replace an existing record unless ``force`` or it is :func:`replaceable` (callers check before
    spending compute too)."""
    if Path(path).exists() and not force and not replaceable(path):
        raise UsageError(
            f"a record already exists at {path}; pass --force to overwrite it or choose another --seed/--tag"
        )


def write_record(path: str | Path, record: RunRecord, force: bool = False) -> Path:
    """Write ``record`` as JSON atomically; refuse to replace an existing record unless ``force``."""
    path = Path(path)
    check_overwrite(path, force)
    atomic_write_json(path, record.to_json())
    return path


#: float32 halves the file (POWER: 204,928 points, 0.8 MB a run; MNIST: 10,000, 40 kB) and moves a per-point
#: value by at most 6e-8 of itself, far below anything a t-test over thousands of points resolves.
PER_POINT_DTYPE = "float32"


def sha256_of_test_set(test: Any) -> str:
    """Fingerprint of a test set (its float32 bytes, row-major): a paired test needs the same points."""
    import numpy as np  # lazy: this module stays light (sweep workers import it before torch)

    return hashlib.sha256(np.ascontiguousarray(test, dtype=np.float32).tobytes()).hexdigest()


def write_per_point(path: str | Path, logp: Any, test: Any, test_sha256: str | None = None) -> dict[str, Any]:
    """Write the per-point test log-likelihoods ``logp`` (one per row of ``test``, in order; −inf kept) as
    ``.npy`` atomically; returns the record's ``test_points`` entry (file name, count, dtype, test-set hash).
    ``test_sha256``: :func:`sha256_of_test_set` of ``test`` when the caller already has it (a stack's runs share
    one test set)."""
    import numpy as np  # lazy: see sha256_of_test_set

    path = Path(path)
    values = np.asarray(logp, dtype=PER_POINT_DTYPE)
    atomic_save_npy(path, values)
    return {
        "file": path.name,
        "n": int(values.size),
        "dtype": PER_POINT_DTYPE,
        "test_sha256": test_sha256 or sha256_of_test_set(test),
    }


def read_per_point(record: RunRecord) -> tuple[Any, str | None]:
    """``(per-point test LLs as float64, None)``, or ``(None, why not)`` for a record without usable ones:
    written before they were kept, file missing, or a file that does not match the record (count or mean)."""
    import numpy as np  # lazy: see sha256_of_test_set

    meta = record.test_points
    if not meta:
        return None, "its record has no per-point test log-likelihoods (written before they were kept)"
    if record.path is None:
        return None, "its record was not read from a file, so its per-point file cannot be found"
    path = Path(record.path).parent / str(meta.get("file", ""))
    try:
        values = np.load(path, allow_pickle=False).astype(np.float64)
    except (OSError, ValueError) as e:
        return None, f"its per-point file {path} cannot be read ({type(e).__name__}: {e})"
    if values.ndim != 1 or values.size != record.n_test or values.size != meta.get("n"):
        return None, f"its per-point file {path} holds {values.size} values, the record {record.n_test} test points"
    # A file left by another run (copied folders, a record edited by hand) must not stand in for this one.
    mean = float(values.mean())
    want = record.test_ll if record.test_ll is not None else math.nan
    if not (mean == want or abs(mean - want) <= 1e-5 * max(1.0, abs(want))):
        return None, f"its per-point file {path} has mean {mean:.6g}, the record's test LL is {want:.6g}"
    return values, None


def read_record(path: str | Path) -> RunRecord:
    """Load one record (format 1 or 2), checking it is complete; errors name the file and what to do."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a valid run record (not UTF-8 text: {e}); delete or re-run it") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not a valid run record (bad JSON: {e}); delete or re-run it") from e
    except OSError as e:
        raise ConfigError(f"{path} cannot be read: {e.strerror or e}") from e
    record = RunRecord.from_json(data, str(path))
    record.path = str(path)
    return record


def iter_records(results: str | Path) -> Iterator[RunRecord]:
    """Every record under ``<results>/runs`` in sorted path order (deterministic)."""
    if not Path(results).exists():
        raise ConfigError(
            f"--results {results}: no such folder; pass the folder your runs wrote to (flowbench run --out, "
            "default results/)"
        )
    if not Path(results).is_dir():
        raise ConfigError(f"--results {results} is a file; pass the results folder that holds runs/")
    root = Path(results) / "runs"
    if not root.is_dir():
        raise ConfigError(f"no run records under {root}; train something first with `flowbench run`")
    for path in sorted(root.rglob("seed*.json")):
        yield read_record(path)


_CHECKPOINT_NAME = re.compile(r"seed(\d+)\.ckpt")


@dataclass(frozen=True)
class PendingRun:
    """A run under ``<results>/runs`` with a training checkpoint and no record: training now, or stopped and
    waiting for ``--resume``. Its identity comes from where the checkpoint lies (:func:`run_dir`)."""

    dataset: str
    model: str
    tag: str | None
    seed: int
    checkpoint: Path

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.checkpoint.parent, self.seed)

    def holder(self) -> LockHeld | None:
        """The process training it now (holding its lock), or None: waiting to be resumed, or killed."""
        return lock_holder(self.files.lock)


def runs_without_record(
    results: str | Path, datasets: Iterable[str] | None = None, models: Iterable[str] | None = None
) -> list[PendingRun]:
    """The runs under ``<results>/runs`` with a checkpoint and no record beside it (sorted by path), of the given
    datasets and models (registry names; ``None`` keeps all). A checkpoint kept beside its record
    (``--keep-checkpoint``) is a finished run's and is left out. Reads no checkpoint."""
    root = Path(results) / "runs"
    if not root.is_dir():
        return []
    datasets, models = (set(x) if x else None for x in (datasets, models))
    runs = []
    for path in sorted(root.rglob("seed*.ckpt")):
        name, parts = _CHECKPOINT_NAME.fullmatch(path.name), path.relative_to(root).parts[:-1]
        if name is None or len(parts) not in (2, 3) or path.with_suffix(".json").is_file():
            continue
        run = PendingRun(parts[0], parts[1], parts[2] if len(parts) == 3 else None, int(name.group(1)), path)
        if (datasets is None or run.dataset in datasets) and (models is None or run.model in models):
            runs.append(run)
    return runs


@functools.lru_cache(maxsize=1)  # once per process, not a git process per record
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
    import torch  # lazy: this module stays light (see sha256_of_test_set)

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
