"""Stacked runs: R runs of one shape trained in one process as one batched computation (issue 11).

Each run stays a run of the MAF protocol (Papamakarios et al. 2017, section 4):
its own initialisation (the caller builds each flow after seeding with its seed), its own shuffling
generator, Adam state, early stopping with best-state restore, NaN guard, batch-norm statistics from the
whole training set, checkpoint and record. Only the training step is shared: each parameter of the R runs
is one (R, *shape) tensor, the objective of every run on its own minibatch is one batched pass
(:func:`flowbench.models.stacking.stacked_train_log_prob`), and Adam is torch's fused kernel over those
tensors (one call for the whole stack when the runs share learning rate, weight decay and step count, else
one per group of runs that do). A finished run leaves the stack at its evaluation; a run whose loss
turns non-finite is masked from then on (on a GPU the loss is read every ``SYNC_EVERY`` steps, so there it
may take up to that many more steps, on its own rows only, before it is masked).

Everything around the steps (evaluation schedule, budgets, early stopping, history, epoch lines, checkpoint
cadence, callbacks, best-state restore) is the single run's loop, :class:`~flowbench.training.loop.RunLoop`
(issue 23), so a stack also trains in step mode (``max_steps``, ``eval_every``, the cosine ``lr_schedule``,
``grad_clip``: the NSF protocol), each row with its own learning rate at its own step and its gradient clipped
on its own. (``run --seeds`` and sweeps stack only options that :data:`flowbench.config.OPTIONS` declares
stackable.)

Per-run checkpoints have the single-run format of :class:`~flowbench.training.trainer.Trainer` (torch Adam
state included; format 2, mid-epoch positions too), so a stacked run resumes stacked or alone, and vice versa;
format-1 checkpoints (epoch ends only, written before the shared loop) still resume. Validation runs per run
on a real module holding that run's parameters, exactly as a single run validates.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from flowbench import interrupts, utils
from flowbench.config import OPTIONS, RESUME_MAY_CHANGE, UNTAGGED, RunOptions, coerce_options, parse_seeds
from flowbench.data import get_info
from flowbench.errors import ConfigError, UsageError
from flowbench.models import build_model, get_spec, model_origin
from flowbench.models.base import Flow
from flowbench.models.stacking import split_buffers, stack_probe, stacked_objective, stacked_validation
from flowbench.results import RunFiles, replaceable
from flowbench.training import lifecycle
from flowbench.training.evaluate import (
    TRAIN_NLL_POINTS,
    finite_mean,
    train_subsample,
    training_nll,
    validation_ll,
)
from flowbench.training.loop import (
    EarlyStopping,
    EpochInfo,
    RunLoop,
    RunState,
    TrainResult,
    check_schedule_options,
    checkpoint_fits,
    scheduled_lr,
)
from flowbench.training.trainer import (
    SYNC_EVERY,
    _rng_state,
    _set_rng_state,
    compiled,
    make_adam,
    read_checkpoint,
)
from flowbench.utils import atomic_torch_save, keep_freed_memory

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


def _fused_adam(
    params: list[Tensor],
    grads: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    steps: list[Tensor],
    lr: float,
    wd: float,
) -> None:
    """torch's fused Adam kernel (the single-run trainer's optimiser) on these tensors; ``steps`` already
    counts this step, as torch's Adam increments before its kernel."""
    torch._fused_adam_(
        params,
        grads,
        m,
        v,
        [],
        steps,
        lr=lr,
        beta1=BETA1,
        beta2=BETA2,
        weight_decay=wd,
        eps=EPS,
        amsgrad=False,
        maximize=False,
    )


def _has_fused(like: Tensor) -> bool:
    """Whether torch's fused Adam kernel runs on this device and dtype (probed on scratch tensors)."""
    try:
        z = like.new_zeros(1)
        _fused_adam([z], [z.clone()], [z.clone()], [z.clone()], [z.new_ones((), dtype=torch.float32)], 1e-3, 0.0)
        return True
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return False


