"""One run lifecycle (issue 23): the training loop a single run and a stack of runs both go through.

:class:`RunLoop` owns everything between two optimiser steps that is not arithmetic: the evaluation schedule
(every epoch, or every ``eval_every`` steps across epoch boundaries), the budgets (``max_epochs`` per run,
``max_steps``), early stopping, the non-finite guard, the history rows, the epoch and step lines, the checkpoint
cadence, the callbacks and the best-state restore at the end. What a step is belongs to a subclass, the
*stepper*: :class:`~flowbench.training.trainer.Trainer` (one flow, its own Adam) and
:class:`~flowbench.training.stacked.StackedTrainer` (R runs' parameters stacked, one batched objective). A
stepper provides

- ``_states``: one :class:`RunState` per run (its position, stopper, result);
- ``_train_runs(active, k)``: ``k`` optimiser steps of the runs ``active`` (which stand at one position in their
  epoch), advancing their states; (running mean loss since the run's last evaluation, failure or None) per run,
  where a failed run's state stops at the failing batch;
- ``_period_done(i)``: run i was evaluated (its running loss starts again);
- ``_validate_runs(rows)``: {run: (validation LL over the finite points, count of −inf points)};
- ``_train_nll(i)``: run i's exact training NLL on the fixed subsample, on the state validation left ready;
- ``_save(i)``: run i's checkpoint; ``_info(i, ...)``: what callbacks see; ``_before_finish(i)``: run i's module
  holds its parameters;
- ``_period_loss(i)`` / ``_set_period_loss(i, total, count)``: run i's running training loss since its last
  evaluation (sum over examples, their count), which a checkpoint written between evaluations keeps.

Before each optimiser step a stepper looks at :func:`flowbench.interrupts.asked` and ends its period early when a
stop was asked for (Ctrl-C, SIGTERM); the loop then writes every training run's checkpoint at its position and
raises the stop (:meth:`RunLoop._stop_here`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowbench import interrupts
from flowbench.config import OPTIONS
from flowbench.errors import ConfigError

__all__ = [
    "EarlyStopping",
    "EpochInfo",
    "RunLoop",
    "RunState",
    "TrainResult",
    "loss_label",
    "position_words",
    "scheduled_lr",
    "steps_per_epoch",
]


def position_words(epoch: int, step: int, pos: int) -> str:
    """Where a checkpoint stands, for messages: ``after epoch 3``, or, stopped mid-epoch, ``in epoch 4, after
    step 52``."""
    return f"after epoch {epoch}" if pos == 0 else f"in epoch {epoch + 1}, after step {step:,}"


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    """Optimiser steps in one epoch: every row once, the last batch possibly short."""
    return max(1, math.ceil(n_rows / batch_size))


LR_SCHEDULES: tuple[str, ...] = OPTIONS["lr_schedule"].choices or ()  # declared once, with the option


# Patience-based early stopping with best-state restore: the MAF protocol (Papamakarios et al. 2017, §4).
class EarlyStopping:
    """Track the best validation log-likelihood; stop after ``patience`` epochs without improvement.

    The best parameters (and buffers: batch-norm statistics) are kept as a CPU copy so that
    :meth:`restore` puts the model back exactly as it was at the best epoch.
    """

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError("patience must be >= 1")
        self.patience = patience
        self.best_value = -math.inf
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    @property
    def patience_left(self) -> int:
        return self.patience - self.bad_epochs

    def step(self, value: float, epoch: int, model: nn.Module) -> bool:
        """Record the validation value of ``epoch``; returns True when it is a new best (strictly greater)."""
        if math.isfinite(value) and value > self.best_value:
            self.best_value = value
            self.best_epoch = epoch
            self.bad_epochs = 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    def restore(self, model: nn.Module) -> bool:
        """Load the best state into ``model``; False when no epoch was ever finite (nothing to restore)."""
        if self.best_state is None:
            return False
        model.load_state_dict(self.best_state)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_state": copy.copy(self.best_state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the patience stays this run's own: a resume may raise it (read_checkpoint refuses a lower one)
        self.best_value = state["best_value"]
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]
        self.best_state = state["best_state"]


@dataclass
class EpochInfo:
    """What a callback sees after each evaluation (``epoch``: the 1-based epoch it fell in).

    ``train_loss`` is the running mean of the training loss over the steps since the last evaluation (what was
    optimised; it leaves ``loss_omits`` out of the NLL where that is not None: relgrad's Σ log|det W|);
    ``train_nll`` is the exact NLL of the evaluated state on the fixed training subsample
    (:func:`~flowbench.training.evaluate.training_nll`), comparable with ``val_ll``.
    """

    epoch: int
    train_loss: float
    val_ll: float
    best_val_ll: float
    best_epoch: int | None
    patience_left: int
    step: int = 0  # optimiser steps taken so far
    train_nll: float = math.nan
    loss_omits: str | None = None


@dataclass
class TrainResult:
    epochs: int = 0
    best_epoch: int | None = None
    best_val_ll: float = math.nan
    status: str = "ok"
    failure: str | None = None
    stop_reason: str = "not trained"
    #: How training ended, one of :data:`flowbench.status.KINDS` ("" while it runs): written where it ends, so
    #: tables, plots and report read it instead of parsing ``stop_reason``'s prose.
    ended: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    train_time_s: float = 0.0
    resumed_from_epoch: int | None = None
    resumed_from: str = ""  # where the checkpoint it resumed from stood (position_words)
    n_nonfinite_val: int = 0  # −inf validation points at the best epoch (left out of best_val_ll)
    steps: int = 0
    best_step: int | None = None

    #: What a checkpoint keeps of the result (the rest is derived when training ends).
    CHECKPOINTED = ("status", "failure", "stop_reason", "ended", "history", "train_time_s")

    def checkpoint_state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.CHECKPOINTED}

    def load_checkpoint_state(self, r: dict[str, Any]) -> None:
        self.status, self.failure, self.stop_reason = r["status"], r["failure"], r["stop_reason"]
        self.ended = r.get("ended", "")  # checkpoints written before the field have none
        self.history, self.train_time_s = list(r["history"]), float(r["train_time_s"])


def loss_label(loss_omits: str | None) -> str:
    """How the console names the running training loss: ``train loss`` where it is the NLL, else what it is
    (relgrad: ``loss w/o log|det W|``), so that nobody reads it as the NLL beside the validation LL."""
    return "train loss" if loss_omits is None else f"loss w/o {loss_omits}"


def scheduled_lr(lr: float, schedule: str, step: int, max_steps: int | None) -> float:
    """The learning rate of the optimiser step taken after ``step`` steps (0-based): ``lr`` (constant), or
    ``lr·(1 + cos(π step/max_steps))/2`` (cosine, torch's ``CosineAnnealingLR(T_max=max_steps, eta_min=0)``)."""
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / max_steps))
    return lr


