"""Stacked runs: R runs of one shape trained in one process as one batched computation (issue 11).

Each run stays a run of the MAF protocol (Papamakarios et al. 2017, section 4):
its own initialisation (the caller builds each flow after seeding with its seed), its own shuffling
generator, Adam state, early stopping with best-state restore, NaN guard, batch-norm statistics from the
whole training set, checkpoint and record. Only the training step is shared: each parameter of the R runs
is one (R, *shape) tensor, the objective of every run on its own minibatch is one batched pass
(:func:`flowbench.models.stacking.stacked_train_log_prob`), and Adam is torch's fused kernel over those
tensors (one call for the whole stack when the runs share learning rate, weight decay and step count, else
one per group of runs that do). A finished run leaves the stack at the end of the epoch; a run whose loss
turns non-finite is masked from then on (on a GPU the loss is read every ``SYNC_EVERY`` steps, so there it
may take up to that many more steps, on its own rows only, before it is masked).

Per-run checkpoints have the single-run format of :class:`~flowbench.training.trainer.Trainer` (torch Adam
state included), so a stacked run resumes stacked or alone, and vice versa. Validation runs per run on a
real module holding that run's parameters, exactly as a single run validates.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowbench.config import OPTIONS, RESUME_MAY_CHANGE, UNTAGGED, RunOptions, coerce_options, parse_seeds
from flowbench.errors import ConfigError, UsageError
from flowbench.models.base import Flow
from flowbench.models.stacking import split_buffers, stacked_objective, stacked_validation
from flowbench.results import replaceable
from flowbench.training import lifecycle
from flowbench.training.early_stopping import EarlyStopping
from flowbench.training.evaluate import (
    TRAIN_NLL_POINTS,
    finite_mean,
    train_subsample,
    training_nll,
    validation_ll,
)
from flowbench.training.trainer import (
    SYNC_EVERY,
    EpochInfo,
    TrainResult,
    _rng_state,
    _set_rng_state,
    loss_label,
    make_adam,
    read_checkpoint,
)
from flowbench.utils import atomic_torch_save, keep_freed_memory, resolve_device

__all__ = ["StackedTrainer", "RunSpec", "StackedEpochInfo", "parse_seeds", "run_stacked", "stack_key", "PER_RUN"]

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


@dataclass
class RunSpec:
    """One run of a stack: its model (already initialised from its seed) and its training options."""

    flow: Flow
    seed: int
    lr: float
    weight_decay: float = 1e-6
    patience: int = 30
    max_epochs: int | None = None
    checkpoint_path: str | Path | None = None
    fingerprint: dict[str, Any] | None = None
    #: How its epoch lines name it (default ``seed <k>``; a sweep's stack of several configurations adds the tag).
    label: str | None = None


@dataclass
class StackedEpochInfo(EpochInfo):
    """:class:`EpochInfo` plus which run of the stack it is (index and seed)."""

    run: int = 0
    seed: int = 0


def _fused_adam(params: list[Tensor], grads: list[Tensor], m: list[Tensor], v: list[Tensor], steps: list[Tensor],
                lr: float, wd: float) -> None:
    """torch's fused Adam kernel (the single-run trainer's optimiser) on these tensors; ``steps`` already
    counts this step, as torch's Adam increments before its kernel."""
    torch._fused_adam_(params, grads, m, v, [], steps, lr=lr, beta1=BETA1, beta2=BETA2, weight_decay=wd, eps=EPS,
                       amsgrad=False, maximize=False)


def _has_fused(like: Tensor) -> bool:
    """Whether torch's fused Adam kernel runs on this device and dtype (probed on scratch tensors)."""
    try:
        z = like.new_zeros(1)
        _fused_adam([z], [z.clone()], [z.clone()], [z.clone()], [z.new_ones((), dtype=torch.float32)], 1e-3, 0.0)
        return True
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return False