class _Run:
    """Everything one run owns besides its rows of the stacked tensors; ``state`` is where the loop has it."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.flow = spec.flow
        self.stopper = EarlyStopping(spec.patience)
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.path = Path(spec.checkpoint_path) if spec.checkpoint_path is not None else None
        self.fingerprint = spec.fingerprint or {}
        self.label = spec.label or f"seed {spec.seed}"
        self.state = RunState(self.flow, self.stopper, self.generator, spec.max_epochs, prefix=self.label + " ")
        self.result = self.state.result

    @property
    def epoch(self) -> int:
        """Epochs completed as of its last evaluation (during a validation: before the period validated)."""
        return self.state.evaluated_epoch


def _clip_rows(params: list[Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` of every row (run) of the stacked gradients on its own."""
    grads = [p.grad for p in params if p.grad is not None]
    rows = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(rows, -1), dim=1) for g in grads])  # (tensors, rows)
    coef = torch.clamp(max_norm / (torch.linalg.vector_norm(norms, dim=0) + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view((-1,) + (1,) * (g.dim() - 1)))


class _Period:
    """The active runs' rows for one training period: the stack's own tensors when every run is active, else
    copies written back by :meth:`close`; their running losses (since each run's last evaluation) and failures."""

    def __init__(self, st: StackedTrainer, active: list[int]):
        dev = st.train_x.device
        self.st, self.active, self.whole = st, active, len(active) == len(st.runs)
        self.idx = torch.tensor(active, device=dev)

        def pick(t: Tensor) -> Tensor:
            return t if self.whole else t[self.idx].clone()

        self.params = [pick(p) for p in st.params]
        self.m, self.v = [pick(t) for t in st.exp_avg], [pick(t) for t in st.exp_avg_sq]
        self.steps = pick(st.steps)
        self.objective = st._objective(tuple(active))
        self.nsteps = [st.nsteps[i] for i in active]
        for p in self.params:
            p.requires_grad_(True)
        self.live = [True] * len(active)  # host-side: which runs still train (changed only where the loss is read)
        self.live_mask = torch.ones(len(active), dtype=torch.bool, device=dev)
        self.totals = st._loss_sum[self.idx].clone()
        self.counts = [st._loss_count[i] for i in active]
        self.failures: list[str | None] = [None] * len(active)

    def losses(self, batch: Tensor) -> Tensor:
        """Every active run's loss on its own minibatch (``batch``: (R, b, D)), added to its running total."""
        losses = -self.objective(dict(zip(self.st.names, self.params)), batch).mean(-1)
        det = losses.detach()
        self.totals += torch.where(self.live_mask, det * batch.shape[1], torch.zeros_like(det)).to(torch.float64)
        self.counts = [c + batch.shape[1] for c in self.counts]
        return losses

    def check(self, states: list[RunState], det: Tensor) -> bool:
        """Mask the runs whose running loss turned non-finite (a host sync); whether any run still trains."""
        bad = torch.nonzero(self.live_mask & ~torch.isfinite(self.totals)).flatten().tolist()
        for r in bad:
            s = states[r]
            self.failures[r] = (
                f"non-finite training loss ({float(det[r])}) at epoch {s.epoch + 1}, batch "
                f"{s.pos + 1} (step {s.step + 1}) (lower --lr, or check the data for outliers)"
            )
            self.live[r] = False
        if bad:
            self.live_mask = torch.tensor(self.live, device=self.live_mask.device)
        return any(self.live)

    def step(self, losses: Tensor, grad_clip: float | None) -> None:
        """One optimiser step of the live runs: backward of their summed losses, clipping, Adam."""
        for p in self.params:
            p.grad = None
        torch.where(self.live_mask, losses, torch.zeros_like(losses)).sum().backward()
        if grad_clip is not None:
            _clip_rows(self.params, grad_clip)
        self.st._adam(self.params, self.m, self.v, self.steps, self.nsteps, self.active, self.live)

    def close(self) -> tuple[list[float], list[str | None]]:
        """Write the rows back; (running mean loss, failure or None) per active run."""
        st = self.st
        with torch.no_grad():
            for p in self.params:
                p.requires_grad_(False)
                p.grad = None
            if not self.whole:
                for stacked, mine in zip((*st.params, *st.exp_avg, *st.exp_avg_sq), (*self.params, *self.m, *self.v)):
                    stacked[self.idx] = mine
                st.steps[self.idx] = self.steps
            st._loss_sum[self.idx] = self.totals
        for i, k, c in zip(self.active, self.nsteps, self.counts):
            st.nsteps[i], st._loss_count[i] = k, c
        means = [t / max(c, 1) for t, c in zip(self.totals.tolist(), self.counts)]
        return [math.nan if f else x for x, f in zip(means, self.failures)], self.failures


class StackedTrainer(RunLoop):
    """Trains R same-shaped flows together; :meth:`fit` returns one :class:`TrainResult` per run.

    The loop is :class:`~flowbench.training.loop.RunLoop`'s, the single-run trainer's; this class is its stacked
    stepper. The step options (``max_steps``, ``lr_schedule``, ``grad_clip``, ``eval_every``) are the stack's,
    shared by its runs.
    """

    def __init__(
        self,
        runs: Sequence[RunSpec],
        train_x: Tensor,
        val_x: Tensor,
        *,
        batch_size: int = 100,
        eval_batch_size: int = 2000,
        callbacks: list[Callable[[StackedEpochInfo], None]] | None = None,
        progress: bool = True,
        checkpoint_every_s: float = 0.0,
        max_steps: int | None = None,
        lr_schedule: str = "constant",
        grad_clip: float | None = None,
        eval_every: int | None = None,
        compile: bool = False,
    ):
        if not runs:
            raise ConfigError("a stack needs at least one run")
        check_schedule_options(max_steps, lr_schedule, grad_clip, eval_every)
        if train_x.device.type == "cpu":
            keep_freed_memory()  # as the single-run trainer
        self.runs = [_Run(s) for s in runs]
        self._states = [r.state for r in self.runs]
        self.template = copy.deepcopy(runs[0].flow)
        names = [n for n, _ in self.template.named_parameters()]
        for r in self.runs[1:]:
            theirs = [(n, p.shape, p.dtype) for n, p in r.flow.named_parameters()]
            if theirs != [(n, p.shape, p.dtype) for n, p in self.template.named_parameters()]:
                raise ConfigError(
                    "runs of a stack must have the same model shape (only seeds, learning rates, "
                    "weight decay, patience and epoch caps may differ)"
                )
        self.names = names
        self.buffers, self.run_buffers = split_buffers([r.flow for r in self.runs])
        self.train_x, self.val_x = train_x, val_x
        # as the single-run trainer: each run's exact training NLL on these points, run by run
        self.nll_x = train_subsample(train_x, min(TRAIN_NLL_POINTS, val_x.shape[0]))
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_steps, self.lr_schedule, self.grad_clip, self.eval_every = (
            max_steps,
            lr_schedule,
            grad_clip,
            eval_every,
        )
        self.callbacks = list(callbacks or [])
        self.progress = progress
        self.checkpoint_every_s = checkpoint_every_s  # as the single-run Trainer's: 0 = every evaluation
        self.compile = compile
        self._objectives: dict[tuple[int, ...], tuple[Callable, dict[str, Tensor]]] = {}
        self._init_tensors(train_x.device)
        # torch's first optimiser imports torch._dynamo (about 2 s): here, as the single-run trainer's Adam does,
        # not in the first checkpoint, which a stop asked for by Ctrl-C or SIGTERM waits for
        self._optimizer_state(0)

    def _init_tensors(self, dev: torch.device) -> None:
        # parameter k of every run: one (R, *shape) tensor (row r = run r), with its gradient and Adam moments
        self.params = [torch.stack(ps).detach().clone() for ps in zip(*(r.flow.parameters() for r in self.runs))]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        # Adam's step count per run: on the device for the kernel, mirrored on the host (no sync to read it)
        self.steps = torch.zeros(len(self.runs), dtype=torch.float32, device=dev)
        self.nsteps = [0] * len(self.runs)
        self._fused = _has_fused(self.params[0])
        # each run's running training loss since its last evaluation (sum over examples, and their count)
        self._loss_sum = torch.zeros(len(self.runs), dtype=torch.float64, device=dev)
        self._loss_count = [0] * len(self.runs)

    def _objective(self, active: tuple[int, ...]) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
        """The batched training objective of the runs ``active`` (rows of the stack), built once per set of rows.

        A period of only some rows evaluates them with a copy of their own buffers, refreshed from the stack's at
        every call. With ``compile``, the objective goes through ``torch.compile``, as the single-run trainer's:
        at small D a stacked step is mostly per-operation overhead too (MAF (5), 2 hidden layers, stack of 3,
        POWER's shape, one CPU thread: 1.9× faster; ``tests/benchmarks/compile_steps.py``). It is kept per set of
        rows so that every period reuses the compiled graph; a run leaving the stack changes the shapes, and so
        compiles once more.
        """
        whole = len(active) == len(self.runs)
        idx = None if whole else torch.tensor(active, device=self.train_x.device)
        got = self._objectives.get(active)
        if got is None:
            own = self.run_buffers if whole else {k: b[idx] for k, b in self.run_buffers.items()}
            obj = stacked_objective(self.template, self.buffers, run_buffers=own)
            got = self._objectives[active] = (compiled(obj) if self.compile else obj, own)
        elif not whole:
            with torch.no_grad():
                for k, b in got[1].items():
                    b.copy_(self.run_buffers[k][idx])
        return got[0]

    # -- stacked ⇄ per-run ---------------------------------------------------------------------------
    @torch.no_grad()
    def _sync_module(self, i: int) -> None:
        """Copy run i's rows into its module (before validation, checkpoints and at the end)."""
        for p, v in zip(self.runs[i].flow.parameters(), self.params):
            p.copy_(v[i])

    def _before_finish(self, i: int) -> None:
        self._sync_module(i)

    # -- checkpoints (the single-run format) ------------------------------------------------------------
    def _optimizer_state(self, i: int) -> dict[str, Any]:
        run = self.runs[i]
        template = make_adam(run.flow.parameters(), lr=run.spec.lr, weight_decay=run.spec.weight_decay).state_dict()
        step = self.nsteps[i]
        if step > 0:
            template["state"] = {
                k: {
                    "step": torch.tensor(float(step), dtype=torch.float32),
                    "exp_avg": self.exp_avg[k][i].clone(),
                    "exp_avg_sq": self.exp_avg_sq[k][i].clone(),
                }
                for k in range(len(self.params))
            }
        return template

    def _state_dict(self, i: int) -> dict[str, Any]:
        run = self.runs[i]
        self._sync_module(i)
        return {
            **run.state.position_state(),
            "period_loss": self._period_loss(i),
            "model": run.flow.state_dict(),
            "optimizer": self._optimizer_state(i),
            "early_stopping": run.stopper.state_dict(),
            "rng": _rng_state(run.generator),
            "result": run.result.checkpoint_state(),
            "fingerprint": run.fingerprint,
        }

    def save_checkpoint(self, i: int) -> None:
        self._save_run(i)

    def _save(self, i: int) -> None:
        if self.runs[i].path is not None:
            atomic_torch_save(self.runs[i].path, self._state_dict(i))

    def load_checkpoint(self, i: int) -> None:
        """Restore run i from its checkpoint (written by a stack or by a single run; format 1 or 2)."""
        run = self.runs[i]
        state = read_checkpoint(run.path, run.fingerprint)  # a truncated or foreign file: a clear error
        with checkpoint_fits(run.path):
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
            run.state.load_position(state, self.batches_per_epoch, self.train_x.shape[0], torch.device("cpu"))
            self._set_period_loss(i, *state.get("period_loss", (0.0, 0)))

    # -- the stepper -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _adam(
        self,
        params: list[Tensor],
        m: list[Tensor],
        v: list[Tensor],
        steps: Tensor,
        nsteps: list[int],
        active: list[int],
        live: list[bool],
    ) -> None:
        """torch's Adam (L2 added to the gradient, as the single-run trainer's) on the rows with ``live``.

        Host-side lists decide the grouping (no device sync): the whole stack in one fused call when every row
        is live and the rows share learning rate, weight decay and step count (the usual stack of seeds), else
        one call per (learning rate, weight decay) group over its live rows. Bit-identical to the single-run
        fused step. Without a fused kernel: the same algorithm with per-run tensors. The learning rate of a
        row follows the schedule of its own step count.
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
            lr = scheduled_lr(specs[j].lr, self.lr_schedule, nsteps[j] - 1, self.max_steps)
            groups.setdefault((lr, specs[j].weight_decay), []).append(j)
        for (lr, wd), js in groups.items():
            if not self._fused:
                self._adam_reference(params, grads, m, v, steps, js, lr, wd)
            elif len(js) == len(live) and len({nsteps[j] for j in js}) == 1:
                _fused_adam(params, grads, m, v, [steps[0]] * len(params), lr, wd)
            else:
                flat = [[x[j] for j in js for x in ts] for ts in (params, grads, m, v)]  # run-major rows
                _fused_adam(*flat, [steps[j] for j in js for _ in params], lr, wd)

    @staticmethod
    def _adam_reference(
        params: list[Tensor],
        grads: list[Tensor],
        m: list[Tensor],
        v: list[Tensor],
        steps: Tensor,
        js: list[int],
        lr: float,
        wd: float,
    ) -> None:
        """torch's Adam algorithm (``foreach=False``) on rows ``js`` where no fused kernel exists."""
        idx = torch.tensor(js, device=steps.device)
        n = steps[idx].to(torch.float64)
        for p, g, ma, va in zip(params, grads, m, v):
            shape = (-1,) + (1,) * (p.dim() - 1)
            bc1 = (1 - BETA1**n).to(p.dtype).view(shape)
            bc2_sqrt = (1 - BETA2**n).sqrt().to(p.dtype).view(shape)
            gj = g[idx].add(p[idx], alpha=wd)
            mj = ma[idx].lerp_(gj, 1 - BETA1)
            vj = va[idx].mul_(BETA2).addcmul_(gj, gj, value=1 - BETA2)
            ma[idx], va[idx] = mj, vj
            p[idx] = p[idx] - (lr / bc1) * mj / (vj.sqrt() / bc2_sqrt + EPS)

    def _train_epoch(self, active: list[int]) -> tuple[list[float], list[str | None]]:
        """The rest of the epoch of every active run (what the stack bench times)."""
        return self._train_period(active, self.batches_per_epoch - self.runs[active[0]].state.pos)

    def _train_runs(self, active: list[int], steps: int) -> list[tuple[float, str | None]]:
        """Runs at different places in their epochs (resumed mid-epoch from step-mode checkpoints written at
        different times) train group by group, each group from its common place."""
        groups: dict[int, list[int]] = {}
        for i in active:
            groups.setdefault(self.runs[i].state.pos, []).append(i)
        out: dict[int, tuple[float, str | None]] = {}
        for group in groups.values():
            out.update(zip(group, zip(*self._train_period(group, steps))))
        return [out[i] for i in active]

    def _train_period(self, active: list[int], steps: int) -> tuple[list[float], list[str | None]]:
        """``steps`` optimiser steps of every active run, each on its own shuffle, from their common place in
        the epoch; (running mean train loss since the run's last evaluation, failure or None) per run."""
        states = [self.runs[i].state for i in active]
        if len({s.pos for s in states}) > 1:
            raise ConfigError(
                "the runs of this stack stand at different places in their epochs (checkpoints of "
                "different steps): resume them one by one"
            )
        period = _Period(self, active)
        for i in active:
            self.runs[i].flow.train()
        self.template.train()
        n, dev, b, pos = self.train_x.shape[0], self.train_x.device, self.batch_size, states[0].pos
        sync_every = 1 if dev.type == "cpu" else SYNC_EVERY
        perms = None if states[0].perm is None else torch.stack([s.perm for s in states]).to(dev)
        bar = self._bar(states[0], steps, f"stack of {len(active)}, ")
        for j in range(steps):
            if interrupts.asked():
                break
            if perms is None:  # a new epoch: each live run's own order (and the generator state that drew it)
                perms = torch.stack(
                    [
                        s.draw_perm(n, torch.device("cpu")) if ok else torch.arange(n)
                        for s, ok in zip(states, period.live)
                    ]
                ).to(dev)
            batch = self.train_x[perms[:, pos * b : pos * b + b]]  # (R, b, D): run r's own minibatch
            losses = period.losses(batch)
            end_of_epoch = pos * b + b >= n
            if (j + 1) % sync_every == 0 or end_of_epoch or j == steps - 1:
                if not period.check(states, losses.detach()):
                    break
            period.step(losses, self.grad_clip)
            pos = 0 if end_of_epoch else pos + 1
            for s, ok in zip(states, period.live):
                if ok:
                    s.advance(end_of_epoch)
            perms = None if end_of_epoch else perms
            bar.update()
        bar.close()
        return period.close()

    def _period_done(self, i: int) -> None:
        self._set_period_loss(i, 0.0, 0)

    def _period_loss(self, i: int) -> tuple[float, int]:
        return float(self._loss_sum[i]), self._loss_count[i]

    def _set_period_loss(self, i: int, total: float, count: int) -> None:
        self._loss_sum[i] = total
        self._loss_count[i] = int(count)

    def _validate(self, i: int) -> tuple[float, int]:
        """As the single-run trainer: (LL over the finite validation points, count of −inf points)."""
        self._sync_module(i)
        return validation_ll(self.runs[i].flow, self.train_x, self.val_x, self.eval_batch_size)

    def _validate_runs(self, rows: list[int]) -> dict[int, tuple[float, int]]:
        return self._validate_all(rows) if rows else {}

    def _validate_all(self, rows: list[int]) -> dict[int, tuple[float, int]]:
        """:meth:`_validate` of runs ``rows``: all at once where the family allows it
        (:func:`~flowbench.models.stacking.stacked_validation`), each module left as its own validation leaves it
        (its parameters, evaluation mode, its batch-norm statistics); else run by run."""
        if len(rows) > 1 and not self.run_buffers:
            idx = torch.tensor(rows, device=self.train_x.device)
            params = {n: p[idx] for n, p in zip(self.names, self.params)}
            got = stacked_validation(
                self.template, params, self.buffers, self.train_x, self.val_x, self.eval_batch_size
            )
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

    def _train_nll(self, i: int) -> tuple[float, int]:
        # the module as its validation left it (parameters, batch norms, relgrad's cached log|det W|)
        return training_nll(self.runs[i].flow, self.nll_x, self.eval_batch_size)

    def _info(self, i: int, *fields: Any) -> StackedEpochInfo:
        return StackedEpochInfo(*fields, run=i, seed=self.runs[i].spec.seed)

    def fit(self) -> list[TrainResult]:
        """Train every run of the stack as a single run trains (the same loop); one result per run."""
        return self._fit()


