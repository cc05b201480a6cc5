"""One experiment end to end: options → data → model → training → evaluation → :class:`RunRecord`.

This is what ``flowbench run`` and the sweeps call. The protocol is MAF's (Papamakarios et al. 2017, §4);
the parameter matching of baselines to another model follows Gresele et al. 2020, appendix H.3.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from flowbench import models
from flowbench.config import RunOptions, coerce_options, resolve_options
from flowbench.data.base import Dataset
from flowbench.errors import ConfigError
from flowbench.models.params import count_params, match_params
from flowbench.results import (
    RunRecord,
    check_overwrite,
    checkpoint_path,
    per_point_path,
    record_path,
    system_info,
    write_per_point,
    write_record,
)
from flowbench.training.evaluate import (
    log_prob_batches,
    spectral_norm_summary,
    summarize_test,
    validation_ll,
)
from flowbench.training.trainer import EpochInfo, Trainer, TrainResult
from flowbench.utils import resolve_device

__all__ = ["run_experiment", "run_and_report", "build_from_options", "summary_line", "SMALL_DIM"]

#: Test points used for the Jacobian spectral norm (power iteration per point; a summary, not a statistic).
JACOBIAN_POINTS = 64
#: Below this data dimension the matrices are too small for intra-op threads to pay; on a machine whose
#: cores are busy, torch's default threads even slow training down many times over (measured: the default
#: digits run took 270 s with 2 threads and 22 s with 1 on a loaded 2-core machine).
SMALL_DIM = 256
#: ``--match-params`` warns when the achieved count is further than this from the target (relative).
MATCH_WARN = 0.1


@dataclass
class _Tensors:
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def _target_count(target: int | str, dataset: str, dim: int) -> tuple[int, str]:
    """The parameter count to match: a number, or the count of model ``target`` as configured for ``dataset``."""
    if isinstance(target, int):
        return target, str(target)
    other = resolve_options({"dataset": dataset, "model": target})
    label = models.get_spec(target).name if ":" in target else target
    return count_params(models.build_model(target, dim, **other.hparams)), label


def build_from_options(opts: RunOptions, dim: int) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any] | None]:
    """Build the model; returns ``(flow, every hyperparameter resolved, match info or None)``."""
    spec = models.get_spec(opts.model_key)
    hparams = dict(opts.hparams)
    match = None
    if opts.match_params is not None:
        knob = opts.match_knob or spec.match_knob
        if knob is None:
            raise ConfigError(f"--match-params does not apply to model {opts.model!r}: it has no size knob "
                              "(nothing to solve for); name one with --match-knob, or remove the option")
        target, label = _target_count(opts.match_params, opts.dataset_key, dim)
        # Matching solves for the model's knob (the hidden width for the MAF family, as in Gresele et al.
        # 2020, H.3); a configured value of the knob yields to it, everything else stays fixed.
        result = match_params(opts.model_key, dim, target, knob=knob, **hparams)
        hparams = dict(result["hparams"])
        match = {"target": int(result["target"]), "achieved": int(result["achieved"]), "against": label,
                 "knob": result["knob"]}
        if abs(result["relative_error"]) > MATCH_WARN:
            smallest = match_params(opts.model_key, dim, 1, knob=knob, **hparams)["achieved"]
            warnings.warn(
                f"--match-params {target}: the closest {opts.model} has {result['achieved']:,} parameters "
                f"({result['relative_error']:+.0%}); the smallest reachable at D = {dim} is {smallest:,}",
                stacklevel=2,
            )
    # Every hyperparameter is recorded, defaults included, so the record alone reproduces the model.
    hparams = spec.resolve(hparams)
    return models.build_model(opts.model_key, dim, **hparams), hparams, match


def _paths(opts: RunOptions) -> tuple[Path, Path]:
    return (record_path(opts.out, opts.dataset, opts.model, opts.seed, opts.tag),
            checkpoint_path(opts.out, opts.dataset, opts.model, opts.seed, opts.tag))


def _check_before_compute(opts: RunOptions, rec_path: Path, ckpt_path: Path) -> None:
    from flowbench.errors import UsageError
    from flowbench.training.trainer import checkpoint_epoch

    check_overwrite(rec_path, opts.force)  # before spending any compute
    if opts.resume and not ckpt_path.is_file():
        if ckpt_path.with_suffix(".model.pt").is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}: the run finished and kept only its model "
                              "state; continuing a finished run needs its training run made with --keep-checkpoint "
                              "(or start again with --force, without --resume)")
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start afresh")
    if not opts.resume and not opts.force and ckpt_path.is_file():
        # Starting at epoch 1 would overwrite it at the end of the first epoch: a forgotten --resume after a
        # kill must not throw hours of training away.
        epoch = checkpoint_epoch(ckpt_path)
        after = f"after epoch {epoch}" if epoch is not None else "(unreadable)"
        raise UsageError(f"this run has a checkpoint {after} at {ckpt_path} (an earlier run was interrupted); "
                         "add --resume to continue from it, or --force to start again at epoch 1 and replace it")


def replacing_note(opts: RunOptions, rec_path: Path) -> str | None:
    """The record's note when it replaces, without ``--force``, an earlier run's non-finite record."""
    if opts.force or not rec_path.is_file():
        return None
    return "replaced the non-finite record of an earlier run of this seed (a non-finite record needs no --force)"


def _prepare_out(opts: RunOptions, folder: Path) -> None:
    """Create the run's folder under ``--out``, with an error that says what to do when that is impossible."""
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {opts.out} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise ConfigError(f"--out {opts.out}: cannot create {folder} because {blocker} is a file; "
                          "remove it or choose another --out") from None
    except OSError as e:
        raise ConfigError(f"--out {opts.out}: cannot create {folder} ({e.strerror or e}); choose a folder you "
                          "can write to") from e