class _Run:
    """Everything one run owns besides its rows of the stacked tensors."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.flow = spec.flow
        self.stopper = EarlyStopping(spec.patience)
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.result = TrainResult()
        self.epoch = 0
        self.finished = False
        self.saved_epoch = -1  # the epoch of its last checkpoint
        self.path = Path(spec.checkpoint_path) if spec.checkpoint_path is not None else None
        self.fingerprint = spec.fingerprint or {}
        self.label = spec.label or f"seed {spec.seed}"


class StackedTrainer:
    """Trains R same-shaped flows together; :meth:`fit` returns one :class:`TrainResult` per run."""

    def __init__(self, runs: Sequence[RunSpec], train_x: Tensor, val_x: Tensor, *, batch_size: int = 100,
                 eval_batch_size: int = 2000, callbacks: list[Callable[[StackedEpochInfo], None]] | None = None,
                 progress: bool = True, checkpoint_every_s: float = 0.0):
        if not runs:
            raise ConfigError("a stack needs at least one run")
        if train_x.device.type == "cpu":
            keep_freed_memory()  # as the single-run trainer
        self.runs = [_Run(s) for s in runs]
        self.template = copy.deepcopy(runs[0].flow)
        names = [n for n, _ in self.template.named_parameters()]
        for r in self.runs[1:]:
            theirs = [(n, p.shape, p.dtype) for n, p in r.flow.named_parameters()]
            if theirs != [(n, p.shape, p.dtype) for n, p in self.template.named_parameters()]:
                raise ConfigError("runs of a stack must have the same model shape (only seeds, learning rates, "
                                  "weight decay, patience and epoch caps may differ)")
        self.names = names
        self.buffers, self.run_buffers = split_buffers([r.flow for r in self.runs])
        self.train_x, self.val_x = train_x, val_x
        # as the single-run trainer: each run's exact training NLL on these points, run by run
        self.nll_x = train_subsample(train_x, min(TRAIN_NLL_POINTS, val_x.shape[0]))
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self._batches_per_epoch = max(1, math.ceil(train_x.shape[0] / batch_size))
        self.callbacks = list(callbacks or [])
        self.progress = progress
        self.checkpoint_every_s = checkpoint_every_s  # as the single-run Trainer's: 0 = every epoch
        dev = train_x.device
        # parameter k of every run: one (R, *shape) tensor (row r = run r), with its gradient and Adam moments
        self.params = [torch.stack(ps).detach().clone() for ps in zip(*(r.flow.parameters() for r in self.runs))]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        # Adam's step count per run: on the device for the kernel, mirrored on the host (no sync to read it)
        self.steps = torch.zeros(len(self.runs), dtype=torch.float32, device=dev)
        self.nsteps = [0] * len(self.runs)
        self._fused = _has_fused(self.params[0])

    # -- stacked ⇄ per-run ---------------------------------------------------------------------------
    @torch.no_grad()
    def _sync_module(self, i: int) -> None:
        """Copy run i's rows into its module (before validation, checkpoints and at the end)."""
        for p, v in zip(self.runs[i].flow.parameters(), self.params):
            p.copy_(v[i])

    # -- checkpoints (the single-run format) ------------------------------------------------------------
    def _optimizer_state(self, i: int) -> dict[str, Any]:
        run = self.runs[i]
        template = make_adam(run.flow.parameters(), lr=run.spec.lr, weight_decay=run.spec.weight_decay).state_dict()
        step = self.nsteps[i]
        if step > 0:
            template["state"] = {k: {"step": torch.tensor(float(step), dtype=torch.float32),
                                     "exp_avg": self.exp_avg[k][i].clone(), "exp_avg_sq": self.exp_avg_sq[k][i].clone()}
                                 for k in range(len(self.params))}
        return template

    def _state_dict(self, i: int) -> dict[str, Any]:
        run = self.runs[i]
        self._sync_module(i)
        return {
            "format": 1, "epoch": run.epoch, "finished": run.finished, "model": run.flow.state_dict(),
            "optimizer": self._optimizer_state(i), "early_stopping": run.stopper.state_dict(),
            "rng": _rng_state(run.generator),
            "result": run.result.checkpoint_state(),
            "fingerprint": run.fingerprint,
        }

    def save_checkpoint(self, i: int) -> None:
        if self.runs[i].path is not None:
            atomic_torch_save(self.runs[i].path, self._state_dict(i))
        self.runs[i].saved_epoch = self.runs[i].epoch

    def load_checkpoint(self, i: int) -> None:
        """Restore run i from its checkpoint (written by a stack or by a single run)."""
        run = self.runs[i]
        state = read_checkpoint(run.path, run.fingerprint)  # a truncated or foreign file: a clear error
        run.flow.load_state_dict(state["model"])
        with torch.no_grad():
            for stacked, p in zip(self.params, run.flow.parameters()):
                stacked[i] = p
            opt = state["optimizer"]["state"]
            if opt:
                self.nsteps[i] = int(opt[0]["step"])
                self.steps[i] = float(self.nsteps[i])
                for k in range(len(self.params)):
                    self.exp_avg[k][i], self.exp_avg_sq[k][i] = opt[k]["exp_avg"], opt[k]["exp_avg_sq"]
        run.stopper.load_state_dict(state["early_stopping"])
        _set_rng_state(state["rng"], run.generator)
        run.result.load_checkpoint_state(state["result"])
        run.epoch, run.finished = int(state["epoch"]), bool(state["finished"])
        run.result.resumed_from_epoch = run.saved_epoch = run.epoch

    # -- the loop --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _adam(self, params: list[Tensor], m: list[Tensor], v: list[Tensor], steps: Tensor, nsteps: list[int],
              active: list[int], live: list[bool]) -> None:
        """torch's Adam (L2 added to the gradient, as the single-run trainer's) on the rows with ``live``.

        Host-side lists decide the grouping (no device sync): the whole stack in one fused call when every row
        is live and the rows share learning rate, weight decay and step count (the usual stack of seeds), else
        one call per (learning rate, weight decay) group over its live rows. Bit-identical to the single-run
        fused step. Without a fused kernel: the same algorithm with per-run tensors.
        """
        if any(p.grad is None for p in params):  # a parameter the loss does not use: torch's Adam skips it too
            kept = [i for i, p in enumerate(params) if p.grad is not None]
            params, m, v = ([ts[i] for i in kept] for ts in (params, m, v))
        grads = [p.grad for p in params]
        rows = [j for j, ok in enumerate(live) if ok]
        for j in rows:
            nsteps[j] += 1
        if len(rows) == len(live):
            steps.add_(1)
        else:
            steps.index_add_(0, torch.tensor(rows, device=steps.device), steps.new_ones(len(rows)))
        specs = [self.runs[i].spec for i in active]
        groups: dict[tuple[float, float], list[int]] = {}
        for j in rows:
            groups.setdefault((specs[j].lr, specs[j].weight_decay), []).append(j)
        for (lr, wd), js in groups.items():
            if not self._fused:
                self._adam_reference(params, grads, m, v, steps, js, lr, wd)
            elif len(js) == len(live) and len({nsteps[j] for j in js}) == 1:
                _fused_adam(params, grads, m, v, [steps[0]] * len(params), lr, wd)
            else:
                flat = [[x[j] for j in js for x in ts] for ts in (params, grads, m, v)]  # run-major rows
                _fused_adam(*flat, [steps[j] for j in js for _ in params], lr, wd)

    @staticmethod
    def _adam_reference(params: list[Tensor], grads: list[Tensor], m: list[Tensor], v: list[Tensor], steps: Tensor,
                        js: list[int], lr: float, wd: float) -> None:
        """torch's Adam algorithm (``foreach=False``) on rows ``js`` where no fused kernel exists."""
        idx = torch.tensor(js, device=steps.device)
        n = steps[idx].to(torch.float64)
        for p, g, ma, va in zip(params, grads, m, v):
            shape = (-1,) + (1,) * (p.dim() - 1)
            bc1 = (1 - BETA1 ** n).to(p.dtype).view(shape)
            bc2_sqrt = (1 - BETA2 ** n).sqrt().to(p.dtype).view(shape)
            gj = g[idx].add(p[idx], alpha=wd)
            mj = ma[idx].lerp_(gj, 1 - BETA1)
            vj = va[idx].mul_(BETA2).addcmul_(gj, gj, value=1 - BETA2)
            ma[idx], va[idx] = mj, vj
            p[idx] = p[idx] - (lr / bc1) * mj / (vj.sqrt() / bc2_sqrt + EPS)

    def _train_epoch(self, active: list[int]) -> tuple[list[float], list[str | None]]:
        """One pass of every active run over its own shuffle; (mean train loss, failure or None) per run."""
        dev = self.train_x.device
        whole = len(active) == len(self.runs)
        idx = torch.tensor(active, device=dev)
        # the whole stack trains in place; a part of it on copies of its rows, written back at the end
        params = [p if whole else p[idx].clone() for p in self.params]
        m = [t if whole else t[idx].clone() for t in self.exp_avg]
        v = [t if whole else t[idx].clone() for t in self.exp_avg_sq]
        steps = self.steps if whole else self.steps[idx].clone()
        own = self.run_buffers if whole else {k: b[idx] for k, b in self.run_buffers.items()}
        objective = stacked_objective(self.template, self.buffers, run_buffers=own)
        nsteps = [self.nsteps[i] for i in active]
        for p in params:
            p.requires_grad_(True)
        n = self.train_x.shape[0]
        perms = torch.stack([torch.randperm(n, generator=self.runs[i].generator) for i in active]).to(dev)
        for i in active:
            self.runs[i].flow.train()
        self.template.train()
        ra = len(active)
        live = [True] * ra  # host-side: which runs still train (changed only where the loss is read)
        live_mask = torch.ones(ra, dtype=torch.bool, device=dev)
        totals = torch.zeros(ra, dtype=torch.float64, device=dev)
        count = 0
        failures: list[str | None] = [None] * ra
        sync_every = 1 if dev.type == "cpu" else SYNC_EVERY
        bar = tqdm(range(0, n, self.batch_size), desc=f"stack of {ra}, epoch {self.runs[active[0]].epoch + 1}",
                   leave=False, disable=None if self.progress else True, file=sys.stderr, mininterval=0.5)
        for step, i in enumerate(bar, 1):
            batch = self.train_x[perms[:, i: i + self.batch_size]]  # (R, b, D): run r's own minibatch
            losses = -objective(dict(zip(self.names, params)), batch).mean(-1)
            det = losses.detach()
            totals += torch.where(live_mask, det * batch.shape[1], torch.zeros_like(det)).to(torch.float64)
            count += batch.shape[1]
            if step % sync_every == 0 or i + self.batch_size >= n:
                bad = torch.nonzero(live_mask & ~torch.isfinite(totals)).flatten().tolist()
                for j in bad:
                    failures[j] = (f"non-finite training loss ({float(det[j])}) at epoch "
                                   f"{self.runs[active[j]].epoch + 1}, batch {step} "
                                   "(lower --lr, or check the data for outliers)")
                    live[j] = False
                if bad:
                    live_mask = torch.tensor(live, device=dev)
                    if not any(live):
                        break
            for p in params:
                p.grad = None
            torch.where(live_mask, losses, torch.zeros_like(losses)).sum().backward()
            self._adam(params, m, v, steps, nsteps, active, live)
        bar.close()
        with torch.no_grad():
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            if not whole:
                for stacked, mine in zip((*self.params, *self.exp_avg, *self.exp_avg_sq), (*params, *m, *v)):
                    stacked[idx] = mine
                self.steps[idx] = steps
        for i, k in zip(active, nsteps):
            self.nsteps[i] = k
        means = (totals / max(count, 1)).tolist()
        return [math.nan if f else x for x, f in zip(means, failures)], failures

    def _validate(self, i: int) -> tuple[float, int]:
        """As the single-run trainer: (LL over the finite validation points, count of −inf points)."""
        self._sync_module(i)
        return validation_ll(self.runs[i].flow, self.train_x, self.val_x, self.eval_batch_size)

    def _validate_all(self, rows: list[int]) -> dict[int, tuple[float, int]]:
        """:meth:`_validate` of runs ``rows``: all at once where the family allows it
        (:func:`~flowbench.models.stacking.stacked_validation`), each module left as its own validation leaves it
        (its parameters, evaluation mode, its batch-norm statistics); else run by run."""
        if len(rows) > 1 and not self.run_buffers:
            idx = torch.tensor(rows, device=self.train_x.device)
            params = {n: p[idx] for n, p in zip(self.names, self.params)}
            got = stacked_validation(self.template, params, self.buffers, self.train_x, self.val_x,
                                     self.eval_batch_size)
            if got is not None:
                logp, stats = got
                out = {}
                for r, i in enumerate(rows):
                    self._sync_module(i)
                    flow = self.runs[i].flow.eval()
                    mine = dict(flow.named_buffers())
                    with torch.no_grad():
                        for name, v in stats.items():
                            mine[name].copy_(v[r])
                    out[i] = finite_mean(logp[r].double().cpu().numpy())
                return out
        return {i: self._validate(i) for i in rows}

    def fit(self) -> list[TrainResult]:
        start = saved_at = time.perf_counter()
        base = [r.result.train_time_s for r in self.runs]
        while True:
            active = []
            for i, run in enumerate(self.runs):
                if run.finished:
                    continue
                if run.spec.max_epochs is not None and run.epoch >= run.spec.max_epochs:
                    if run.saved_epoch != run.epoch:  # the end: its last epoch goes to disk
                        self.save_checkpoint(i)
                    run.result.stop_reason = f"reached max_epochs={run.spec.max_epochs}"
                    run.finished = True
                    continue
                active.append(i)
            if not active:
                break
            t_epoch = time.perf_counter()
            losses, failures = self._train_epoch(active)
            t_train = time.perf_counter() - t_epoch  # shared by the stack
            due = self.checkpoint_every_s <= 0 or time.perf_counter() - saved_at >= self.checkpoint_every_s
            if due:
                saved_at = time.perf_counter()
            infos = []
            t_val = time.perf_counter()
            vals = self._validate_all([i for i, f in zip(active, failures) if f is None])
            # each module as its validation left it (parameters, batch norms, relgrad's cached log|det W|)
            nlls = {i: training_nll(self.runs[i].flow, self.nll_x, self.eval_batch_size)
                    for i, (ll, _) in vals.items() if math.isfinite(ll)}
            t_val = time.perf_counter() - t_val  # shared too
            for j, i in enumerate(active):
                run, res = self.runs[i], self.runs[i].result
                epoch = run.epoch + 1
                failure, val_ll, n_bad = failures[j], math.nan, 0
                if failure is None:
                    val_ll, n_bad = vals[i]
                    if not math.isfinite(val_ll):
                        failure = f"non-finite validation log-likelihood ({val_ll}) at epoch {epoch}"
                run.epoch = epoch
                res.train_time_s = base[i] + time.perf_counter() - start
                if failure is not None:
                    res.status, res.failure, res.stop_reason = "nonfinite", failure, "non-finite loss"
                    run.finished = True
                    self._log(f"{run.label} epoch {epoch}: {failure}; stopping and keeping the best model")
                    self.save_checkpoint(i)
                    continue
                run.stopper.step(val_ll, epoch, run.flow)
                nll, n_bad_train = nlls[i]
                res.history.append({"epoch": epoch, "step": epoch * self._batches_per_epoch, "train_loss": losses[j],
                                    "train_nll": nll, "val_ll": val_ll, "n_nonfinite_val": n_bad,
                                    "n_nonfinite_train": n_bad_train, "seconds": t_train + t_val})
                st = run.stopper
                omits = getattr(run.flow, "loss_omits", None)
                step = epoch * self._batches_per_epoch
                infos.append(StackedEpochInfo(epoch, losses[j], val_ll, st.best_value, st.best_epoch,
                                              st.patience_left, step, nll, omits, run=i, seed=run.spec.seed))
                self._log(f"{run.label} epoch {epoch:4d}  {loss_label(omits)} {losses[j]:10.4f}  "
                          f"train NLL {nll:10.4f}  val LL {val_ll:10.4f}  best {st.best_value:10.4f} "
                          f"(epoch {st.best_epoch})  patience left {st.patience_left}")
                if st.should_stop:
                    res.stop_reason = f"no improvement for {st.patience} epochs"
                    run.finished = True
                if due or run.finished:
                    self.save_checkpoint(i)
            for info in infos:  # after every run's checkpoint: a callback that raises simulates a kill
                for cb in self.callbacks:
                    cb(info)
        out = []
        for i, run in enumerate(self.runs):
            res = run.result
            res.epochs = run.epoch
            # epoch-based only: every finished epoch took a full pass of batches (as the single-run trainer counts)
            res.steps = res.history[-1]["step"] if res.history else 0
            self._sync_module(i)
            if run.stopper.restore(run.flow):
                run.flow.prepare_for_eval(self.train_x)
            res.best_epoch = run.stopper.best_epoch
            res.best_step = None if res.best_epoch is None else res.best_epoch * self._batches_per_epoch
            res.best_val_ll = run.stopper.best_value if run.stopper.best_epoch is not None else math.nan
            res.n_nonfinite_val = next((int(h.get("n_nonfinite_val", 0)) for h in res.history
                                        if h["epoch"] == res.best_epoch), 0)
            run.flow.eval()
            out.append(res)
        return out

    def _log(self, line: str) -> None:
        if self.progress:
            tqdm.write(line, file=sys.stderr)