#: Options in which the runs of one stack may differ: they change no tensor shape (per-run Adam, stopper).
PER_RUN = ("seed", "lr", "weight_decay", "patience", "max_epochs")
#: Options the stacked trainer does not implement (declared ``stackable=False`` in :data:`flowbench.config.OPTIONS`),
#: with the value it behaves as, their default; a run with another value is not stacked by a sweep and refused
#: by ``run --seeds`` (a trainer option added later is declared so until :class:`StackedTrainer` implements it).
UNSTACKABLE: dict[str, Any] = {o.name: o.default for o in OPTIONS.values() if not o.stackable}


def unstackable(opts: RunOptions) -> str | None:
    """Why a run with options ``opts`` cannot train in a stack, or None."""
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
    # compile may change between a run and its resume, but a stack either compiles or not: runs asking
    # differently train in different stacks
    skip = (set(PER_RUN) | set(RESUME_MAY_CHANGE) | set(UNTAGGED) | {"seeds", "tag"}) - {"compile"}
    flat = opts.to_dict()
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if k not in skip))


def run_stacked(
    options: Sequence[Any], data: Any = None, *, callbacks: list[Callable] | None = None, progress: bool = True
) -> list:
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
    with lifecycle.claim(runs, precheck=lambda files: _check_stack(runs, files)) as files:
        prep = lifecycle.prepare(runs, data)
        # The id tells this stack's records from another stack's of the same seeds (the report counts a stack's
        # wall time, which each of its records carries, once).
        stack = {"seeds": [o.seed for o in runs], "size": len(runs), "id": uuid.uuid4().hex[:12]}
        flows = [b.flow for b in prep.built]
        results, notes, prior = _train_stack(runs, flows, [f.checkpoint for f in files], prep.x, callbacks, progress)
        records = []
        for i, o in enumerate(runs):
            notes[i].append(f"trained in a stack of {len(runs)} (seeds {stack['seeds']})")
            # Wall time: the whole stack's (all its runs trained together), plus this run's earlier sessions.
            records.append(
                lifecycle.finish_run(o, files[i], prep, prep.built[i], results[i], notes[i], t0 - prior[i], stack)
            )
        return records