def check_schedule_options(
    max_steps: int | None, lr_schedule: str, grad_clip: float | None, eval_every: int | None
) -> None:
    """User errors in the step-budget options, in terms of the ``flowbench run`` flags."""

    def bad_int(v: Any) -> bool:
        return v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1)

    if bad_int(max_steps):
        raise ConfigError(f"--max-steps must be a positive integer; got {max_steps!r}")
    if bad_int(eval_every):
        raise ConfigError(f"--eval-every must be a positive integer; got {eval_every!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}; got {lr_schedule!r}")
    if lr_schedule == "cosine" and max_steps is None:
        raise ConfigError("--lr-schedule cosine anneals over the step budget: give --max-steps too")
    if grad_clip is not None and not (
        isinstance(grad_clip, (int, float)) and math.isfinite(grad_clip) and grad_clip > 0
    ):
        raise ConfigError(f"--grad-clip must be a positive number (the largest gradient norm); got {grad_clip!r}")


@dataclass
class RunState:
    """Where one run stands: what the loop decides with, and what a checkpoint keeps of its position."""

    flow: torch.nn.Module
    stopper: EarlyStopping
    generator: torch.Generator  # the run's shuffling generator
    max_epochs: int | None = None
    prefix: str = ""  # before its console lines ("seed 3 " in a stack)
    result: TrainResult = field(default_factory=TrainResult)
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    pos: int = 0  # batches of the current epoch already taken
    perm: Tensor | None = None  # the current epoch's order (None between epochs)
    epoch_rng: Tensor | None = None  # shuffle-generator state that drew it
    best_step: int | None = None
    finished: bool = False  # converged or failed (checkpointed: a resumed run does not train on)
    stopped: bool = False  # out of the loop: finished, or a budget spent (not checkpointed: a budget may grow)
    saved_step: int = -1  # the step of its last checkpoint
    next_eval: int | None = None  # the step of its next evaluation (None: not yet planned)
    evaluated_epoch: int = 0  # ``epoch`` as of its last evaluation

    def draw_perm(self, n: int, device: torch.device) -> Tensor:
        """A new epoch's order, and the generator state that drew it."""
        self.epoch_rng = self.generator.get_state()
        self.perm = torch.randperm(n, generator=self.generator).to(device)
        return self.perm

    def advance(self, end_of_epoch: bool) -> None:
        """One optimiser step taken (the last of its epoch where ``end_of_epoch``)."""
        self.step += 1
        self.pos += 1
        if end_of_epoch:
            self.epoch += 1
            self.pos, self.perm, self.epoch_rng = 0, None, None

    def position_state(self) -> dict[str, Any]:
        """The checkpoint entries of its position (format 2; format 1 had ``epoch`` and ``finished`` only; a
        stepper adds ``period_loss``)."""
        return {
            "format": 2,
            "epoch": self.epoch,
            "step": self.step,
            "pos": self.pos,
            "epoch_rng": self.epoch_rng,
            "best_step": self.best_step,
            "finished": self.finished,
        }

    def load_position(self, state: dict[str, Any], batches_per_epoch: int, n: int, device: torch.device) -> None:
        """Restore the position and the result from a checkpoint (the stopper already loaded)."""
        self.result.load_checkpoint_state(state["result"])
        self.epoch = int(state["epoch"])
        self.finished = bool(state["finished"])
        # format 1 (epoch checkpoints only) had no step bookkeeping: it always stood at an epoch boundary
        self.step = int(state.get("step", self.epoch * batches_per_epoch))
        self.pos = int(state.get("pos", 0))
        self.epoch_rng = state.get("epoch_rng")
        best = self.stopper.best_epoch
        self.best_step = state.get("best_step", None if best is None else best * batches_per_epoch)
        self.perm = None
        if self.epoch_rng is not None:  # stopped mid-epoch: redraw that epoch's order from its state
            gen = torch.Generator()
            gen.set_state(self.epoch_rng)
            self.perm = torch.randperm(n, generator=gen).to(device)
        self.result.resumed_from_epoch = self.evaluated_epoch = self.epoch
        self.result.resumed_from = position_words(self.epoch, self.step, self.pos)
        self.saved_step, self.next_eval = self.step, None


