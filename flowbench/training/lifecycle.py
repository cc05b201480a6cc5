"""A run's life: options → files and lock → data and model → train → finish → record.

Every way of training shares these phases: a single run (:func:`flowbench.training.experiment.run_experiment`),
a stack of runs (:func:`flowbench.training.stacked.run_stacked`), and through them every sweep executor and Ray:

1. :func:`claim` the runs' files (:class:`~flowbench.results.RunFiles`): their folders, their locks, held from the
   first check to the record, and the checks before any compute;
2. :func:`prepare` the data, once on the device, and each run's model, seeded as the run;
3. train (:func:`train_single` for one run; the stacked trainer for a stack);
4. :func:`finish_run` each run: test evaluation, the record, the kept model state, the per-point test LLs, and
   the checkpoint removed unless kept.

The protocol is MAF's (Papamakarios et al. 2017, §4); the parameter matching of baselines to another model
follows Gresele et al. 2020, appendix H.3.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from flowbench import interrupts, models, utils
from flowbench.config import RunOptions, resolve_options
from flowbench.data import DATASETS, load_dataset
from flowbench.data.base import Dataset
from flowbench.errors import ConfigError, DiskFullError, RunLocked, UsageError
from flowbench.models.params import count_params, match_params
from flowbench.results import (
    RunFiles,
    RunRecord,
    check_overwrite,
    sha256_of_test_set,
    system_info,
    write_per_point,
    write_record,
)
from flowbench.training.evaluate import evaluate_test_points, spectral_norm_summary, validation_ll
from flowbench.training.loop import steps_per_epoch
from flowbench.training.trainer import (
    EpochInfo,
    Trainer,
    TrainResult,
    checkpoint_where,
    compile_problem,
    save_model_state,
)
from flowbench.utils import LockHeld, exclusive_lock, resolve_device, seed_everything

__all__ = [
    "JACOBIAN_POINTS",
    "MATCH_WARN",
    "Built",
    "Prepared",
    "RunTensors",
    "build_from_options",
    "check_before_compute",
    "check_memory",
    "claim",
    "finish_run",
    "label_classes",
    "make_record",
    "prepare",
    "run_files",
    "step_memory",
    "to_device",
    "train_single",
]

#: Test points used for the Jacobian spectral norm (power iteration per point; a summary, not a statistic).
JACOBIAN_POINTS = 64
#: ``--match-params`` warns when the achieved count is further than this from the target (relative).
MATCH_WARN = 0.1


# -- options → files → lock ---------------------------------------------------------------------------------------
def run_files(opts: RunOptions) -> RunFiles:
    """The run's files under ``--out`` (record, checkpoint, model state, per-point test LLs, lock)."""
    return RunFiles.of(opts.out, opts.dataset, opts.model, opts.seed, opts.tag)


@contextlib.contextmanager
def claim(
    runs: Sequence[RunOptions], precheck: Callable[[list[RunFiles]], None] | None = None
) -> Iterator[list[RunFiles]]:
    """Claim the runs' files for training: create each run's folder, hold its lock from the first check to its
    record, and refuse, before any compute, what would lose work (:func:`check_before_compute`). ``precheck``
    sees every run's files first (a stack names the seeds left to run rather than advise ``--force``)."""
    files = [run_files(o) for o in runs]
    with contextlib.ExitStack() as held:
        for o, f in zip(runs, files):
            _make_folder(o, f.folder)
            held.enter_context(_hold_lock(o, f.lock))
        if precheck is not None:
            precheck(files)
        for o, f in zip(runs, files):
            check_before_compute(o, f)
        yield files


def _make_folder(opts: RunOptions, folder: Path) -> None:
    """Create the run's folder under ``--out``, with an error that says what to do when that is impossible."""
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {opts.out} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise ConfigError(
            f"--out {opts.out}: cannot create {folder} because {blocker} is a file; remove it or choose another --out"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"--out {opts.out}: cannot create {folder} ({e.strerror or e}); choose a folder you can write to"
        ) from e


