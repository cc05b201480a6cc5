"""MINIBOONE: UCI MiniBooNE particle identification, as preprocessed in MAF.

Reproduces gpapamak/maf ``datasets/miniboone.py``: the archive's ``data.npy`` (36,488 × 43, float64) is
already cleaned; tail split in file order, then standardise every split with the mean and std of
train+val (numpy, ddof=0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowbench.data._common import Splits, check_finite, load_raw_npy, safe_std, tail_split
from flowbench.data.spec import ARCHIVE, DatasetSpec
from flowbench.errors import DataIntegrityError


def transform(data: np.ndarray) -> Splits:
    check_finite(data, "miniboone/data.npy")
    splits = tail_split(data)
    trval = data[: splits["train"].shape[0] + splits["val"].shape[0]]
    mu = trval.mean(axis=0)
    s = safe_std(trval, "miniboone train+val", ddof=0)
    return {k: (v - mu) / s for k, v in splits.items()}


def prepare(root: Path) -> Splits:
    data = load_raw_npy(root, SPEC.raw_files[0])
    if data.ndim != 2:
        raise DataIntegrityError(f"miniboone/data.npy has shape {data.shape}, expected (N, 43)")
    return transform(np.asarray(data, dtype=np.float64))


SPEC = DatasetSpec(
    name="miniboone",
    dim=43,
    sizes=(29_556, 3_284, 3_648),  # train, val, test of the MAF paper
    raw_files=("miniboone/data.npy",),
    source=ARCHIVE,
    description="UCI MiniBooNE",
    recipe_version=1,
    prepare=prepare,
)
