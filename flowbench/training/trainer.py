"""The training loop of the MAF protocol (Papamakarios et al. 2017, section 4).

Adam (β 0.9/0.999, ε 1e-8), minibatches of 100 reshuffled every epoch from a seeded generator, L2 penalty
1e-6, validation every epoch after the model's ``prepare_for_eval`` (batch-norm statistics from the whole
training set), patience early stopping with the best parameters restored. An epoch ends with an atomic
checkpoint holding everything that influences later epochs, so a resumed run is bit-identical to an
uninterrupted one; checkpoints are written at most every ``checkpoint_every_s`` seconds (and always at the
end of training), because writing one every epoch cost 18 % (MAF) to 40 % (relgrad) of a digits epoch. A
run killed between checkpoints redoes the epochs since the last one, with the same numbers.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowbench.config import RESUME_MAY_CHANGE
from flowbench.errors import ConfigError
from flowbench.models.base import Flow
from flowbench.training.early_stopping import EarlyStopping
from flowbench.training.evaluate import finite_mean, log_prob_batches
from flowbench.training.optim import EpochStepAdam
from flowbench.utils import atomic_torch_save

__all__ = ["TrainResult", "Trainer", "EpochInfo", "best_model_state", "save_model_state", "checkpoint_epoch"]


@dataclass
class EpochInfo:
    """What a callback sees after each epoch (1-based ``epoch``)."""

    epoch: int
    train_nll: float
    val_ll: float
    best_val_ll: float
    best_epoch: int | None
    patience_left: int


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


#: On a GPU the running loss is read back (and checked for NaN/inf) every this many steps.
SYNC_EVERY = 50


def make_adam(params, lr: float, weight_decay: float) -> torch.optim.Adam:
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


def _load(path: str | Path, what: str) -> dict[str, Any]:
    """``torch.load`` of a file flowbench wrote; a truncated or foreign file is a ConfigError that says what to do."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"no {what} at {path}") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        raise ConfigError(f"{what} {path} is truncated or not a flowbench file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); delete it, or start the run "
                          "again with --force (without --resume)") from e
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
    ):
        self.flow = flow
        # The training objective, optionally through torch.compile: at small D a step is mostly per-operation
        # overhead, which compiling fuses away (MAF(5) on POWER's shape: 3.0 → 1.7 ms/step on one CPU thread,
        # after a one-off compile of about 30 s). Off by default: the compile time dominates short runs.
        self._objective = self._batch_loss
        if compile:
            self._objective = torch.compile(self._batch_loss, dynamic=False)
        self.train_x = train_x
        self.val_x = val_x
        self.batch_size = batch_size
        self.max_epochs = max_epochs
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
        self._finished = False
        self.checkpoint_every_s = checkpoint_every_s
        self._saved_at: float | None = None  # perf_counter of the last checkpoint (None: none this session)
        self._saved_epoch = -1

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "epoch": self._epoch,
            "finished": self._finished,
            "model": self.flow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "rng": _rng_state(self.generator),
            "result": {
                "status": self.result.status,
                "failure": self.result.failure,
                "stop_reason": self.result.stop_reason,
                "history": self.result.history,
                "train_time_s": self.result.train_time_s,
            },
            "fingerprint": self.fingerprint,
        }

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is not None:
            atomic_torch_save(self.checkpoint_path, self.state_dict())
        self._saved_at, self._saved_epoch = time.perf_counter(), self._epoch

    def _checkpoint_due(self) -> bool:
        """Whether this epoch's end writes a checkpoint: the run has finished, or none for
        ``checkpoint_every_s`` seconds (0: every epoch; the first epoch of a session starts the clock)."""
        if self._finished or self.checkpoint_every_s <= 0:
            return True
        if self._saved_at is None:
            self._saved_at = self._t_fit
        return time.perf_counter() - self._saved_at >= self.checkpoint_every_s

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        """Restore the state saved at the end of an epoch (``--resume``)."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None or not path.is_file():
            raise ConfigError(f"no checkpoint to resume from at {path}; run without --resume to start afresh")
        state = _checkpoint(path)
        old = {k: v for k, v in (state.get("fingerprint") or {}).items() if k not in RESUME_MAY_CHANGE}
        new = {k: v for k, v in self.fingerprint.items() if k not in RESUME_MAY_CHANGE}
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(
                f"checkpoint {path} was made with different options ({', '.join(diff)}); "
                "resume with the same options, or use --force without --resume to start again"
            )
        try:
            self.flow.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.stopper.load_state_dict(state["early_stopping"])
            _set_rng_state(state["rng"], self.generator)
            r = state["result"]
            self.result.status, self.result.failure = r["status"], r["failure"]
            self.result.stop_reason, self.result.history = r["stop_reason"], list(r["history"])
            self.result.train_time_s = float(r["train_time_s"])
            self._epoch = int(state["epoch"])
            self._finished = bool(state["finished"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a model of another shape, a damaged state
            raise ConfigError(f"checkpoint {path} does not fit this run ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else e!r}); delete it, or start the run again "
                              "with --force (without --resume)") from e
        self.result.resumed_from_epoch = self._epoch
        self._saved_epoch = self._epoch

    # -- the loop --------------------------------------------------------------------------------------
    def _validate(self) -> tuple[float, int]:
        """(validation LL over the finite points, count of −inf points): see ``evaluate.finite_mean``."""
        self.flow.eval()
        self.flow.prepare_for_eval(self.train_x)
        return finite_mean(log_prob_batches(self.flow, self.val_x, self.eval_batch_size))

    def _batch_loss(self, batch: Tensor) -> Tensor:
        return -self.flow.train_log_prob(batch).mean()

    def _train_epoch(self, epoch: int) -> tuple[float, str | None]:
        """One pass over the shuffled training set; returns (mean train NLL, failure message or None)."""
        self.flow.train()
        if isinstance(self.optimizer, EpochStepAdam):
            self.optimizer.epoch = epoch
        n = self.train_x.shape[0]
        perm = torch.randperm(n, generator=self.generator).to(self.train_x.device)
        total, count = self.train_x.new_zeros((), dtype=torch.float64), 0
        # Reading the loss on the host forces a device sync; on a GPU do it every SYNC_EVERY steps only (a
        # non-finite loss is then caught a few steps late, which is harmless: the best state is restored).
        sync_every = 1 if self.train_x.device.type == "cpu" else SYNC_EVERY
        bar = tqdm(
            range(0, n, self.batch_size),
            desc=f"epoch {epoch}",
            leave=False,
            disable=None if self.progress else True,  # None: no bar when stderr is not a terminal (logs)
            file=sys.stderr,
            mininterval=0.5,
        )
        for step, i in enumerate(bar, 1):
            batch = self.train_x[perm[i : i + self.batch_size]]
            loss = self._objective(batch)
            # The relgrad objective omits log|det W|, so its "loss" is not the NLL; it is still what is optimised.
            total += loss.detach() * batch.shape[0]
            count += batch.shape[0]
            if step % sync_every == 0 or i + self.batch_size >= n:
                running = total.item() / count
                if not math.isfinite(running):
                    bar.close()
                    return math.nan, (
                        f"non-finite training loss ({loss.item()}) at epoch {epoch}, batch {step} "
                        "(lower --lr, or check the data for outliers)"
                    )
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        bar.close()
        return total.item() / max(count, 1), None

    def fit(self) -> TrainResult:
        """Train until patience runs out, ``max_epochs`` is reached or the loss turns non-finite."""
        res = self.result
        start = self._t_fit = time.perf_counter()
        base_time = res.train_time_s
        while not self._finished:
            if self.max_epochs is not None and self._epoch >= self.max_epochs:
                if self._saved_epoch != self._epoch:  # the end: the last epoch goes to disk
                    self.save_checkpoint()
                res.stop_reason = f"reached max_epochs={self.max_epochs}"
                break
            epoch = self._epoch + 1
            t_epoch = time.perf_counter()
            train_nll, failure = self._train_epoch(epoch)
            val_ll, n_bad = math.nan, 0
            if failure is None:
                val_ll, n_bad = self._validate()
                if not math.isfinite(val_ll):
                    failure = f"non-finite validation log-likelihood ({val_ll}) at epoch {epoch}"
            if failure is not None:
                # Keep the last good state: the stopper's best, restored below; the record notes the failure.
                res.status, res.failure, res.stop_reason = "nonfinite", failure, "non-finite loss"
                self._finished = True
                self._log(f"epoch {epoch}: {failure}; stopping and keeping the best model so far")
                self._epoch = epoch
                res.train_time_s = base_time + time.perf_counter() - start
                self.save_checkpoint()
                break
            self.stopper.step(val_ll, epoch, self.flow)
            self._epoch = epoch
            res.history.append({"epoch": epoch, "train_loss": train_nll, "val_ll": val_ll, "n_nonfinite_val": n_bad,
                                "seconds": time.perf_counter() - t_epoch})  # training and validation
            info = EpochInfo(
                epoch, train_nll, val_ll, self.stopper.best_value, self.stopper.best_epoch, self.stopper.patience_left
            )
            self._log(
                f"epoch {epoch:4d}  train loss {train_nll:10.4f}  val LL {val_ll:10.4f}  "
                f"best {info.best_val_ll:10.4f} (epoch {info.best_epoch})  patience left {info.patience_left}"
            )
            if self.stopper.should_stop:
                res.stop_reason = f"no improvement for {self.stopper.patience} epochs"
                self._finished = True
            res.train_time_s = base_time + time.perf_counter() - start
            if self._checkpoint_due():
                self.save_checkpoint()
            for cb in self.callbacks:  # after the checkpoint: a callback that raises simulates a kill
                cb(info)
        res.train_time_s = base_time + time.perf_counter() - start
        res.epochs = self._epoch
        if self.stopper.restore(self.flow):
            # The best state was saved right after its prepare_for_eval; recomputing is the protocol's
            # "and at the end" and costs one pass.
            self.flow.prepare_for_eval(self.train_x)
        res.best_epoch = self.stopper.best_epoch
        res.best_val_ll = self.stopper.best_value if self.stopper.best_epoch is not None else math.nan
        res.n_nonfinite_val = next((int(h.get("n_nonfinite_val", 0)) for h in res.history
                                    if h["epoch"] == res.best_epoch), 0)
        self.flow.eval()
        return res

    def _log(self, line: str) -> None:
        if self.progress:
            tqdm.write(line, file=sys.stderr)