@contextlib.contextmanager
def _hold_lock(opts: RunOptions, path: Path) -> Iterator[None]:
    """Hold the run's ``seed<k>.lock`` so that a second process training the same record stops at once."""
    try:
        with exclusive_lock(path):
            yield
    except LockHeld as e:
        raise RunLocked(
            f"{e.holder} is already training this run (lock {path}); wait for it to finish, or "
            "choose another --seed, --tag or --out"
        ) from None
    except DiskFullError:
        raise  # its own message: the disk, not the folder, is the problem
    except OSError as e:
        if e.filename is None or Path(e.filename) != path:
            raise
        raise ConfigError(
            f"--out {opts.out}: cannot create the lock file {path} ({e.strerror or e}); choose a "
            "folder you can write to"
        ) from e


def check_before_compute(opts: RunOptions, files: RunFiles) -> None:
    """Refuse, before any compute, to overwrite a record without ``--force``, to ``--resume`` without a checkpoint,
    or to start afresh over an interrupted run's checkpoint without ``--resume`` or ``--force``; and ``--compile``
    where it cannot work."""
    check_overwrite(files.record, opts.force)
    if opts.compile and models.get_spec(opts.model_key).trainable:
        why = compile_problem(resolve_device(opts.device))
        if why is not None:
            raise ConfigError(f"{why}, or run without --compile")
    ckpt_path = files.checkpoint
    if opts.resume and not ckpt_path.is_file():
        if files.model_state.is_file():
            raise ConfigError(
                f"--resume: no checkpoint at {ckpt_path}: the run finished and kept only its model "
                "state; continuing a finished run needs its training run made with --keep-checkpoint "
                "(or start again with --force, without --resume)"
            )
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start afresh")
    if not opts.resume and not opts.force and ckpt_path.is_file():
        # Starting at epoch 1 would overwrite it at the end of the first epoch: a forgotten --resume after a
        # kill must not throw hours of training away.
        after = checkpoint_where(ckpt_path) or "(unreadable)"
        raise UsageError(
            f"this run has a checkpoint {after} at {ckpt_path} (an earlier run was interrupted); "
            "add --resume to continue from it, or --force to start again at epoch 1 and replace it"
        )