#: Options in which the runs of one stack may differ: they change no tensor shape (per-run Adam, stopper).
PER_RUN = ("seed", "lr", "weight_decay", "patience", "max_epochs")
#: Options the stacked trainer does not implement (declared ``stackable=False`` in :data:`flowbench.config.OPTIONS`),
#: with the value it behaves as, their default; a run with another value is not stacked by a sweep and refused
#: by ``run --seeds`` (a trainer option added later is declared so until :class:`StackedTrainer` implements it).
UNSTACKABLE: dict[str, Any] = {o.name: o.default for o in OPTIONS.values() if not o.stackable}


def unstackable(opts: RunOptions) -> str | None:
    """Why a run with options ``opts`` cannot train in a stack, or None."""
    from flowbench.models import get_spec

    spec = get_spec(opts.model_key)
    if not spec.trainable:
        return f"{opts.model} is fitted in closed form"
    why = spec.unstackable(spec.resolve(opts.hparams)) if spec.unstackable is not None else None
    if why is not None:
        return why
    for name, value in UNSTACKABLE.items():
        if getattr(opts, name, value) != value:
            return f"the stacked trainer does not implement --{name.replace('_', '-')}"
    return _probe(opts.model_key, opts.dataset_key, tuple(sorted(spec.resolve(opts.hparams).items(), key=str)))


