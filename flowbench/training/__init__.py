"""Training, evaluation and records: :func:`run_experiment` is the one entry point (``flowbench run``, sweeps)."""

from __future__ import annotations

from flowbench.training.evaluate import evaluate_test, log_prob_batches, mean_2se
from flowbench.training.experiment import run_experiment
from flowbench.training.loop import EarlyStopping
from flowbench.training.trainer import EpochInfo, Trainer, TrainResult

__all__ = [
    "run_experiment",
    "Trainer",
    "TrainResult",
    "EpochInfo",
    "EarlyStopping",
    "evaluate_test",
    "log_prob_batches",
    "mean_2se",
]