# -- data → build ------------------------------------------------------------------------------------------------
@dataclass
class RunTensors:
    """A run's data on its device; batches are index views of these tensors."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def label_classes(model: str, dataset: Any) -> int:
    """The number of classes the class-conditional ``model`` (a name or reference) conditions on in ``dataset``
    (a loaded :class:`Dataset` or a ``DatasetSpec``: its ``name`` and ``classes``), 0 for any other model; a
    conditional model on a dataset without labels is refused with what to do instead."""
    spec = models.get_spec(model)
    if not getattr(spec, "conditional", False):
        return 0
    classes = int(getattr(dataset, "classes", 0) or 0)
    if classes < 2:
        labelled = [n for n, s in DATASETS.items() if getattr(s, "classes", 0)]
        raise ConfigError(
            f"model {spec.name} is class-conditional (MAF Table 2): it needs a dataset with class "
            f"labels, and {dataset.name} has none; use a labelled dataset ({', '.join(labelled)}) or the "
            f"unconditional model {spec.name.removesuffix('-cond')}"
        )
    return classes


def to_device(data: Dataset, device: torch.device, labels: bool = False) -> RunTensors:
    """Data moved to the device once. With ``labels`` (a class-conditional model) each row is ``[x, onehot(y)]``,
    the one-hot label in the last K columns, so that batching, shuffling and stacking carry the label along."""

    def move(a: Any, split: str) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)
        if not labels:
            return t
        return torch.cat([t, torch.as_tensor(data.one_hot(split), dtype=torch.float32, device=device)], dim=1)

    return RunTensors(move(data.train, "train"), move(data.val, "val"), move(data.test, "test"))


def step_memory(flow: torch.nn.Module, batch_size: int, measure: bool = True) -> int:
    """Bytes one run needs on its device: parameters, gradient, Adam's two moments, the best state and the
    module's own copy (6 × parameter bytes), its buffers (MADE's masks are as large as its weights), and, with
    ``measure``, what autograd saves for one training step at ``batch_size``, measured on zeros (the random
    streams and the module's state are restored afterwards, so a run's trajectory does not depend on the
    measurement, even for a model that initialises itself from its first training batch)."""
    params = sum(p.numel() * p.element_size() for p in flow.parameters())
    buffers = sum(b.numel() * b.element_size() for b in flow.buffers())
    if not measure:
        return 6 * params + buffers
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    ref = next(iter(flow.parameters()), None)
    width = int(getattr(flow, "in_features", getattr(flow, "dim", 0)))
    x = torch.zeros(batch_size, width, device=ref.device if ref is not None else "cpu")
    was_training = flow.training
    state = {k: v.detach().clone() for k, v in flow.state_dict().items()}
    flow.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            flow.train_log_prob(x).sum()
    finally:
        flow.load_state_dict(state)
        flow.train(was_training)
    return 6 * params + buffers + saved


def check_memory(opts: RunOptions, flow: torch.nn.Module, device: torch.device, runs: int = 1) -> None:
    """Refuse, before training, a run (or a stack of ``runs``) that the device cannot hold: at D = 3,072
    (CIFAR-10) MAF (10) with 2 × 2,048 hidden units has ~100 M parameters, ~2.4 GB per run before activations."""
    if not getattr(flow, "trainable", True):
        return
    free = utils.available_memory(str(device))
    if device.type == "cuda":  # blocks torch's caching allocator holds from earlier runs of this process are free
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if 4 * runs * step_memory(flow, opts.batch_size, measure=False) < free:
        return  # far from the limit: no need to measure a step (the flows' activations are a small share)
    need = runs * step_memory(flow, opts.batch_size)
    if need > free:
        n = sum(p.numel() for p in flow.parameters())
        gib = 1 << 30
        stack = f"{runs} runs stacked" if runs > 1 else "one run"
        raise ConfigError(
            f"{opts.model} on {opts.dataset} has {n:,} parameters: training {stack} needs about {need / gib:.1f} GiB "
            f"on {device} (weights, gradients, Adam's two moments, the best state, masks and one step's "
            f"activations at batch {opts.batch_size}), but {free / gib:.1f} GiB is free. Use a smaller --hidden or "
            "fewer --layers, fewer seeds per stack (--max-stack in a sweep), or a device with more memory"
        )


def _target_count(target: int | str, dataset: str, dim: int) -> tuple[int, str]:
    """The parameter count to match: a number, or the count of model ``target`` as configured for ``dataset``."""
    if isinstance(target, int):
        return target, str(target)
    other = resolve_options({"dataset": dataset, "model": target})
    label = models.get_spec(target).name if ":" in target else target
    return count_params(models.build_model(target, dim, **other.hparams)), label


def build_from_options(
    opts: RunOptions, dim: int, classes: int = 0
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any] | None]:
    """Build the model (a class-conditional one for ``classes`` labels, see :func:`label_classes`); returns
    ``(flow, every hyperparameter resolved, match info or None)``."""
    spec = models.get_spec(opts.model_key)
    hparams = dict(opts.hparams)
    match = None
    label_kw = {"classes": classes} if getattr(spec, "conditional", False) else {}
    if opts.match_params is not None and label_kw:
        raise ConfigError(
            f"--match-params is not available for the class-conditional model {opts.model}; match "
            f"the unconditional {spec.name.removesuffix('-cond')} and set --hidden to its width"
        )
    if opts.match_params is not None:
        knob = opts.match_knob or spec.match_knob
        if knob is None:
            raise ConfigError(
                f"--match-params does not apply to model {opts.model!r}: it has no size knob "
                "(nothing to solve for); name one with --match-knob, or remove the option"
            )
        target, label = _target_count(opts.match_params, opts.dataset_key, dim)
        # Matching solves for the model's knob (the hidden width for the MAF family, as in Gresele et al.
        # 2020, H.3); a configured value of the knob yields to it, everything else stays fixed.
        result = match_params(opts.model_key, dim, target, knob=knob, **hparams)
        hparams = dict(result["hparams"])
        match = {
            "target": int(result["target"]),
            "achieved": int(result["achieved"]),
            "against": label,
            "knob": result["knob"],
        }
        if abs(result["relative_error"]) > MATCH_WARN:
            smallest = match_params(opts.model_key, dim, 1, knob=knob, **hparams)["achieved"]
            warnings.warn(
                f"--match-params {target}: the closest {opts.model} has {result['achieved']:,} parameters "
                f"({result['relative_error']:+.0%}); the smallest reachable at D = {dim} is {smallest:,}",
                stacklevel=2,
            )
    # Every hyperparameter is recorded, defaults included, so the record alone reproduces the model.
    hparams = spec.resolve(hparams)
    return models.build_model(opts.model_key, dim, **label_kw, **hparams), hparams, match


@dataclass
class Built:
    """One run's model as built and initialised on its device, with every hyperparameter resolved."""

    flow: torch.nn.Module
    hparams: dict[str, Any]
    match: dict[str, Any] | None