@functools.lru_cache(maxsize=64)
def _probe(model: str, dataset: str, hparams: tuple) -> str | None:
    """A model from outside the zoo is tried in a stack once per process (:func:`stacking.stack_probe`)."""
    from flowbench.data import get_info
    from flowbench.models import build_model, model_origin
    from flowbench.models.stacking import stack_probe

    if model_origin(model).kind == "built-in":  # the zoo's families are tested stacked (tests/test_stacked.py)
        return None
    try:
        dim = get_info(dataset).dim
    except ConfigError:
        return None  # reported when the data are loaded
    why = stack_probe(lambda: build_model(model, dim, **dict(hparams)), dim)
    return None if why is None else f"model {model!r}: {why}"


def stack_key(opts: RunOptions) -> tuple:
    """Runs with equal keys may share a stack: everything but :data:`PER_RUN` and the options that do not
    change a trajectory (where results go, threads, progress output) is equal."""
    skip = set(PER_RUN) | set(RESUME_MAY_CHANGE) | set(UNTAGGED) | {"seeds", "tag"}
    flat = opts.to_dict()
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if k not in skip))


def run_stacked(options: Sequence[Any], data: Any = None, *, callbacks: list[Callable] | None = None,
                progress: bool = True) -> list:
    """Train, evaluate and record R runs as one stack; returns their records (each also written).

    Each record has the format of a single run's (:func:`flowbench.training.lifecycle.finish_run`)
    plus ``stack = {"seeds": [...], "size": R, "id": <the same for every run of this stack>}``. ``options`` are
    :class:`RunOptions` or mappings.
    """
    t0 = time.perf_counter()
    runs = [coerce_options(o) for o in options]
    if data is not None:
        runs = [o.replace(dataset=data.name) for o in runs]
    if not runs:
        raise ConfigError("a stack needs at least one run")
    with contextlib.ExitStack() as held:  # every run's lock, from the first check to its record
        for o in runs:
            lifecycle.prepare_out(o, lifecycle.run_paths(o)[0].parent)
            held.enter_context(lifecycle.run_lock(o))
        return _run_stacked(runs, data, callbacks, progress, t0)


