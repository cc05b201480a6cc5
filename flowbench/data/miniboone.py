"""MINIBOONE: UCI MiniBooNE particle identification, as preprocessed in MAF.

Reproduces gpapamak/maf ``datasets/miniboone.py``: the archive's ``data.npy`` (36,488 × 43, float64) is
already cleaned; tail split in file order, then standardise every split with the mean and std of
train+val (numpy, ddof=0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowbench.data._common import Splits, check_finite, safe_std, tail_split
from flowbench.errors import DataIntegrityError

RECIPE_VERSION = 1
RAW_FILES = ("miniboone/data.npy",)


def transform(data: np.ndarray) -> Splits:
    check_finite(data, "miniboone/data.npy")
    splits = tail_split(data)
    trval = data[: splits["train"].shape[0] + splits["val"].shape[0]]
    mu = trval.mean(axis=0)
    s = safe_std(trval, "miniboone train+val", ddof=0)
    return {k: (v - mu) / s for k, v in splits.items()}


def prepare(root: Path) -> Splits:
    data = np.load(Path(root) / RAW_FILES[0], allow_pickle=False)
    if data.ndim != 2:
        raise DataIntegrityError(f"miniboone/data.npy has shape {data.shape}, expected (N, 43)")
    return transform(np.asarray(data, dtype=np.float64))
