"""The dataset object every loader returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Dataset:
    """Train/validation/test splits of one prepared dataset (float32 arrays of shape (N, D)).

    ``logit_alpha``, ``levels`` and ``image_shape`` are set for image data modelled in logit space (MNIST,
    digits; from the dataset's :class:`~flowbench.data.spec.ImageSpec`): the pixel-space log-likelihood and
    bits/pixel are derived from them (MAF paper, section 4.3). ``image_shape`` is ``(H, W)``, or ``(C, H, W)``
    channel-major for colour images (CIFAR-10).

    A labelled dataset (``classes`` > 0: MNIST, digits, CIFAR-10) carries one int64 label per row of each
    split in ``train_labels``, ``val_labels``, ``test_labels`` (None when unlabelled), aligned with the rows.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    logit_alpha: float | None = None
    levels: int | None = None
    meta: dict = field(default_factory=dict)
    image_shape: tuple[int, ...] | None = None
    classes: int = 0
    train_labels: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])

    @property
    def image(self) -> bool:
        return self.logit_alpha is not None

    def labels(self, split: str) -> np.ndarray:
        """The int64 labels of ``split`` (``train``, ``val`` or ``test``); ConfigError if there are none."""
        from flowbench.errors import ConfigError

        if split not in ("train", "val", "test"):
            raise ConfigError(f"unknown split {split!r}; expected train, val or test")
        lab = getattr(self, f"{split}_labels")
        if not self.classes or lab is None:
            raise ConfigError(f"dataset {self.name} has no class labels (labelled datasets: mnist, digits, cifar10)")
        return lab

    def one_hot(self, split: str) -> np.ndarray:
        """The labels of ``split`` one-hot encoded: float32 (N, classes), as MAF's ``util.one_hot_encode``
        (whose ``y`` conditions MAF's conditional models)."""
        lab = self.labels(split)
        y = np.zeros((lab.shape[0], self.classes), dtype=np.float32)
        y[np.arange(lab.shape[0]), lab] = 1.0
        return y

    def pixel_log_prob(self, log_prob_logit: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-example log-likelihood in pixel space [0, 1)^D from the logit-space one.

        ``log p_pixel = log p_logit + D·log(1 − 2α) − Σ (log s + log(1 − s))`` with ``s = sigmoid(y)``
        (change of variables through the logit transform).
        """
        if self.logit_alpha is None:
            raise ValueError(f"{self.name} is not modelled in logit space")
        y = np.asarray(y, dtype=np.float64)
        # log s + log(1 - s) = -softplus(-y) - softplus(y), stable for large |y|
        log_s = -np.logaddexp(0.0, -y)
        log_1ms = -np.logaddexp(0.0, y)
        d = y.shape[1]
        return (
            np.asarray(log_prob_logit, np.float64) + d * math.log(1 - 2 * self.logit_alpha) - (log_s + log_1ms).sum(1)
        )

    def bits_per_pixel(self, log_prob_pixel: np.ndarray | float) -> np.ndarray | float:
        """``−log p_pixel / (D ln 2) + log2(levels)``: bits per pixel of the discrete image (8 for 256 levels)."""
        if self.levels is None:
            raise ValueError(f"{self.name} has no pixel levels")
        return -np.asarray(log_prob_pixel) / (self.dim * math.log(2)) + math.log2(self.levels)