def _seed_list(runs: Sequence[RunOptions]) -> str:
    return ",".join(str(o.seed) for o in runs)


def _seeds_have(runs: Sequence[RunOptions]) -> str:
    """``seed 1 has`` / ``seeds 0,2 have``."""
    return f"seed {runs[0].seed} has" if len(runs) == 1 else f"seeds {_seed_list(runs)} have"


def _check_seeds_left(runs: list[RunOptions], paths: list[tuple[Path, Path]]) -> None:
    """Some seeds of the stack already recorded (one resumed alone, say), or some with a checkpoint to resume
    and some without: name the seeds each command should take, rather than advise ``--force``, which would
    throw the recorded or checkpointed work away."""
    done = [rec.is_file() and not o.force and not replaceable(rec) for o, (rec, _) in zip(runs, paths)]
    recorded = [o for o, d in zip(runs, done) if d]
    left = [o for o, d in zip(runs, done) if not d]
    if recorded and left:
        resume = " --resume" if any(o.resume for o in left) else ""
        raise UsageError(
            f"{_seeds_have(recorded)} a record in {paths[0][0].parent} already; the seeds left are "
            f"{_seed_list(left)}: run the same command with --seeds {_seed_list(left)}{resume} (--force would "
            "train every seed again and replace those records)")
    fresh = [o for o, (_, ckpt) in zip(runs, paths) if o.resume and not ckpt.is_file()]
    if fresh and len(fresh) < len(runs):
        kept = [o for o in runs if o not in fresh]
        raise UsageError(
            f"--resume: {_seeds_have(fresh)} no checkpoint in {paths[0][1].parent} to resume from, "
            f"{_seeds_have(kept)} one: run --seeds {_seed_list(kept)} --resume, and --seeds {_seed_list(fresh)} "
            "without --resume")