@dataclass
class Prepared:
    """What the runs of one claim share (the data, on its device) and each run's built model, in run order."""

    data: Dataset
    device: torch.device
    x: RunTensors
    built: list[Built]


def patience_within_decay(opts: RunOptions, n_train: int) -> str | None:
    """A warning when early stopping can end a cosine-decayed run before its step budget: the POWER study
    (docs/manual/power-study.md) saw single epochs fall by up to 3 nats while the rate was high, and the best
    states at the budget's end. None when patience covers the budget (or there is no decay to wait for)."""
    if opts.lr_schedule != "cosine" or opts.max_steps is None:
        return None
    per_eval = opts.eval_every or steps_per_epoch(n_train, opts.batch_size)
    unit = "evaluations" if opts.eval_every else "epochs"
    evals = math.ceil(opts.max_steps / per_eval)
    if opts.patience >= evals:
        return None
    return (
        f"--patience {opts.patience} {unit} is shorter than the cosine schedule's {evals} {unit} "
        f"(--max-steps {opts.max_steps:,}): early stopping may end the run while the rate is still high; "
        f"--patience {evals} lets the decay end it, the best validation state kept"
    )


def prepare(runs: Sequence[RunOptions], data: Dataset | None = None) -> Prepared:
    """Load the data (or take ``data``: in-memory data for toy problems and tests) and move it to the device
    once; then build each run's model seeded as the run, so that its initial weights depend on its seed only.
    The runs of a stack share one shape: the memory check of the first covers them all."""
    first = runs[0]
    data = data if data is not None else load_dataset(first.dataset_key, first.data_root)
    device = resolve_device(first.device)
    classes = label_classes(first.model_key, data)
    x = to_device(data, device, labels=classes > 0)
    for msg in dict.fromkeys(m for o in runs if (m := patience_within_decay(o, x.train.shape[0])) is not None):
        warnings.warn(msg, stacklevel=2)
    built = []
    for i, o in enumerate(runs):
        seed_everything(o.seed)
        flow, hparams, match = build_from_options(o, data.dim, classes)
        if i == 0:
            check_memory(o, flow, device, runs=len(runs))
        flow = flow.to(device)
        flow.initialize(x.train)
        built.append(Built(flow, hparams, match))
    return Prepared(data, device, x, built)


# -- train (one run; a stack has its own trainer) -------------------------------------------------------------------
def train_single(
    flow: torch.nn.Module,
    x: RunTensors,
    opts: RunOptions,
    ckpt_path: Path,
    callbacks: list[Callable[[EpochInfo], None]] | None,
    progress: bool,
) -> tuple[TrainResult, list[str], float]:
    """Gradient training of one run under the MAF protocol (or the closed-form fit).

    Returns the result, notes for the record, and the training time of earlier sessions (``--resume``).
    """
    notes: list[str] = []
    if not flow.trainable:
        # Closed-form models (the Gaussian baseline) are fitted completely by initialize().
        result = TrainResult(stop_reason="closed-form fit (not trainable)", ended="closed-form")
        result.best_val_ll, result.n_nonfinite_val = validation_ll(flow, x.train, x.val, opts.eval_batch_size)
        return result, notes, 0.0
    trainer = Trainer(
        flow,
        x.train,
        x.val,
        lr=opts.lr,
        weight_decay=opts.weight_decay,
        batch_size=opts.batch_size,
        patience=opts.patience,
        max_epochs=opts.max_epochs,
        seed=opts.seed,
        eval_batch_size=opts.eval_batch_size,
        checkpoint_path=ckpt_path,
        fingerprint=opts.to_dict(),
        callbacks=callbacks,
        progress=progress,
        compile=opts.compile,
        adam_epoch_step=opts.adam_epoch_step,
        checkpoint_every_s=float(opts.checkpoint_every_s),
        max_steps=opts.max_steps,
        lr_schedule=opts.lr_schedule,
        grad_clip=opts.grad_clip,
        eval_every=opts.eval_every,
    )
    prior = 0.0
    if opts.resume:
        trainer.load_checkpoint()
        prior = trainer.result.train_time_s
        notes.append(f"resumed from the checkpoint {trainer.result.resumed_from}")
    elif ckpt_path.exists():
        notes.append("an older checkpoint was replaced (run with --resume to continue one instead)")
    return trainer.fit(), notes, prior


