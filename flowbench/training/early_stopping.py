"""Patience-based early stopping with best-state restore (MAF protocol, Papamakarios et al. 2017, §4)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

__all__ = ["EarlyStopping"]


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
        self.patience = state["patience"]
        self.best_value = state["best_value"]
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]
        self.best_state = state["best_state"]