def _run_stacked(runs: list, data: Any, callbacks: list[Callable] | None, progress: bool, t0: float) -> list:
    for o in runs:
        why = unstackable(o)
        if why is not None and "closed form" not in why:
            raise ConfigError(f"--seeds: {why}; run the seeds one by one instead")
    keys = {stack_key(o) for o in runs}
    if len(keys) > 1 or len({o.batch_size for o in runs}) > 1:
        raise ConfigError("runs of one stack may differ only in " + ", ".join(PER_RUN))
    paths = [lifecycle.run_paths(o) for o in runs]
    if len({p[0] for p in paths}) != len(paths):
        raise ConfigError("two runs of the stack would write the same record (same seed and tag)")
    _check_seeds_left(runs, paths)
    for o, (rec, ckpt) in zip(runs, paths):
        lifecycle.check_before_compute(o, rec, ckpt)
    replacing = [lifecycle.replacing_note(o, rec) for o, (rec, _) in zip(runs, paths)]
    first = runs[0]
    data = lifecycle.load_data(first, data)
    device = resolve_device(first.device)
    x = lifecycle.to_device(data, device)
    built = []
    for o in runs:
        lifecycle.seed_everything(o.seed)
        flow, hparams, match = lifecycle.build_from_options(o, data.dim)
        flow = flow.to(device)
        flow.initialize(x.train)
        built.append((flow, hparams, match))
    # The id tells this stack's records from another stack's of the same seeds (the report counts a stack's
    # wall time, which each of its records carries, once).
    stack = {"seeds": [o.seed for o in runs], "size": len(runs), "id": uuid.uuid4().hex[:12]}
    notes: list[list[str]] = [[] for _ in runs]
    prior = [0.0] * len(runs)
    if not built[0][0].trainable:
        results = []
        for i, (o, (flow, _, _)) in enumerate(zip(runs, built)):
            res, notes[i], prior[i] = lifecycle.train_single(flow, x, o, paths[i][1], None, progress)
            results.append(res)
    else:
        # A sweep stacks configurations (tags) too; their epoch lines must tell them apart, not only the seeds.
        tagged = len({o.tag for o in runs}) > 1
        specs = [RunSpec(flow, o.seed, o.lr, o.weight_decay, o.patience, o.max_epochs, ckpt, o.to_dict(),
                         f"[{o.tag or 'no tag'}] seed {o.seed}" if tagged else None)
                 for o, (flow, _, _), (_, ckpt) in zip(runs, built, paths)]
        trainer = StackedTrainer(specs, x.train, x.val, batch_size=first.batch_size,
                                 eval_batch_size=first.eval_batch_size, callbacks=callbacks, progress=progress,
                                 checkpoint_every_s=float(first.checkpoint_every_s))
        for i, (o, (_, ckpt)) in enumerate(zip(runs, paths)):
            if o.resume:
                trainer.load_checkpoint(i)
                prior[i] = trainer.runs[i].result.train_time_s
                notes[i].append(f"resumed from the checkpoint after epoch {trainer.runs[i].result.resumed_from_epoch}")
            elif ckpt.exists():
                notes[i].append("an older checkpoint was replaced (run with --resume to continue one instead)")
        results = trainer.fit()
    records = []
    for i, (o, (flow, hparams, match), res) in enumerate(zip(runs, built, results)):
        notes[i].append(f"trained in a stack of {len(runs)} (seeds {stack['seeds']})")
        notes[i] += [replacing[i]] if replacing[i] else []
        # Wall time: the whole stack's (all its runs trained together), plus this run's earlier sessions.
        records.append(lifecycle.finish_run(o, data, x.test, flow, hparams, match, res, notes[i], device, t0 - prior[i],
                                     paths[i][0], paths[i][1], stack))
    return records