@contextlib.contextmanager
def _run_lock(opts: RunOptions):
    """Hold the run's ``seed<k>.lock`` so that a second process training the same record stops at once."""
    from flowbench.errors import DiskFullError, UsageError
    from flowbench.results import lock_path
    from flowbench.utils import LockHeld, exclusive_lock

    path = lock_path(opts.out, opts.dataset, opts.model, opts.seed, opts.tag)
    try:
        with exclusive_lock(path):
            yield
    except LockHeld as e:
        holder = f"process {e.pid}" if e.pid is not None else "another process"
        raise UsageError(f"{holder} is already training this run (lock {path}); wait for it to finish, or "
                         "choose another --seed, --tag or --out") from None
    except DiskFullError:
        raise  # its own message: the disk, not the folder, is the problem
    except OSError as e:
        if e.filename is None or Path(e.filename) != path:
            raise
        raise ConfigError(f"--out {opts.out}: cannot create the lock file {path} ({e.strerror or e}); choose a "
                          "folder you can write to") from e


def _keep_model_state(opts: RunOptions, flow: torch.nn.Module) -> str:
    """Write the evaluated model's state beside the record; returns its file name (the record's ``model_state``)."""
    from flowbench.results import model_state_path
    from flowbench.training.trainer import save_model_state

    path = model_state_path(opts.out, opts.dataset, opts.model, opts.seed, opts.tag)
    save_model_state(path, flow)
    return path.name


def _drop_checkpoint(opts: RunOptions, ckpt_path: Path) -> None:
    """After the record: the full checkpoint (optimizer, RNG) only serves --resume; keep it if asked to."""
    if not opts.keep_checkpoint:
        ckpt_path.unlink(missing_ok=True)


