"""POWER: UCI individual household electric power consumption, as preprocessed in MAF.

Reproduces gpapamak/maf ``datasets/power.py`` (Papamakarios et al. 2017), order of operations included:

1. ``rng = RandomState(42)``; ``rng.shuffle(data)`` (rows, in place).
2. Delete column 3 (global intensity), then column 1 (reactive power): 6 columns remain
   [active power, voltage, sub-metering 1–3, time].
3. Noise from the *same* rng, drawn in the original's order — voltage ``0.01·rand(N,1)``, then gap (active
   power) ``0.001·rand(N,1)``, then sub-metering ``rand(N,3)`` — but added as columns
   [gap, voltage, sm1, sm2, sm3, time(zeros)]. Swapping the draw order changes every number.
4. Tail split. 5. Standardise all splits with mean and std of train+val (numpy, ddof=0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowbench.data._common import Splits, check_finite, load_raw_npy, safe_std, tail_split
from flowbench.data.spec import ARCHIVE, DatasetSpec
from flowbench.errors import DataIntegrityError

SEED = 42


def transform(data: np.ndarray) -> Splits:
    """The recipe on the raw (N, 8) float64 array (modified in place, as the original does)."""
    if data.ndim != 2 or data.shape[1] != 8:
        raise DataIntegrityError(f"power/data.npy has shape {data.shape}, expected (N, 8)")
    check_finite(data, "power/data.npy")
    rng = np.random.RandomState(SEED)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    voltage_noise = 0.01 * rng.rand(n, 1)  # drawn first ...
    gap_noise = 0.001 * rng.rand(n, 1)  # ... but added to column 0
    sm_noise = rng.rand(n, 3)
    data[:, 0:1] += gap_noise
    data[:, 1:2] += voltage_noise
    data[:, 2:5] += sm_noise  # column 5 (time) gets zero noise
    splits = tail_split(data)
    trval = data[: splits["train"].shape[0] + splits["val"].shape[0]]  # train+val are contiguous
    mu = trval.mean(axis=0)
    s = safe_std(trval, "power train+val", ddof=0)
    return {k: (v - mu) / s for k, v in splits.items()}


def prepare(root: Path) -> Splits:
    data = load_raw_npy(root, SPEC.raw_files[0])
    return transform(np.array(data, dtype=np.float64))


SPEC = DatasetSpec(
    name="power",
    dim=6,
    sizes=(1_659_917, 184_435, 204_928),  # train, val, test of the MAF paper
    raw_files=("power/data.npy",),
    source=ARCHIVE,
    description="UCI household power",
    recipe_version=1,
    prepare=prepare,
)