def _seed_list(runs: Sequence[RunOptions]) -> str:
    return ",".join(str(o.seed) for o in runs)


def _seeds_have(runs: Sequence[RunOptions]) -> str:
    """``seed 1 has`` / ``seeds 0,2 have``."""
    return f"seed {runs[0].seed} has" if len(runs) == 1 else f"seeds {_seed_list(runs)} have"


def _check_seeds_left(runs: list[RunOptions], files: list[RunFiles]) -> None:
    """Some seeds of the stack already recorded (one resumed alone, say), or some with a checkpoint to resume
    and some without: name the seeds each command should take, rather than advise ``--force``, which would
    throw the recorded or checkpointed work away."""
    done = [f.record.is_file() and not o.force and not replaceable(f.record) for o, f in zip(runs, files)]
    recorded = [o for o, d in zip(runs, done) if d]
    left = [o for o, d in zip(runs, done) if not d]
    if recorded and left:
        # a seed left with a checkpoint goes on from it (--resume); one without starts (no --resume)
        ckpt = {o.seed for o, f in zip(runs, files) if f.checkpoint.is_file()}
        go_on, start = [o for o in left if o.seed in ckpt], [o for o in left if o.seed not in ckpt]
        if go_on and start:
            how = f"--seeds {_seed_list(go_on)} --resume, and --seeds {_seed_list(start)} without --resume"
        else:
            how = f"--seeds {_seed_list(left)}" + (" --resume" if go_on else "")
        raise UsageError(
            f"{_seeds_have(recorded)} a record in {files[0].folder} already; the seeds left are "
            f"{_seed_list(left)}: run the same command with {how} (--force would train every seed again and "
            "replace those records)"
        )
    fresh = [o for o, f in zip(runs, files) if o.resume and not f.checkpoint.is_file()]
    if fresh and len(fresh) < len(runs):
        kept = [o for o in runs if o not in fresh]
        raise UsageError(
            f"--resume: {_seeds_have(fresh)} no checkpoint in {files[0].folder} to resume from, "
            f"{_seeds_have(kept)} one: run --seeds {_seed_list(kept)} --resume, and --seeds {_seed_list(fresh)} "
            "without --resume"
        )