@contextlib.contextmanager
def checkpoint_fits(path: str | Path | None) -> Iterator[None]:
    """Loading a checkpoint into a run: a model of another shape or a damaged state is a ConfigError."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise ConfigError(
            f"checkpoint {path} does not fit this run ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else e!r}); delete it, or start the run again "
            "with --force (without --resume)"
        ) from e


class RunLoop:
    """The loop of :meth:`_fit`; subclasses are steppers (see the module docstring) and set the attributes of
    the annotations below."""

    _states: list[RunState]
    train_x: Tensor
    batch_size: int
    max_steps: int | None
    eval_every: int | None
    checkpoint_every_s: float
    callbacks: list[Callable[[Any], None]]
    progress: bool
    _saved_at: float | None = None  # perf_counter of the last checkpoint (None: none this session)
    _t_fit: float = 0.0

    @property
    def batches_per_epoch(self) -> int:
        return steps_per_epoch(self.train_x.shape[0], self.batch_size)

    # -- what the stepper may keep as it is -------------------------------------------------------------
    def _period_done(self, i: int) -> None:
        pass

    def _before_finish(self, i: int) -> None:
        pass

    def _log(self, line: str) -> None:
        if self.progress:
            tqdm.write(line, file=sys.stderr)

    def _bar(self, s: RunState, steps: int, what: str = "") -> Any:
        """The progress bar of a period from run s's position (none when stderr is not a terminal)."""
        desc = f"epoch {s.epoch + 1}" if self.eval_every is None else f"steps {s.step + 1}-{s.step + steps}"
        return tqdm(
            total=steps,
            desc=what + desc,
            leave=False,
            disable=None if self.progress else True,
            file=sys.stderr,
            mininterval=0.5,
        )

    # -- the schedule -----------------------------------------------------------------------------------
    def _budget_spent(self, s: RunState) -> str | None:
        if s.max_epochs is not None and s.epoch >= s.max_epochs:
            return f"reached max_epochs={s.max_epochs}"
        if self.max_steps is not None and s.step >= self.max_steps:
            return f"reached max_steps={self.max_steps}"
        return None

    def _period_steps(self, s: RunState) -> int:
        """Steps until run s's next evaluation: the rest of the epoch, or ``eval_every`` after its last one (a run
        stopped between evaluations resumes on the same schedule), within the budgets."""
        bpe = self.batches_per_epoch
        if self.eval_every is None:
            k = bpe - s.pos
        else:
            last = s.result.history[-1].get("step", s.step) if s.result.history else 0
            k = max(self.eval_every - (s.step - last), 0)
            if s.max_epochs is not None:
                k = min(k, (s.max_epochs - s.epoch) * bpe - s.pos)
        if self.max_steps is not None:
            k = min(k, self.max_steps - s.step)
        return k

    def _best_epoch(self, s: RunState) -> int | None:
        if s.stopper.best_epoch is None:
            return None
        if self.eval_every is None:
            return s.stopper.best_epoch
        return math.ceil(s.best_step / self.batches_per_epoch)

    def _checkpoint_due(self) -> bool:
        """Whether this evaluation writes checkpoints: none for ``checkpoint_every_s`` seconds (0: at every
        evaluation; the first of a session starts the clock). A run that finished writes one regardless."""
        if self.checkpoint_every_s <= 0:
            return True
        if self._saved_at is None:
            self._saved_at = self._t_fit
        return time.perf_counter() - self._saved_at >= self.checkpoint_every_s

    def _save_run(self, i: int) -> None:
        self._save(i)
        self._states[i].saved_step = self._states[i].step
        self._saved_at = time.perf_counter()

    # -- the loop ---------------------------------------------------------------------------------------
    def _fit(self) -> list[TrainResult]:
        """Train every run until patience runs out, a budget (``max_epochs``, ``max_steps``) is spent or its
        loss turns non-finite; each run's best state restored. One :class:`TrainResult` per run."""
        start = self._t_fit = time.perf_counter()
        base = [s.result.train_time_s for s in self._states]
        clock = lambda i: base[i] + time.perf_counter() - start  # noqa: E731 - run i's training time
        with interrupts.listening():
            while True:
                active = [i for i in range(len(self._states)) if self._still_training(i)]
                if not active:
                    break
                if interrupts.asked():  # noted while training or evaluating: the positions written, then raised
                    self._stop_here(active, clock)
                self._period(active, clock)
            return [self._finish(i, clock(i)) for i in range(len(self._states))]

    def _stop_here(self, active: list[int], clock: Callable[[int], float]) -> None:
        """A stop was asked for between two steps: each training run's checkpoint written at its position (its
        running loss and training time with it), then the stop raised with where they stand."""
        for i in active:
            s = self._states[i]
            s.result.train_time_s = clock(i)
            if s.saved_step != s.step:
                self._save_run(i)
        s = self._states[active[0]]
        where = f"at step {s.step} (epoch {s.epoch + 1 if s.pos else s.epoch}, batch {s.pos or self.batches_per_epoch} "
        where += f"of {self.batches_per_epoch})"
        if len({self._states[i].step for i in active}) > 1:
            where = "at each run's own step"
        interrupts.raise_asked(where)

    def _still_training(self, i: int) -> bool:
        """Whether run i trains on; a run whose budget is spent leaves, its last evaluation on disk."""
        s = self._states[i]
        if s.finished or s.stopped:
            s.stopped = True
            return False
        spent = self._budget_spent(s)
        if spent is None:
            return True
        if s.saved_step != s.step:
            self._save_run(i)
        s.result.stop_reason = spent
        s.result.ended = "capped" if spent.startswith("reached max_epochs") else "budget"
        s.stopped = True
        return False

    def _period(self, active: list[int], clock: Callable[[int], float]) -> None:
        """Train the active runs to the nearest planned evaluation; evaluate the runs whose evaluation it is,
        write the checkpoints due, then call the callbacks."""
        t_period = time.perf_counter()
        for i in active:
            s = self._states[i]
            if s.next_eval is None:
                s.next_eval = s.step + self._period_steps(s)
        k = min(self._states[i].next_eval - self._states[i].step for i in active)
        # A stop asked for meanwhile ended the period early: the runs that reached their evaluation are still
        # evaluated (their epoch's validation belongs to it), the others wait at the loop's top to be saved.
        trained = dict(zip(active, self._train_runs(active, k)))
        ends = [i for i in active if trained[i][1] is not None or self._states[i].step == self._states[i].next_eval]
        vals = self._validate_runs([i for i in ends if trained[i][1] is None])
        infos = []
        for i in ends:
            info = self._evaluate(i, *trained[i], vals.get(i), t_period)
            self._states[i].result.train_time_s = clock(i)
            if info is not None:
                infos.append(info)
        due = self._checkpoint_due()
        for i in ends:
            if due or self._states[i].finished:
                self._save_run(i)
        for info in infos:  # after every checkpoint: a callback that raises simulates a kill
            for cb in self.callbacks:
                cb(info)

    def _evaluate(
        self, i: int, train_loss: float, failure: str | None, val: tuple[float, int] | None, t_period: float
    ) -> Any:
        """Run i's evaluation after its period: history row, epoch line, stopping; its EpochInfo (None: failed)."""
        s = self._states[i]
        s.next_eval = None
        self._period_done(i)
        # a failed step belongs to the epoch in progress; an evaluation to the epoch it ends or falls in
        epoch = s.epoch + 1 if failure is not None or s.pos != 0 else s.epoch
        val_ll, n_bad = val if val is not None else (math.nan, 0)
        if failure is None and not math.isfinite(val_ll):
            # The training loss was finite, so the parameters are: a NaN score comes from the whole-training-set
            # batch-norm statistics, which a few extreme rows can overflow (POWER: 2 of 1.66 M rows at epoch 62).
            # MAF's trainer compares `val_loss < best`, false for NaN: no improvement, training goes on.
            self._log(
                f"{s.prefix}epoch {epoch}: validation log-likelihood is {val_ll} (every validation point "
                "non-finite); counted as no improvement, as MAF's trainer does, and training goes on"
            )
        if failure is not None:
            return self._fail(s, epoch, failure)
        # on the state validation left ready (batch norms set, relgrad's log|det W| cached): no O(D³) here
        nll, n_bad_train = self._train_nll(i)
        # epoch mode indexes evaluations by epoch (as the MAF protocol reports them), step mode by step
        if s.stopper.step(val_ll, epoch if self.eval_every is None else s.step, s.flow):
            s.best_step = s.step
        s.result.history.append(
            {
                "epoch": epoch,
                "step": s.step,
                "train_loss": train_loss,
                "train_nll": nll,
                "val_ll": val_ll,
                "n_nonfinite_val": n_bad,
                "n_nonfinite_train": n_bad_train,
                "seconds": time.perf_counter() - t_period,
            }
        )  # training and evaluation
        s.evaluated_epoch = s.epoch
        info = self._report_epoch(i, epoch, train_loss, val_ll, nll)
        self._stop_if_converged(s)
        return info

    def _report_epoch(self, i: int, epoch: int, train_loss: float, val_ll: float, nll: float) -> Any:
        """Run i's EpochInfo for the evaluation just recorded, its epoch line logged."""
        s = self._states[i]
        omits = getattr(s.flow, "loss_omits", None)
        info = self._info(
            i,
            epoch,
            train_loss,
            val_ll,
            s.stopper.best_value,
            self._best_epoch(s),
            s.stopper.patience_left,
            s.step,
            nll,
            omits,
        )
        where = f"epoch {epoch:4d}" if self.eval_every is None else f"step {s.step:7d} (epoch {epoch})"
        self._log(
            f"{s.prefix}{where}  {loss_label(omits)} {train_loss:10.4f}  train NLL {nll:10.4f}  "
            f"val LL {val_ll:10.4f}  best {info.best_val_ll:10.4f} (epoch {info.best_epoch}, step "
            f"{s.best_step})  patience left {info.patience_left}"
        )
        return info

    def _stop_if_converged(self, s: RunState) -> None:
        """Finish the run, as converged, once its patience has run out."""
        if s.stopper.should_stop:
            s.result.stop_reason = (
                f"no improvement for {s.stopper.patience} epochs"
                if self.eval_every is None
                else f"no improvement for {s.stopper.patience} evaluations ({self.eval_every} steps apart)"
            )
            s.result.ended = "converged"
            s.finished = True

    def _fail(self, s: RunState, epoch: int, failure: str) -> None:
        """Keep the last good state (the stopper's best, restored at the end); the record notes the failure."""
        res = s.result
        res.status, res.failure, res.stop_reason, res.ended = "nonfinite", failure, "non-finite loss", "nonfinite"
        s.finished = True
        kept = (
            "keeping the best model so far"
            if s.stopper.best_epoch is not None
            else "no epoch was validated before it, so the test set scores the diverged model"
        )
        self._log(f"{s.prefix}epoch {epoch}: {failure}; stopping, {kept}")
        s.epoch = s.evaluated_epoch = epoch  # the epoch that failed counts as run
        return None

    def _finish(self, i: int, train_time_s: float) -> TrainResult:
        """Run i's result, with its best state restored into its module (evaluation mode)."""
        s, res = self._states[i], self._states[i].result
        res.train_time_s, res.steps = train_time_s, s.step
        # A step budget can end inside an epoch: that epoch, trained in part and evaluated, counts as run (as a
        # failed one does), so that the best epoch is never past the epochs run.
        res.epochs = max(s.epoch, int(res.history[-1]["epoch"])) if res.history else s.epoch
        self._before_finish(i)
        if s.stopper.restore(s.flow):
            # The best state was saved right after its prepare_for_eval; recomputing is the protocol's
            # "and at the end" and costs one pass.
            s.flow.prepare_for_eval(self.train_x)
        res.best_epoch = self._best_epoch(s)
        found = s.stopper.best_epoch is not None
        res.best_step = s.best_step if found else None
        res.best_val_ll = s.stopper.best_value if found else math.nan
        res.n_nonfinite_val = next(
            (
                int(h.get("n_nonfinite_val", 0))
                for h in res.history
                if h.get("step", h["epoch"]) == (res.best_step if "step" in h else res.best_epoch)
            ),
            0,
        )
        s.flow.eval()
        return res

    # -- the stepper's part (see the module docstring) --------------------------------------------------
    def _train_runs(self, active: list[int], steps: int) -> list[tuple[float, str | None]]:
        raise NotImplementedError

    def _validate_runs(self, rows: list[int]) -> dict[int, tuple[float, int]]:
        raise NotImplementedError

    def _train_nll(self, i: int) -> tuple[float, int]:
        raise NotImplementedError

    def _save(self, i: int) -> None:
        raise NotImplementedError

    def _period_loss(self, i: int) -> tuple[float, int]:
        raise NotImplementedError

    def _set_period_loss(self, i: int, total: float, count: int) -> None:
        raise NotImplementedError

    def _info(self, i: int, *fields: Any) -> EpochInfo:
        return EpochInfo(*fields)
