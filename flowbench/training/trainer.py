"""The training loop of the MAF protocol (Papamakarios et al. 2017, section 4).

Adam (β 0.9/0.999, ε 1e-8), minibatches of 100 reshuffled every epoch from a seeded generator, L2 penalty
1e-6, validation every epoch after the model's ``prepare_for_eval`` (batch-norm statistics from the whole
training set), patience early stopping with the best parameters restored. Each evaluation also scores the
exact training NLL of the evaluated state on a fixed training subsample (``evaluate.training_nll``), recorded
beside the running training loss, which is not the NLL where the model's loss leaves a term out (relgrad).
Every evaluation is followed by an atomic checkpoint holding everything that influences later steps
(mid-epoch too: the position in the epoch and the shuffle state that drew its order), so a resumed run is
bit-identical to an uninterrupted one.
Checkpoints are written at most every ``checkpoint_every_s`` seconds (and always at the end of training),
because writing one at every evaluation cost 18 % (MAF) to 40 % (relgrad) of a digits epoch; a run killed
between checkpoints redoes the steps since the last one, with the same numbers.

General options, all off by default (the MAF protocol), which together give the NSF protocol (Durkan et al.
2019, code bayesiains/nsf experiments/uci.py: a fixed number of steps, cosine annealing of the learning
rate to 0, gradient-norm clipping at 5, validation every 250 steps keeping the best state):

- ``max_steps``: a budget of optimiser steps; training stops when it is spent (mid-epoch if need be),
  after one last evaluation.
- ``lr_schedule="cosine"``: ``lr_t = lr·(1 + cos(π t/max_steps))/2`` at step t = 0 … max_steps − 1,
  torch's ``CosineAnnealingLR(T_max=max_steps, eta_min=0)`` as the NSF code steps it. A function of the
  step count alone, so the checkpoint's step count is the scheduler's whole state.
- ``grad_clip``: rescale the gradient to at most this global L2 norm, after the model's backward has formed
  its gradient (so it clips the direction Adam is given) and before the L2 penalty Adam adds.
- ``eval_every``: validate every N steps instead of every epoch, across epoch boundaries; patience then
  counts evaluations.

The loop itself (schedule, budgets, stopping, history, lines, checkpoint cadence, callbacks, restore) is
:class:`~flowbench.training.loop.RunLoop`'s, which the stacked trainer shares (issue 23); :class:`Trainer` is
its single-run stepper.
"""

from __future__ import annotations

import math
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from flowbench import interrupts
from flowbench.config import OPTIONS, RESUME_MAY_CHANGE, RESUME_RAISE_ONLY, unset_value
from flowbench.errors import ConfigError
from flowbench.models.base import Flow
from flowbench.training.evaluate import TRAIN_NLL_POINTS, train_subsample, training_nll, validation_ll
from flowbench.training.loop import (  # noqa: F401 - EpochInfo, TrainResult, loss_label, LR_SCHEDULES: imported from here
    LR_SCHEDULES,
    EarlyStopping,
    EpochInfo,
    RunLoop,
    RunState,
    TrainResult,
    check_schedule_options,
    checkpoint_fits,
    loss_label,
    position_words,
    scheduled_lr,
)
from flowbench.training.optim import EpochStepAdam
from flowbench.utils import atomic_torch_save, keep_freed_memory

__all__ = [
    "TrainResult",
    "Trainer",
    "EpochInfo",
    "Progress",
    "best_model_state",
    "checkpoint_progress",
    "save_model_state",
    "checkpoint_epoch",
    "checkpoint_where",
    "compile_problem",
    "compiled",
]


#: On a GPU the running loss is read back (and checked for NaN/inf) every this many steps.
SYNC_EVERY = 50

#: The trainer's keyword defaults are the run options' (declared once, in :data:`flowbench.config.OPTIONS`).
_DEFAULT: dict[str, Any] = {name: option.default for name, option in OPTIONS.items()}