def _check_stack(runs: list, files: list[RunFiles]) -> None:
    """Check that the runs can train as one stack, before any data is loaded."""
    for o in runs:
        why = unstackable(o)
        if why is not None and "closed form" not in why:
            raise ConfigError(f"--seeds: {why}; run the seeds one by one instead")
    keys = {stack_key(o) for o in runs}
    if len(keys) > 1 or len({o.batch_size for o in runs}) > 1:
        raise ConfigError("runs of one stack may differ only in " + ", ".join(PER_RUN))
    if len({f.record for f in files}) != len(files):
        raise ConfigError("two runs of the stack would write the same record (same seed and tag)")
    _check_seeds_left(runs, files)


def _train_stack(
    runs: list, flows: list, ckpts: list[Path], x: Any, callbacks: list[Callable] | None, progress: bool
) -> tuple[list[TrainResult], list[list[str]], list[float]]:
    """Train the built flows of a stack (closed-form ones run by run); their results, the notes for their
    records, and each run's training time in earlier sessions (``--resume``)."""
    if not flows[0].trainable:
        return _train_closed_form(runs, flows, ckpts, x, progress)
    notes: list[list[str]] = [[] for _ in runs]
    prior = [0.0] * len(runs)
    first = runs[0]
    trainer = StackedTrainer(
        _run_specs(runs, flows, ckpts),
        x.train,
        x.val,
        batch_size=first.batch_size,
        eval_batch_size=first.eval_batch_size,
        callbacks=callbacks,
        progress=progress,
        checkpoint_every_s=float(first.checkpoint_every_s),
        max_steps=first.max_steps,
        lr_schedule=first.lr_schedule,
        grad_clip=first.grad_clip,
        eval_every=first.eval_every,
        compile=first.compile,
    )
    for i, (o, ckpt) in enumerate(zip(runs, ckpts)):
        if o.resume:
            trainer.load_checkpoint(i)
            prior[i] = trainer.runs[i].result.train_time_s
            notes[i].append(f"resumed from the checkpoint {trainer.runs[i].result.resumed_from}")
        elif ckpt.exists():
            notes[i].append("an older checkpoint was replaced (run with --resume to continue one instead)")
    return trainer.fit(), notes, prior