def _seed_everything(seed: int) -> None:
    """Before the model is built, so that initial weights depend on the seed only."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to_device(data: Dataset, device: torch.device) -> _Tensors:
    """Data moved to the device once; batches are index views of these tensors."""
    def move(a: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)

    return _Tensors(move(data.train), move(data.val), move(data.test))


def _train(flow: torch.nn.Module, x: _Tensors, opts: RunOptions, ckpt_path: Path,
           callbacks: list[Callable[[EpochInfo], None]] | None,
           progress: bool) -> tuple[TrainResult, list[str], float]:
    """Gradient training under the MAF protocol (or the closed-form fit).

    Returns the result, notes for the record, and the training time of earlier sessions (``--resume``).
    """
    notes: list[str] = []
    if not flow.trainable:
        # Closed-form models (the Gaussian baseline) are fitted completely by initialize().
        result = TrainResult(stop_reason="closed-form fit (not trainable)")
        result.best_val_ll, result.n_nonfinite_val = validation_ll(flow, x.train, x.val, opts.eval_batch_size)
        return result, notes, 0.0
    trainer = Trainer(
        flow, x.train, x.val, lr=opts.lr, weight_decay=opts.weight_decay, batch_size=opts.batch_size,
        patience=opts.patience, max_epochs=opts.max_epochs, seed=opts.seed, eval_batch_size=opts.eval_batch_size,
        checkpoint_path=ckpt_path, fingerprint=opts.to_dict(), callbacks=callbacks, progress=progress,
        compile=opts.compile, adam_epoch_step=opts.adam_epoch_step,
        checkpoint_every_s=float(opts.checkpoint_every_s), max_steps=opts.max_steps, lr_schedule=opts.lr_schedule,
        grad_clip=opts.grad_clip, eval_every=opts.eval_every,
    )
    prior = 0.0
    if opts.resume:
        trainer.load_checkpoint()
        prior = trainer.result.train_time_s
        notes.append(f"resumed from the checkpoint after epoch {trainer.result.resumed_from_epoch}")
    elif ckpt_path.exists():
        notes.append("an older checkpoint was replaced (run with --resume to continue one instead)")
    return trainer.fit(), notes, prior


def _make_record(opts: RunOptions, flow: torch.nn.Module, hparams: dict[str, Any], match: dict[str, Any] | None,
                 result: TrainResult, evaluation: dict[str, Any], jac: dict[str, Any] | None, notes: list[str],
                 device: torch.device, wall_time_s: float) -> RunRecord:
    return RunRecord(
        dataset=opts.dataset,
        model=opts.model,
        display_name=models.display_name(opts.model_key, **hparams),
        model_ref=opts.model_ref,
        model_origin=models.model_origin(opts.model_key).to_json(),
        dataset_ref=opts.dataset_ref,
        tag=opts.tag,
        seed=opts.seed,
        config=opts.to_dict(),
        hparams=hparams,
        params=count_params(flow),
        match_target=match,
        epochs=result.epochs,
        steps=result.steps,
        best_step=result.best_step,
        best_epoch=result.best_epoch,
        best_val_ll=result.best_val_ll,
        n_nonfinite_val=result.n_nonfinite_val,
        stop_reason=result.stop_reason,
        **evaluation,
        history=result.history,
        train_time_s=result.train_time_s,
        wall_time_s=wall_time_s,
        device=str(device),
        threads=torch.get_num_threads(),
        **system_info(),
        status=result.status,
        failure=result.failure,
        jacobian_spectral_norm=jac,
        notes=notes,
        command=" ".join(sys.argv) if sys.argv and sys.argv[0] else None,
        provenance=opts.provenance,
    )


def _tensorboard(opts: RunOptions) -> Callable[[EpochInfo], None] | None:
    """``--tensorboard DIR``: a per-epoch logger in this run's own folder under DIR, or None."""
    if opts.tensorboard is None:
        return None
    from flowbench.training.tensorboard import run_log_dir, tensorboard_callback

    return tensorboard_callback(run_log_dir(opts.tensorboard, opts.dataset, opts.model, opts.seed, opts.tag))


def run_experiment(
    options: RunOptions | Mapping[str, Any],
    data: Dataset | None = None,
    *,
    callbacks: list[Callable[[EpochInfo], None]] | None = None,
    progress: bool = True,
) -> RunRecord:
    """Train, evaluate and record one run; returns the record (also written to the record path).

    ``options`` is a :class:`RunOptions` or a mapping of option values resolved over the defaults (no bundled
    config). ``data`` replaces loading ``options.dataset`` (in-memory data for toy problems and tests); the
    record then carries ``data.name``. ``callbacks`` are called after each epoch's checkpoint. The run holds
    its lock file from the first check to the record; afterwards only the evaluated model's state is kept
    (``seed<k>.model.pt``) unless ``keep_checkpoint``.
    """
    opts = coerce_options(options)
    if data is not None:
        opts = opts.replace(dataset=data.name)
    _prepare_out(opts, _paths(opts)[0].parent)
    with _run_lock(opts):
        return _run_experiment(opts, data, callbacks=callbacks, progress=progress)