def make_adam(params: Iterable[Tensor], lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam (β 0.9/0.999, ε 1e-8) as in the MAF protocol, with the fused kernel where torch has one.

    The fused step is the same algorithm in one kernel per dtype/device instead of several per tensor;
    on small flows (MAF on POWER, 30 parameter tensors) it cut a training step by about a fifth on CPU.
    """
    params = list(params)
    kwargs = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device/dtype without a fused kernel
        return torch.optim.Adam(params, **kwargs)


def has_fused_adam(device: torch.device) -> bool:
    """Whether :func:`make_adam` gets torch's fused kernel on ``device`` (the CPU has one from torch 2.4)."""
    return bool(make_adam([torch.zeros(1, device=device, requires_grad=True)], 1e-3, 0.0).defaults.get("fused"))


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "shuffle": gen.get_state(),
        # numpy's state holds an ndarray: stored as a tensor so that torch.load(weights_only=True) reads it.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["shuffle"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: ``kind`` of the small file that keeps a finished run's evaluated model (``seed<k>.model.pt``).
MODEL_STATE_KIND = "flowbench-model-state"
_CHECKPOINT_KEYS = ("epoch", "finished", "model", "optimizer", "early_stopping", "rng", "result")


def _why_unreadable(error: Exception) -> str:
    """Why torch could not load a file, in a few words and never with torch's advice to load it with
    ``weights_only=False``: a file that is not what flowbench wrote must not be unpickled (it can run code)."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text or "Weights only" in text:
        return (
            "it holds Python objects that flowbench never writes into its files; it was not unpickled, "
            "because loading such objects can run any code"
        )
    first = text.splitlines()[0].split(". ")[0] if text else "unreadable"
    return f"{type(error).__name__}: {first}"


def _load(path: str | Path, what: str) -> dict[str, Any]:
    """``torch.load`` of a file flowbench wrote; a truncated or foreign file is a ConfigError that says what to do."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"no {what} at {path}") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        raise ConfigError(
            f"{what} {path} is truncated or not a flowbench file ({_why_unreadable(e)}); delete it, "
            "or start the run again with --force (without --resume)"
        ) from e
    if not isinstance(state, dict):
        raise ConfigError(
            f"{what} {path} is not a flowbench file (it holds a {type(state).__name__}); delete it, "
            "or start the run again with --force (without --resume)"
        )
    return state


def _checkpoint(path: str | Path) -> dict[str, Any]:
    state = _load(path, "checkpoint")
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ConfigError(
            f"checkpoint {path} is not a flowbench training checkpoint (no {', '.join(missing)}); "
            "delete it, or start the run again with --force (without --resume)"
        )
    return state