def _train_closed_form(
    runs: list, flows: list, ckpts: list[Path], x: Any, progress: bool
) -> tuple[list[TrainResult], list[list[str]], list[float]]:
    """Fit the closed-form flows of a stack one run at a time; as :func:`_train_stack`."""
    notes: list[list[str]] = [[] for _ in runs]
    prior = [0.0] * len(runs)
    results = []
    for i, (o, flow) in enumerate(zip(runs, flows)):
        res, notes[i], prior[i] = lifecycle.train_single(flow, x, o, ckpts[i], None, progress)
        results.append(res)
    return results, notes, prior


def _run_specs(runs: list, flows: list, ckpts: list[Path]) -> list[RunSpec]:
    """One :class:`RunSpec` per run of the stack, from its options, built flow and checkpoint path."""
    # A sweep stacks configurations (tags) too; their epoch lines must tell them apart, not only the seeds.
    tagged = len({o.tag for o in runs}) > 1
    return [
        RunSpec(
            flow,
            o.seed,
            o.lr,
            o.weight_decay,
            o.patience,
            o.max_epochs,
            ckpt,
            o.to_dict(),
            f"[{o.tag or 'no tag'}] seed {o.seed}" if tagged else None,
        )
        for o, flow, ckpt in zip(runs, flows, ckpts)
    ]


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
    info = get_info(opts.dataset_key)
    classes = lifecycle.label_classes(opts.model_key, info)
    flow, _, _ = lifecycle.build_from_options(opts, info.dim, classes)
    return lifecycle.step_memory(flow, opts.batch_size)


def stack_cap(opts: RunOptions, budget: int | None = None) -> int:
    """The largest stack of runs like ``opts`` within ``budget`` bytes (default :data:`MEMORY_SHARE` of the
    memory available on the run's device), at most :data:`MAX_STACK` and at least 1:
    ``min(MAX_STACK, budget // run_memory(opts))``."""
    if budget is None:
        budget = int(
            MEMORY_SHARE
            * utils.available_memory(
                opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            )
        )
    return max(1, min(MAX_STACK, budget // max(1, run_memory(opts))))