def _run_experiment(
    opts: RunOptions,
    data: Dataset | None,
    *,
    callbacks: list[Callable[[EpochInfo], None]] | None,
    progress: bool,
) -> RunRecord:
    """The run itself, its lock held (``opts`` resolved, ``dataset`` already ``data.name`` when data is given)."""
    t0 = time.perf_counter()
    rec_path, ckpt_path = _paths(opts)
    _check_before_compute(opts, rec_path, ckpt_path)
    replacing = replacing_note(opts, rec_path)
    if data is None:
        from flowbench.data import load_dataset

        data = load_dataset(opts.dataset_key, opts.data_root)
    device = resolve_device(opts.device)
    _seed_everything(opts.seed)
    flow, hparams, match = build_from_options(opts, data.dim)
    flow = flow.to(device)
    x = _to_device(data, device)
    flow.initialize(x.train)
    logger = _tensorboard(opts)
    try:
        result, notes, prior_time = _train(flow, x, opts, ckpt_path, [*(callbacks or []), *([logger] if logger else [])],
                                           progress)
    finally:
        if logger is not None:
            logger.close()
    notes += [replacing] if replacing else []

    # Wall time includes the training time of earlier sessions when resumed (the whole run's).
    return finish_run(opts, data, x.test, flow, hparams, match, result, notes, device, t0 - prior_time,
                      rec_path, ckpt_path)


def finish_run(opts: RunOptions, data: Any, test_x: torch.Tensor, flow: torch.nn.Module, hparams: dict[str, Any],
               match: dict[str, Any] | None, result: TrainResult, notes: list[str], device: torch.device,
               t0: float, rec_path: Path, ckpt_path: Path, stack: dict[str, Any] | None = None) -> RunRecord:
    """After training, for a single run or each run of a stack: test evaluation, the record (wall time since
    ``t0``), the kept model state and per-point test LLs; the checkpoint goes unless kept."""
    logp = log_prob_batches(flow, test_x, opts.eval_batch_size)
    evaluation = summarize_test(logp, data)
    jac, note = spectral_norm_summary(flow, test_x[:JACOBIAN_POINTS])
    if note:
        notes.append(note)
    n_bad = evaluation["n_nonfinite_test"]
    if n_bad and evaluation["test_ll"] == -math.inf:
        # A density below float range is a legitimate (worst) value, not a failure: said in a note and the table.
        notes.append(f"{n_bad} of {evaluation['n_test']} test points have log-density −inf, so the test LL is −inf; "
                     f"over the others it is {evaluation['test_ll_finite']:.4f} ± {evaluation['test_ll_finite_2se']:.4f}")
    elif result.status == "ok" and not math.isfinite(evaluation["test_ll"]):
        result.status, result.failure = "nonfinite", "test log-likelihood is not finite"
    record = _make_record(opts, flow, hparams, match, result, evaluation, jac, notes, device, time.perf_counter() - t0)
    record.stack = stack
    record.model_state = _keep_model_state(opts, flow)  # before the record, which names it
    # The table's paired t-test (MAF paper's bolding rule) needs every test point's LL, not just their mean.
    points = per_point_path(opts.out, opts.dataset, opts.model, opts.seed, opts.tag)
    record.test_points = write_per_point(points, logp, test_x.cpu().numpy())
    write_record(rec_path, record, force=opts.force)
    _drop_checkpoint(opts, ckpt_path)
    return record