def read_checkpoint(path: str | Path | None, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint to ``--resume`` from, checked: present, readable, and made with the same options (those
    in :data:`~flowbench.config.RESUME_MAY_CHANGE` may differ); errors say what to do.

    A key one side does not list counts as its unset value (:func:`~flowbench.config.unset_value`): a checkpoint
    written before an option existed resumes only while that option has its default now (the old run trained
    as the default does), and a hyperparameter set to its default equals one left unset.
    """
    if path is None or not Path(path).is_file():
        raise ConfigError(f"no checkpoint to resume from at {path}; run without --resume to start afresh")
    state = _checkpoint(path)
    old = {k: v for k, v in (state.get("fingerprint") or {}).items() if k not in RESUME_MAY_CHANGE}
    new = {k: v for k, v in fingerprint.items() if k not in RESUME_MAY_CHANGE}

    def value(side: dict[str, Any], key: str) -> Any:
        return side[key] if key in side else unset_value(key, {**old, **new})

    diff = sorted(k for k in set(old) | set(new) if value(old, k) != value(new, k))
    if diff:
        raise ConfigError(
            f"checkpoint {path} was made with different options ({', '.join(diff)}); "
            "resume with the same options, or use --force without --resume to start again"
        )
    for key in RESUME_RAISE_ONLY:
        made, now = (state.get("fingerprint") or {}).get(key), fingerprint.get(key)
        if made is None or now is None or now == made:
            continue
        if now < made:
            raise ConfigError(
                f"checkpoint {path} was made with {key} {made}; a resume may raise the {key} but not lower it "
                f"({OPTIONS[key].flag} {made} or more), or use --force without --resume to start again"
            )
        if state.get("finished"):
            raise ConfigError(
                f"checkpoint {path} is of a run that already finished (it converged or failed): a raised {key} "
                "cannot continue it; use --force without --resume to train it again"
            )
    return state


def checkpoint_epoch(path: str | Path) -> int | None:
    """The number of epochs a checkpoint has completed, or None when it cannot be read."""
    try:
        return int(_checkpoint(path)["epoch"])
    except (ConfigError, TypeError, ValueError):
        return None


def checkpoint_where(path: str | Path) -> str | None:
    """Where a checkpoint stands (``after epoch 3``, ``in epoch 4, after step 52``), or None when it cannot be
    read."""
    try:
        state = _checkpoint(path)
        return position_words(int(state["epoch"]), int(state.get("step", 0)), int(state.get("pos", 0)))
    except (ConfigError, TypeError, ValueError):
        return None


def save_model_state(path: str | Path, flow: torch.nn.Module) -> None:
    """Write ``flow``'s state (the model a record was evaluated with) to the small model-state file ``path``."""
    atomic_torch_save(path, {"kind": MODEL_STATE_KIND, "model": flow.state_dict()})


def best_model_state(path: str | Path) -> dict[str, Tensor]:
    """The best-validation model state of a run: from its model-state file (``seed<k>.model.pt``) or its full
    training checkpoint (``seed<k>.ckpt``; the last epoch's state when no epoch was finite).

    A checkpoint path whose file was replaced by the model-state file after the record was written (the
    default, without ``--keep-checkpoint``) reads that file. This is the state :meth:`Trainer.fit` restores
    before the test evaluation, so a model rebuilt from the record's hyperparameters and loaded with it is
    the recorded model.
    """
    path = Path(path)
    if not path.is_file() and path.suffix == ".ckpt" and path.with_suffix(".model.pt").is_file():
        path = path.with_suffix(".model.pt")
    state = _load(path, "model state")
    if state.get("kind") == MODEL_STATE_KIND:
        return state["model"]
    if "model" not in state:
        raise ConfigError(f"{path} holds neither a model state nor a training checkpoint; delete it and re-run")
    return (state.get("early_stopping") or {}).get("best_state") or state["model"]


@dataclass(frozen=True)
class Progress:
    """How far a run has trained, as its training checkpoint says (``flowbench report``'s runs in progress).

    ``epoch``, ``step`` and ``pos`` (batches into the next epoch; 0 at an epoch's end) are those of the last
    checkpoint (:attr:`where` in words); ``best_val_ll`` is None while no evaluation was
    finite; ``patience_left`` counts epochs (evaluations with ``--eval-every``) before early stopping ends the
    run if none is better; ``history`` is the run's history so far (one row per evaluation).
    """

    epoch: int
    step: int
    finished: bool
    best_val_ll: float | None
    best_epoch: int | None
    best_step: int | None
    patience: int
    patience_left: int
    train_time_s: float
    options: dict[str, Any]
    history: tuple[dict[str, Any], ...] = ()
    pos: int = 0

    @property
    def where(self) -> str:
        """Where the checkpoint stands, in the words of the CLI's messages (``in epoch 4, after step 52``)."""
        return position_words(self.epoch, self.step, self.pos)

    @property
    def evaluations(self) -> int:
        return len(self.history)

    @property
    def nonfinite_val(self) -> int:
        """Evaluations whose validation LL was not finite (the NaN rule's)."""
        return sum(1 for h in self.history if h.get("val_ll") is not None and not math.isfinite(h["val_ll"]))

    @property
    def seconds_per_eval(self) -> float | None:
        """The median training time of the last 20 evaluations (None before the first)."""
        secs = [float(h["seconds"]) for h in self.history[-20:] if h.get("seconds") is not None]
        return float(np.median(secs)) if secs else None


def checkpoint_progress(path: str | Path) -> Progress:
    """The :class:`Progress` of the run whose training checkpoint (``seed<k>.ckpt``) is ``path``; nothing is
    rebuilt. A truncated or foreign file is a ConfigError that says what to do."""
    state = _checkpoint(path)
    stop = state["early_stopping"]
    result = state["result"] or {}
    best = stop.get("best_value")
    found = best is not None and math.isfinite(best)
    return Progress(
        epoch=int(state["epoch"]),
        step=int(state.get("step") or 0),
        finished=bool(state["finished"]),
        best_val_ll=float(best) if found else None,
        best_epoch=stop.get("best_epoch") if found else None,
        best_step=state.get("best_step") if found else None,
        patience=int(stop["patience"]),
        patience_left=int(stop["patience"]) - int(stop["bad_epochs"]),
        train_time_s=float(result.get("train_time_s") or 0.0),
        options=dict(state.get("fingerprint") or {}),
        history=tuple(dict(h) for h in result.get("history") or []),
        pos=int(state.get("pos") or 0),
    )


def _on_run(name: str) -> property:
    """A Trainer attribute kept for its callers that is its run's :class:`RunState` field ``name``."""
    return property(lambda self: getattr(self._run, name), lambda self, v: setattr(self._run, name, v))


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False)``, entered through a code object of its own.

    dynamo keeps its graphs per code object, process-wide, at most ``recompile_limit`` (8) of them, and beyond that
    runs the function eagerly with only a logged warning. Every trainer's objective would be one code object
    (``Trainer._batch_loss``, the stacked objective's lambda), so in a process that trains many models (a sweep, the
    column benchmark) the ninth shape would train eagerly. A fresh code object per objective gives each its own
    count.
    """
    inner = fn

    def objective(*args: Any) -> Any:
        return inner(*args)

    objective.__code__ = objective.__code__.replace()  # a copy: its own dynamo cache
    return torch.compile(objective, dynamic=False)


def compile_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot train on ``device`` here, or None: on a CPU its inductor builds C++ kernels,
    and without a working C++ compiler the first step would fail deep inside the compile."""
    if device.type != "cpu":
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        try:  # older torch (2.1.2) keeps it here
            from torch._inductor.codecache import cpp_compiler as get_cpp_compiler
        except ImportError:  # another torch's layout: its own compile says what is missing
            return None
    try:
        get_cpp_compiler()
    except Exception as e:  # torch's InvalidCxxCompiler, or whatever this torch raises instead
        return (
            f"--compile on the CPU needs a C++ compiler, and none works here ({str(e).splitlines()[0]}): "
            "install one (e.g. g++) or point $CXX at it"
        )
    return None