# -- finish → record ---------------------------------------------------------------------------------------------
def make_record(
    opts: RunOptions,
    built: Built,
    result: TrainResult,
    evaluation: dict[str, Any],
    jac: dict[str, Any] | None,
    notes: list[str],
    device: torch.device,
    wall_time_s: float,
) -> RunRecord:
    """The run's :class:`~flowbench.results.RunRecord` from its options, model, training result and evaluation."""
    hparams = built.hparams
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
        params=count_params(built.flow),
        match_target=built.match,
        epochs=result.epochs,
        steps=result.steps,
        best_step=result.best_step,
        best_epoch=result.best_epoch,
        best_val_ll=result.best_val_ll,
        n_nonfinite_val=result.n_nonfinite_val,
        stop_reason=result.stop_reason,
        ended=result.ended or None,
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


def _test_sha256(data: Any, test_x: torch.Tensor) -> str:
    """The test set's fingerprint, hashed once per dataset object (every run of a stack shares it) from the
    host copy the loader made, not from the device tensor."""
    meta = getattr(data, "meta", None)
    if isinstance(meta, dict) and "test_sha256" in meta:
        return meta["test_sha256"]
    test = getattr(data, "test", None)
    digest = sha256_of_test_set(test if test is not None else test_x.cpu().numpy())
    if isinstance(meta, dict):
        meta["test_sha256"] = digest
    return digest


def finish_run(
    opts: RunOptions,
    files: RunFiles,
    prep: Prepared,
    built: Built,
    result: TrainResult,
    notes: list[str],
    t0: float,
    stack: dict[str, Any] | None = None,
) -> RunRecord:
    """After training, for a single run or each run of a stack: test evaluation, the record (wall time since
    ``t0``), the kept model state and per-point test LLs; the checkpoint goes unless kept."""
    flow, test_x = built.flow, prep.x.test
    if not opts.force and files.record.is_file():  # under the lock, only a replaceable record can be there
        notes.append(
            "replaced the non-finite record of an earlier run of this seed (a non-finite record needs no --force)"
        )
    evaluation, logp = evaluate_test_points(flow, prep.data, test_x, opts.eval_batch_size)
    jac, note = spectral_norm_summary(flow, test_x[:JACOBIAN_POINTS])
    if note:
        notes.append(note)
    n_bad = evaluation["n_nonfinite_test"]
    if n_bad and evaluation["test_ll"] == -math.inf:
        # A density below float range is a legitimate (worst) value, not a failure: said in a note and the table.
        notes.append(
            f"{n_bad} of {evaluation['n_test']} test points have log-density −inf, so the test LL is −inf; "
            f"over the others it is {evaluation['test_ll_finite']:.4f} ± {evaluation['test_ll_finite_2se']:.4f}"
        )
    elif result.status == "ok" and not math.isfinite(evaluation["test_ll"]):
        result.status, result.failure = "nonfinite", "test log-likelihood is not finite"
    record = make_record(opts, built, result, evaluation, jac, notes, prep.device, time.perf_counter() - t0)
    record.stack = stack
    save_model_state(files.model_state, flow)  # before the record, which names it
    record.model_state = files.model_state.name
    # The table's paired t-test (MAF paper's bolding rule) needs every test point's LL, not just their mean.
    record.test_points = write_per_point(files.per_point, logp, None, _test_sha256(prep.data, test_x))
    # A stop between the two would leave a finished run's checkpoint beside its record: held until both are done
    with interrupts.deferred():
        write_record(files.record, record, force=opts.force)
        if not opts.keep_checkpoint:  # the full checkpoint (optimizer, RNG) only serves --resume
            files.checkpoint.unlink(missing_ok=True)
    return record