def summary_line(record: RunRecord, path: Any) -> str:
    """One human line: the headline result and where the record went."""
    trained = (
        f"best val LL {record.best_val_ll:.3f} at epoch {record.best_epoch}, {record.epochs} epochs"
        if record.best_epoch is not None
        else f"val LL {record.best_val_ll:.3f}, {record.stop_reason}"
    )
    line = (
        f"{record.display_name} on {record.dataset}: test LL {record.test_ll:.3f} ± {record.test_ll_2se:.3f} "
        f"nats ({trained}, {record.params} params, {record.wall_time_s:.1f} s)"
    )
    if record.bits_per_pixel is not None:
        line += f"; {record.bits_per_pixel:.3f} bits/pixel"
    origin = record.model_origin or {}
    if origin.get("kind", "built-in") != "built-in":
        # A peer library's flow keeps its own architecture: beside the paper's rows the difference is the model.
        paper = models.get_spec(record.model_ref or record.model).paper
        where = record.model_ref or f"plugin {origin.get('detail', '')}".strip()
        line += f"\n(plugged in from {where}: {paper}; trained and evaluated under flowbench's protocol)"
    if record.provenance is not None and not record.provenance.get("verified"):
        from flowbench.published import PUBLISHED, SOURCES

        beside = [p for p in PUBLISHED if p.model == record.display_name and p.dataset == record.dataset]
        if beside:  # a published number stands beside this cell: say ours is not its configuration
            p = beside[0]
            line += (f"\n(ours, config unverified: the {SOURCES[p.source][0]}'s settings for this cell could not be "
                     f"confirmed, so this is not a reproduction of its {p.mean:g}; see the config's [provenance])")
    if record.status != "ok":
        line += f"\nstatus {record.status}: {record.failure}"
    return line + f"\nrecord: {path}"


def _set_threads(opts: RunOptions) -> None:
    """Apply ``--threads`` or the default rule (see :data:`SMALL_DIM`)."""
    import os

    from flowbench.data import get_info
    from flowbench.utils import set_threads

    if opts.threads is not None:
        set_threads(opts.threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        try:
            info = get_info(opts.dataset_key)
        except ConfigError:  # an unknown dataset is reported when it is loaded
            info = None
        if info is not None and info.dim < SMALL_DIM:
            torch.set_num_threads(1)


def run_and_report(opts: RunOptions) -> int:
    """``flowbench run``: set threads, train, print the summary line; exit status 0 when the run is ok."""
    _set_threads(opts)
    if opts.seeds is not None:
        from flowbench.training.stacked import parse_seeds, run_stacked

        runs = [opts.replace(seed=s, seeds=None) for s in parse_seeds(opts.seeds)]
        try:
            records = run_stacked(runs, progress=not opts.quiet)
        except KeyboardInterrupt:
            print(f"training interrupted; each seed's last checkpoint (written at most every "
                  f"{opts.checkpoint_every_s:g} s and at the end of an epoch) is kept: run the same command with "
                  f"--resume to continue seeds {opts.seeds}", file=sys.stderr)
            raise
        for record, run in zip(records, runs):
            print(summary_line(record, _paths(run.replace(dataset=record.dataset))[0]))
        _check_finite(runs, records)
        return 0 if all(r.status == "ok" for r in records) else 1
    try:
        record = run_experiment(opts, progress=not opts.quiet)
    except KeyboardInterrupt:
        print(f"training interrupted; the last checkpoint (written at most every {opts.checkpoint_every_s:g} s "
              "and at the end of an epoch) is kept: run the same command with --resume to continue", file=sys.stderr)
        raise
    print(summary_line(record, _paths(opts.replace(dataset=record.dataset))[0]))
    _check_finite([opts], [record])
    return 0 if record.status == "ok" else 1


def _check_finite(runs: list[RunOptions], records: list[RunRecord]) -> None:
    """A run that ended non-finite was given a setting it cannot train with (``--lr 1e10``): a ConfigError (exit
    2) that says what to change. Its record stays, and the next run of the command replaces it without --force."""
    bad = [(o, r) for o, r in zip(runs, records) if r.status == "nonfinite"]
    if not bad:
        return
    o, r = bad[0]
    default = models.get_spec(o.model_key).lr
    advice = "" if "--lr" in (r.failure or "") else " (lower --lr, or check the data for outliers)"
    lr = f"this run's --lr was {o.lr:g}" + (f" ({o.model}'s default: {default:g})" if o.lr != default else "")
    seeds = "" if len(runs) == 1 else f" for seed{'s' if len(bad) > 1 else ''} {', '.join(str(b.seed) for b, _ in bad)}"
    kept = "its record is" if len(bad) == 1 else "their records are"
    raise ConfigError(f"training did not stay finite{seeds}: {r.failure}{advice}; {lr}. {kept.capitalize()} kept with "
                      "status nonfinite, and the next run of this command replaces "
                      f"{'it' if len(bad) == 1 else 'them'} without --force")