class Trainer(RunLoop):
    """Trains one :class:`Flow` on device-resident tensors; see the module docstring for the protocol.

    The loop (evaluations, budgets, stopping, checkpoints, callbacks) is :class:`~flowbench.training.loop.RunLoop`'s,
    shared with the stacked trainer; this class is its single-run stepper.
    """

    _epoch, _step, _pos = _on_run("epoch"), _on_run("step"), _on_run("pos")
    _perm, _epoch_rng, _best_step = _on_run("perm"), _on_run("epoch_rng"), _on_run("best_step")
    _finished, _saved_step = _on_run("finished"), _on_run("saved_step")

    def __init__(
        self,
        flow: Flow,
        train_x: Tensor,
        val_x: Tensor,
        *,
        lr: float,
        weight_decay: float = _DEFAULT["weight_decay"],
        batch_size: int = _DEFAULT["batch_size"],
        patience: int = _DEFAULT["patience"],
        max_epochs: int | None = _DEFAULT["max_epochs"],
        seed: int = _DEFAULT["seed"],
        eval_batch_size: int = _DEFAULT["eval_batch_size"],
        checkpoint_path: str | Path | None = None,
        fingerprint: dict[str, Any] | None = None,
        callbacks: list[Callable[[EpochInfo], None]] | None = None,
        progress: bool = True,
        compile: bool = _DEFAULT["compile"],
        adam_epoch_step: bool = _DEFAULT["adam_epoch_step"],
        # Not the run option's 30 s: a Trainer made in code checkpoints at every evaluation unless told otherwise.
        checkpoint_every_s: float = 0.0,
        max_steps: int | None = _DEFAULT["max_steps"],
        lr_schedule: str = _DEFAULT["lr_schedule"],
        grad_clip: float | None = _DEFAULT["grad_clip"],
        eval_every: int | None = _DEFAULT["eval_every"],
    ):
        check_schedule_options(max_steps, lr_schedule, grad_clip, eval_every)
        if train_x.device.type == "cpu":
            keep_freed_memory()  # no page faults for the blocks every step frees and allocates again
        self.flow = flow
        self.train_x, self.val_x = train_x, val_x
        # where each evaluation scores the exact training NLL (no more points than validation scores)
        self.nll_x = train_subsample(train_x, min(TRAIN_NLL_POINTS, val_x.shape[0]))
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_epochs, self.max_steps, self.eval_every = max_epochs, max_steps, eval_every
        self.lr, self.lr_schedule, self.grad_clip = lr, lr_schedule, grad_clip
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.fingerprint = fingerprint or {}
        self.callbacks = list(callbacks or [])
        self.progress = progress
        self.checkpoint_every_s = checkpoint_every_s
        # torch's Adam adds weight_decay·w to the gradient inside step(): exactly the gradient of the MAF L2
        # penalty (1e-6/2)·Σ‖w‖² (not AdamW's decoupled decay). Because it happens in step(), after relgrad's
        # backward has formed the relative gradient, that transform acts on the likelihood gradient only and
        # the penalty stays an ordinary Euclidean L2 term, as in the MAF protocol.
        self.optimizer = make_adam(flow.parameters(), lr=lr, weight_decay=weight_decay)
        if adam_epoch_step:  # the relgrad reference code's bias correction (see training/optim.py)
            self.optimizer = EpochStepAdam(flow.parameters(), lr=lr, weight_decay=weight_decay)
        self._init_run(patience, seed, compile)

    def _init_run(self, patience: int, seed: int, compile: bool) -> None:
        # The training objective, optionally through torch.compile: at small D a step is mostly per-operation
        # overhead, which compiling fuses away (MAF(5) on POWER's shape: 3.0 → 1.7 ms/step on one CPU thread,
        # after a one-off compile of about 30 s). Off by default: the compile time dominates short runs.
        self._objective = self._batch_loss
        if compile:
            self._objective = compiled(self._batch_loss)
        self.stopper = EarlyStopping(patience)
        # Shuffling has its own generator so that nothing else drawing random numbers changes the batch order.
        self.generator = torch.Generator().manual_seed(seed)
        self.result = TrainResult()
        self._run = RunState(self.flow, self.stopper, self.generator, self.max_epochs, result=self.result)
        self._states = [self._run]
        # the running training loss since the last evaluation (sum over examples, their count)
        self._loss_sum, self._loss_count = self.train_x.new_zeros((), dtype=torch.float64), 0

    def lr_at(self, step: int) -> float:
        """The learning rate of the optimiser step taken after ``step`` steps (0-based)."""
        return scheduled_lr(self.lr, self.lr_schedule, step, self.max_steps)

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **self._run.position_state(),
            "period_loss": self._period_loss(0),
            "model": self.flow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "rng": _rng_state(self.generator),
            "result": self.result.checkpoint_state(),
            "fingerprint": self.fingerprint,
        }

    def save_checkpoint(self) -> None:
        self._save_run(0)

    def _save(self, i: int) -> None:
        if self.checkpoint_path is not None:
            atomic_torch_save(self.checkpoint_path, self.state_dict())

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        """Restore the state saved after an evaluation (``--resume``)."""
        path = Path(path) if path is not None else self.checkpoint_path
        state = read_checkpoint(path, self.fingerprint)
        with checkpoint_fits(path):
            self.flow.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.stopper.load_state_dict(state["early_stopping"])
            _set_rng_state(state["rng"], self.generator)
            self._run.load_position(state, self.batches_per_epoch, self.train_x.shape[0], self.train_x.device)
            self._set_period_loss(0, *state.get("period_loss", (0.0, 0)))

    # -- the stepper -----------------------------------------------------------------------------------
    def _validate(self) -> tuple[float, int]:
        """(validation LL over the finite points, count of −inf points): see ``evaluate.finite_mean``."""
        return validation_ll(self.flow, self.train_x, self.val_x, self.eval_batch_size)

    def _validate_runs(self, rows: list[int]) -> dict[int, tuple[float, int]]:
        return {i: self._validate() for i in rows}

    def _train_nll(self, i: int) -> tuple[float, int]:
        return training_nll(self.flow, self.nll_x, self.eval_batch_size)

    def _batch_loss(self, batch: Tensor) -> Tensor:
        return -self.flow.train_log_prob(batch).mean()

    def _train_runs(self, active: list[int], steps: int) -> list[tuple[float, str | None]]:
        return [self._train_period(steps)]

    def _period_loss(self, i: int) -> tuple[float, int]:
        return float(self._loss_sum), self._loss_count

    def _set_period_loss(self, i: int, total: float, count: int) -> None:
        self._loss_sum.fill_(total)
        self._loss_count = int(count)

    def _period_done(self, i: int) -> None:
        self._set_period_loss(i, 0.0, 0)

    def _train_period(self, steps: int) -> tuple[float, str | None]:
        """Up to ``steps`` optimiser steps from the current position (fewer when a stop is asked for); returns
        (mean train loss since the last evaluation, failure or None)."""
        self.flow.train()
        n = self.train_x.shape[0]
        total, count = self._loss_sum, self._loss_count
        # Reading the loss on the host forces a device sync; on a GPU do it every SYNC_EVERY steps only (a
        # non-finite loss is then caught a few steps late, which is harmless: the best state is restored).
        sync_every = 1 if self.train_x.device.type == "cpu" else SYNC_EVERY
        bar = self._bar(self._run, steps)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for j in range(steps):
            if interrupts.asked():
                break
            s = self._run
            perm = s.perm if s.perm is not None else s.draw_perm(n, self.train_x.device)
            i = s.pos * self.batch_size
            batch = self.train_x[perm[i : i + self.batch_size]]
            loss = self._objective(batch)
            # The relgrad objective omits log|det W|, so its "loss" is not the NLL; it is still what is optimised.
            total += loss.detach() * batch.shape[0]
            count += batch.shape[0]
            end_of_epoch = i + self.batch_size >= n
            if (j + 1) % sync_every == 0 or end_of_epoch or j == steps - 1:
                running = total.item() / count
                if not math.isfinite(running):
                    bar.close()
                    return math.nan, (
                        f"non-finite training loss ({loss.item()}) at epoch {s.epoch + 1}, batch "
                        f"{s.pos + 1} (step {s.step + 1}) (lower --lr, or check the data for outliers)"
                    )
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            self._optimizer_step(loss, params)
            s.advance(end_of_epoch)
            bar.update()
            self._loss_count = count
        bar.close()
        return total.item() / max(count, 1), None

    def _optimizer_step(self, loss: Tensor, params: list[Tensor]) -> None:
        """Backward, then the step: gradient clipped, learning rate scheduled (both options)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if isinstance(self.optimizer, EpochStepAdam):  # the reference code's bias correction counts the (1-based) epoch
            self.optimizer.epoch = self._run.epoch + 1
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        if self.lr_schedule != "constant":
            lr = self.lr_at(self._run.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()

    def fit(self) -> TrainResult:
        """Train until patience runs out, a budget (``max_epochs``, ``max_steps``) is spent or the loss turns
        non-finite; the best state restored."""
        return self._fit()[0]


#: The old name of :func:`~flowbench.training.loop.check_schedule_options`.
_check_schedule_options = check_schedule_options
