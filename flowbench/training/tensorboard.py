"""Live TensorBoard logging of a run: the per-epoch values the record keeps, written as they happen.

``flowbench run --tensorboard DIR`` passes :func:`tensorboard_callback(DIR) <tensorboard_callback>` to the
trainer; each epoch adds the scalars ``train_loss``, ``train_nll``, ``val_ll`` and ``best_val_ll`` (nats, the
record's ``history`` plus the running best) at step ``epoch``. ``train_nll`` is the exact NLL on a fixed
training subsample (:func:`~flowbench.training.evaluate.training_nll`), the curve to set beside ``val_ll``. A
training loss that is not the NLL (relgrad's leaves Σ log|det W| out; Gresele et al. 2020, section 4) is logged
as ``train_loss_not_nll`` instead of ``train_loss``, so that no curve called a loss sits ~27 nats off the NLL.
Needs the optional ``tensorboard`` package (``pip install "flowbench[tensorboard]"``), used through
``torch.utils.tensorboard``. View with ``tensorboard --logdir DIR``.
"""

from __future__ import annotations

import math
from pathlib import Path

from flowbench.errors import FlowbenchError
from flowbench.results import run_dir
from flowbench.training.trainer import EpochInfo

__all__ = ["SCALARS", "LOSS_NOT_NLL_TAG", "TensorBoardLogger", "run_log_dir", "tensorboard_callback"]

#: Scalar tag → EpochInfo attribute. The tags are the record's key names, so a curve reads like the record.
SCALARS = {"train_loss": "train_loss", "train_nll": "train_nll", "val_ll": "val_ll", "best_val_ll": "best_val_ll"}
#: The tag of the training loss where it is not the NLL (``EpochInfo.loss_omits`` set).
LOSS_NOT_NLL_TAG = "train_loss_not_nll"


class TensorBoardLogger:
    """A trainer callback (``callable(EpochInfo)``) writing one TensorBoard event per value and epoch."""

    def __init__(self, log_dir: str | Path):
        try:  # lazy: the tensorboard extra is optional
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch.utils.tensorboard imports the tensorboard package
            raise FlowbenchError(
                f"--tensorboard needs the tensorboard package ({e}); install it with: "
                'pip install "flowbench[tensorboard]"'
            ) from e
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def __call__(self, info: EpochInfo) -> None:
        for tag, attr in SCALARS.items():
            if tag == "train_loss" and info.loss_omits is not None:
                tag = LOSS_NOT_NLL_TAG
            value = float(getattr(info, attr))
            if math.isfinite(value):  # the record stores a non-finite value as null; leave a gap likewise
                self._writer.add_scalar(tag, value, global_step=info.epoch)
        # Flushed every epoch: a long run is followed live, and a killed run keeps every epoch it finished.
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_log_dir(base: str | Path, dataset: str, model: str, seed: int, tag: str | None = None) -> Path:
    """``<base>/<dataset>/<model>[/<tag>]/seed<k>``: one event folder per run, laid out like the records, so
    that ``tensorboard --logdir <base>`` shows the runs of a sweep side by side."""
    # run_dir validates the components (no separators, no ".."), so a tag cannot escape <base>.
    return Path(base) / run_dir(".", dataset, model, tag).relative_to("runs") / f"seed{int(seed)}"


def tensorboard_callback(log_dir: str | Path) -> TensorBoardLogger:
    """The callback for ``run_experiment(..., callbacks=[...])``; close it (or use ``with``) after the run.

    Raises:
        FlowbenchError: the tensorboard package is not installed (the message gives the pip command).
    """
    return TensorBoardLogger(log_dir)
