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
"""

from __future__ import annotations

import math
import pickle
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowbench.config import OPTIONS, RESUME_MAY_CHANGE, unset_value
from flowbench.errors import ConfigError
from flowbench.models.base import Flow
from flowbench.training.early_stopping import EarlyStopping
from flowbench.training.evaluate import TRAIN_NLL_POINTS, train_subsample, training_nll, validation_ll
from flowbench.training.optim import EpochStepAdam
from flowbench.utils import atomic_torch_save, keep_freed_memory

__all__ = ["TrainResult", "Trainer", "EpochInfo", "best_model_state", "save_model_state", "checkpoint_epoch"]


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
    history: list[dict[str, float]] = field(default_factory=list)
    train_time_s: float = 0.0
    resumed_from_epoch: int | None = None
    n_nonfinite_val: int = 0  # −inf validation points at the best epoch (left out of best_val_ll)
    steps: int = 0
    best_step: int | None = None

    #: What a checkpoint keeps of the result (the rest is derived when training ends).
    CHECKPOINTED = ("status", "failure", "stop_reason", "history", "train_time_s")

    def checkpoint_state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.CHECKPOINTED}

    def load_checkpoint_state(self, r: dict[str, Any]) -> None:
        self.status, self.failure, self.stop_reason = r["status"], r["failure"], r["stop_reason"]
        self.history, self.train_time_s = list(r["history"]), float(r["train_time_s"])


def loss_label(loss_omits: str | None) -> str:
    """How the console names the running training loss: ``train loss`` where it is the NLL, else what it is
    (relgrad: ``loss w/o log|det W|``), so that nobody reads it as the NLL beside the validation LL."""
    return "train loss" if loss_omits is None else f"loss w/o {loss_omits}"


#: On a GPU the running loss is read back (and checked for NaN/inf) every this many steps.
SYNC_EVERY = 50

LR_SCHEDULES: tuple[str, ...] = OPTIONS["lr_schedule"].choices or ()  # declared once, with the option


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
        return ("it holds Python objects that flowbench never writes into its files; it was not unpickled, "
                "because loading such objects can run any code")
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
        raise ConfigError(f"{what} {path} is truncated or not a flowbench file ({_why_unreadable(e)}); delete it, "
                          "or start the run again with --force (without --resume)") from e
    if not isinstance(state, dict):
        raise ConfigError(f"{what} {path} is not a flowbench file (it holds a {type(state).__name__}); delete it, "
                          "or start the run again with --force (without --resume)")
    return state


def _checkpoint(path: str | Path) -> dict[str, Any]:
    state = _load(path, "checkpoint")
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ConfigError(f"checkpoint {path} is not a flowbench training checkpoint (no {', '.join(missing)}); "
                          "delete it, or start the run again with --force (without --resume)")
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
    return state


def checkpoint_epoch(path: str | Path) -> int | None:
    """The number of epochs a checkpoint has completed, or None when it cannot be read."""
    try:
        return int(_checkpoint(path)["epoch"])
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


class Trainer:
    """Trains one :class:`Flow` on device-resident tensors; see the module docstring for the protocol."""

    def __init__(
        self,
        flow: Flow,
        train_x: Tensor,
        val_x: Tensor,
        *,
        lr: float,
        weight_decay: float = 1e-6,
        batch_size: int = 100,
        patience: int = 30,
        max_epochs: int | None = None,
        seed: int = 0,
        eval_batch_size: int = 2000,
        checkpoint_path: str | Path | None = None,
        fingerprint: dict[str, Any] | None = None,
        callbacks: list[Callable[[EpochInfo], None]] | None = None,
        progress: bool = True,
        compile: bool = False,
        adam_epoch_step: bool = False,
        checkpoint_every_s: float = 0.0,
        max_steps: int | None = None,
        lr_schedule: str = "constant",
        grad_clip: float | None = None,
        eval_every: int | None = None,
    ):
        _check_schedule_options(max_steps, lr_schedule, grad_clip, eval_every)
        if train_x.device.type == "cpu":
            keep_freed_memory()  # no page faults for the blocks every step frees and allocates again
        self.flow = flow
        # The training objective, optionally through torch.compile: at small D a step is mostly per-operation
        # overhead, which compiling fuses away (MAF(5) on POWER's shape: 3.0 → 1.7 ms/step on one CPU thread,
        # after a one-off compile of about 30 s). Off by default: the compile time dominates short runs.
        self._objective = self._batch_loss
        if compile:
            self._objective = torch.compile(self._batch_loss, dynamic=False)
        self.train_x = train_x
        self.val_x = val_x
        # where each evaluation scores the exact training NLL (no more points than validation scores)
        self.nll_x = train_subsample(train_x, min(TRAIN_NLL_POINTS, val_x.shape[0]))
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.lr = lr
        self.lr_schedule = lr_schedule
        self.grad_clip = grad_clip
        self.eval_every = eval_every
        self.eval_batch_size = eval_batch_size
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.fingerprint = fingerprint or {}
        self.callbacks = list(callbacks or [])
        self.progress = progress
        # torch's Adam adds weight_decay·w to the gradient inside step(): exactly the gradient of the MAF L2
        # penalty (1e-6/2)·Σ‖w‖² (not AdamW's decoupled decay). Because it happens in step(), after relgrad's
        # backward has formed the relative gradient, that transform acts on the likelihood gradient only and
        # the penalty stays an ordinary Euclidean L2 term, as in the MAF protocol.
        self.optimizer = make_adam(flow.parameters(), lr=lr, weight_decay=weight_decay)
        if adam_epoch_step:  # the relgrad reference code's bias correction (see training/optim.py)
            self.optimizer = EpochStepAdam(flow.parameters(), lr=lr, weight_decay=weight_decay)
        self.stopper = EarlyStopping(patience)
        # Shuffling has its own generator so that nothing else drawing random numbers changes the batch order.
        self.generator = torch.Generator().manual_seed(seed)
        self.result = TrainResult()
        self._epoch = 0  # epochs completed
        self._step = 0  # optimiser steps taken
        self._pos = 0  # batches of the current epoch already taken
        self._perm: Tensor | None = None  # the current epoch's order (None between epochs)
        self._epoch_rng: Tensor | None = None  # shuffle-generator state that drew it
        self._best_step: int | None = None
        self._finished = False
        self.checkpoint_every_s = checkpoint_every_s
        self._saved_at: float | None = None  # perf_counter of the last checkpoint (None: none this session)
        self._saved_step = -1

    @property
    def batches_per_epoch(self) -> int:
        return max(1, math.ceil(self.train_x.shape[0] / self.batch_size))

    def lr_at(self, step: int) -> float:
        """The learning rate of the optimiser step taken after ``step`` steps (0-based)."""
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / self.max_steps))
        return self.lr

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 2,
            "epoch": self._epoch,
            "step": self._step,
            "pos": self._pos,
            "epoch_rng": self._epoch_rng,
            "best_step": self._best_step,
            "finished": self._finished,
            "model": self.flow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "rng": _rng_state(self.generator),
            "result": self.result.checkpoint_state(),
            "fingerprint": self.fingerprint,
        }

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is not None:
            atomic_torch_save(self.checkpoint_path, self.state_dict())
        self._saved_at, self._saved_step = time.perf_counter(), self._step

    def _checkpoint_due(self) -> bool:
        """Whether this epoch's end writes a checkpoint: the run has finished, or none for
        ``checkpoint_every_s`` seconds (0: every epoch; the first epoch of a session starts the clock)."""
        if self._finished or self.checkpoint_every_s <= 0:
            return True
        if self._saved_at is None:
            self._saved_at = self._t_fit
        return time.perf_counter() - self._saved_at >= self.checkpoint_every_s

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        """Restore the state saved after an evaluation (``--resume``)."""
        path = Path(path) if path is not None else self.checkpoint_path
        state = read_checkpoint(path, self.fingerprint)
        try:
            self.flow.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.stopper.load_state_dict(state["early_stopping"])
            _set_rng_state(state["rng"], self.generator)
            self.result.load_checkpoint_state(state["result"])
            self._epoch = int(state["epoch"])
            self._finished = bool(state["finished"])
            # format 1 (epoch checkpoints only) had no step bookkeeping: it always stood at an epoch boundary
            self._step = int(state.get("step", self._epoch * self.batches_per_epoch))
            self._pos = int(state.get("pos", 0))
            self._epoch_rng = state.get("epoch_rng")
            best = self.stopper.best_epoch
            self._best_step = state.get("best_step", None if best is None else best * self.batches_per_epoch)
            self._perm = None
            if self._epoch_rng is not None:  # stopped mid-epoch: redraw that epoch's order from its state
                gen = torch.Generator()
                gen.set_state(self._epoch_rng)
                self._perm = torch.randperm(self.train_x.shape[0], generator=gen).to(self.train_x.device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a model of another shape, a damaged state
            raise ConfigError(f"checkpoint {path} does not fit this run ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else e!r}); delete it, or start the run again "
                              "with --force (without --resume)") from e
        self.result.resumed_from_epoch = self._epoch
        self._saved_step = self._step

    # -- the loop --------------------------------------------------------------------------------------
    def _validate(self) -> tuple[float, int]:
        """(validation LL over the finite points, count of −inf points): see ``evaluate.finite_mean``."""
        return validation_ll(self.flow, self.train_x, self.val_x, self.eval_batch_size)

    def _batch_loss(self, batch: Tensor) -> Tensor:
        return -self.flow.train_log_prob(batch).mean()

    def _budget_spent(self) -> str | None:
        if self.max_epochs is not None and self._epoch >= self.max_epochs:
            return f"reached max_epochs={self.max_epochs}"
        if self.max_steps is not None and self._step >= self.max_steps:
            return f"reached max_steps={self.max_steps}"
        return None

    def _period_steps(self) -> int:
        """Steps until the next evaluation: the rest of the epoch, or ``eval_every``, within the budgets."""
        bpe = self.batches_per_epoch
        if self.eval_every is None:
            k = bpe - self._pos
        else:
            k = self.eval_every
            if self.max_epochs is not None:
                k = min(k, (self.max_epochs - self._epoch) * bpe - self._pos)
        if self.max_steps is not None:
            k = min(k, self.max_steps - self._step)
        return k

    def _epoch_label(self) -> int:
        """The 1-based epoch the current position falls in (an epoch just completed counts as its own)."""
        return self._epoch if self._pos == 0 else self._epoch + 1

    def _train_period(self, steps: int) -> tuple[float, str | None]:
        """``steps`` optimiser steps from the current position; returns (mean train loss, failure or None)."""
        self.flow.train()
        epoch_step = isinstance(self.optimizer, EpochStepAdam)
        n = self.train_x.shape[0]
        total, count = self.train_x.new_zeros((), dtype=torch.float64), 0
        # Reading the loss on the host forces a device sync; on a GPU do it every SYNC_EVERY steps only (a
        # non-finite loss is then caught a few steps late, which is harmless: the best state is restored).
        sync_every = 1 if self.train_x.device.type == "cpu" else SYNC_EVERY
        desc = f"epoch {self._epoch + 1}" if self.eval_every is None else f"steps {self._step + 1}-{self._step + steps}"
        bar = tqdm(
            total=steps,
            desc=desc,
            leave=False,
            disable=None if self.progress else True,  # None: no bar when stderr is not a terminal (logs)
            file=sys.stderr,
            mininterval=0.5,
        )
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for j in range(steps):
            if self._perm is None:  # a new epoch: its order, and the generator state that drew it
                self._epoch_rng = self.generator.get_state()
                self._perm = torch.randperm(n, generator=self.generator).to(self.train_x.device)
            i = self._pos * self.batch_size
            batch = self.train_x[self._perm[i : i + self.batch_size]]
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
                        f"non-finite training loss ({loss.item()}) at epoch {self._epoch + 1}, batch "
                        f"{self._pos + 1} (step {self._step + 1}) (lower --lr, or check the data for outliers)"
                    )
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if epoch_step:  # the reference code's bias correction counts the (1-based) epoch
                self.optimizer.epoch = self._epoch + 1
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            if self.lr_schedule != "constant":
                lr = self.lr_at(self._step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            self.optimizer.step()
            self._step += 1
            self._pos += 1
            if end_of_epoch:
                self._epoch += 1
                self._pos, self._perm, self._epoch_rng = 0, None, None
            bar.update()
        bar.close()
        return total.item() / max(count, 1), None

    def fit(self) -> TrainResult:
        """Train until patience runs out, a budget (``max_epochs``, ``max_steps``) is spent or the loss turns
        non-finite."""
        res = self.result
        start = self._t_fit = time.perf_counter()
        base_time = res.train_time_s
        while not self._finished:
            spent = self._budget_spent()
            if spent is not None:
                if self._saved_step != self._step:  # the end: the last evaluation goes to disk
                    self.save_checkpoint()
                res.stop_reason = spent
                break
            t_period = time.perf_counter()
            train_loss, failure = self._train_period(self._period_steps())
            # a failed step belongs to the epoch in progress; an evaluation to the epoch it ends or falls in
            epoch = self._epoch + 1 if failure is not None else self._epoch_label()
            val_ll, n_bad = math.nan, 0
            if failure is None:
                val_ll, n_bad = self._validate()
                if not math.isfinite(val_ll):
                    failure = f"non-finite validation log-likelihood ({val_ll}) at epoch {epoch} (step {self._step})"
            if failure is not None:
                # Keep the last good state: the stopper's best, restored below; the record notes the failure.
                res.status, res.failure, res.stop_reason = "nonfinite", failure, "non-finite loss"
                self._finished = True
                self._log(f"epoch {epoch}: {failure}; stopping and keeping the best model so far")
                self._epoch = epoch  # the epoch that failed counts as run
                res.train_time_s = base_time + time.perf_counter() - start
                self.save_checkpoint()
                break
            # on the state validation left ready (batch norms set, relgrad's log|det W| cached): no O(D³) here
            nll, n_bad_train = training_nll(self.flow, self.nll_x, self.eval_batch_size)
            # epoch mode indexes evaluations by epoch (as the MAF protocol reports them), step mode by step
            index = epoch if self.eval_every is None else self._step
            if self.stopper.step(val_ll, index, self.flow):
                self._best_step = self._step
            res.history.append({"epoch": epoch, "step": self._step, "train_loss": train_loss, "train_nll": nll,
                                "val_ll": val_ll, "n_nonfinite_val": n_bad, "n_nonfinite_train": n_bad_train,
                                "seconds": time.perf_counter() - t_period})  # training and evaluation
            omits = getattr(self.flow, "loss_omits", None)
            info = EpochInfo(epoch, train_loss, val_ll, self.stopper.best_value, self._best_epoch(),
                             self.stopper.patience_left, self._step, nll, omits)
            where = f"epoch {epoch:4d}" if self.eval_every is None else f"step {self._step:7d} (epoch {epoch})"
            self._log(
                f"{where}  {loss_label(omits)} {train_loss:10.4f}  train NLL {nll:10.4f}  val LL {val_ll:10.4f}  "
                f"best {info.best_val_ll:10.4f} (epoch {info.best_epoch}, step {self._best_step})  "
                f"patience left {info.patience_left}"
            )
            if self.stopper.should_stop:
                res.stop_reason = (
                    f"no improvement for {self.stopper.patience} epochs" if self.eval_every is None else
                    f"no improvement for {self.stopper.patience} evaluations ({self.eval_every} steps apart)"
                )
                self._finished = True
            res.train_time_s = base_time + time.perf_counter() - start
            if self._checkpoint_due():
                self.save_checkpoint()
            for cb in self.callbacks:  # after the checkpoint: a callback that raises simulates a kill
                cb(info)
        res.train_time_s = base_time + time.perf_counter() - start
        res.epochs = self._epoch
        res.steps = self._step
        if self.stopper.restore(self.flow):
            # The best state was saved right after its prepare_for_eval; recomputing is the protocol's
            # "and at the end" and costs one pass.
            self.flow.prepare_for_eval(self.train_x)
        res.best_epoch = self._best_epoch()
        res.best_step = self._best_step if self.stopper.best_epoch is not None else None
        res.best_val_ll = self.stopper.best_value if self.stopper.best_epoch is not None else math.nan
        res.n_nonfinite_val = next((int(h.get("n_nonfinite_val", 0)) for h in res.history
                                    if h.get("step", h["epoch"]) == (res.best_step if "step" in h else res.best_epoch)), 0)
        self.flow.eval()
        return res

    def _best_epoch(self) -> int | None:
        if self.stopper.best_epoch is None:
            return None
        if self.eval_every is None:
            return self.stopper.best_epoch
        return math.ceil(self._best_step / self.batches_per_epoch)

    def _log(self, line: str) -> None:
        if self.progress:
            tqdm.write(line, file=sys.stderr)


def _check_schedule_options(max_steps: int | None, lr_schedule: str, grad_clip: float | None,
                            eval_every: int | None) -> None:
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
    if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and math.isfinite(grad_clip) and grad_clip > 0):
        raise ConfigError(f"--grad-clip must be a positive number (the largest gradient norm); got {grad_clip!r}")