#: A default stack never exceeds this many runs (beyond it the batched step gains little on a CPU, and one
#: failure or kill costs that many runs' progress).
MAX_STACK = 32
#: Share of the memory available when the sweep starts that all stacks in flight together may use.
MEMORY_SHARE = 0.25


def run_memory(opts: RunOptions) -> int:
    """Bytes one more run adds to a stack of runs like ``opts``, measured rather than guessed.

    The model is built (not trained) for the dataset's dimension and one training step's objective is
    evaluated on a batch of zeros, counting the bytes autograd saves for the backward pass (the activations,
    which dominate). Per run the stack also holds parameters, gradient, two Adam moments, its own module
    and the best state: 6 × parameter bytes. Data are shared by the stack and not counted.
    """
    from flowbench.data import get_info

    info = get_info(opts.dataset_key)
    flow, _, _ = lifecycle.build_from_options(opts, info.dim)
    params = sum(p.numel() * p.element_size() for p in flow.parameters())
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    flow.train()
    x = torch.zeros(opts.batch_size, info.dim)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flow.train_log_prob(x).sum()
    return 6 * params + saved


def stack_cap(opts: RunOptions, budget: int | None = None) -> int:
    """The largest stack of runs like ``opts`` within ``budget`` bytes (default :data:`MEMORY_SHARE` of the
    memory available on the run's device), at most :data:`MAX_STACK` and at least 1:
    ``min(MAX_STACK, budget // run_memory(opts))``."""
    if budget is None:
        from flowbench.utils import available_memory

        budget = int(MEMORY_SHARE * available_memory(opts.device if opts.device != "auto" else
                                                     ("cuda" if torch.cuda.is_available() else "cpu")))
    return max(1, min(MAX_STACK, budget // max(1, run_memory(opts))))
