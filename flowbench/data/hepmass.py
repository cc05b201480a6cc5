"""HEPMASS: UCI HEPMASS, signal events of the mass-1000 files, as preprocessed in MAF.

Reproduces gpapamak/maf ``datasets/hepmass.py`` on ``hepmass/1000_train.csv`` and ``hepmass/1000_test.csv``
(one header row; the first column is the label):

1. Keep the rows with label == 1 in both files and drop the label column; drop the **last** column of the
   test file (the original: "Because the data set is messed up!" — the test file carries one column more,
   and after the drop both files hold the same features, which is checked).
2. Standardise train and test with the train file's mean and std (ddof=1, pandas' default), before any
   column removal.
3. For each train column count how often its **smallest** value occurs; drop the column from train and
   test if that count is > 5. The original calls this count ``max_count`` but takes the first entry of the
   counts sorted by value, i.e. the count of the minimum; reproduced as written, not as named.
4. Validation = the last int(0.1·N_train) rows of train.

The CSVs are parsed with numpy's C parser (``np.loadtxt``, numpy ≥ 1.23), not line by line in Python.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from flowbench.data._common import Splits, check_finite, safe_std
from flowbench.data.spec import ARCHIVE, DatasetSpec
from flowbench.errors import DataIntegrityError

MAX_MIN_COUNT = 5


def read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """Header names and the (rows, columns) float64 values of a HEPMASS CSV."""
    header: list[str] = []
    try:
        with open(path, "r") as f:
            header = [h.strip() for h in f.readline().rstrip("\n").split(",")]
        values = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as e:  # UnicodeDecodeError included: a binary file
        cols = f" with {len(header)} columns" if header else ""
        raise DataIntegrityError(f"{path} is not a numeric CSV{cols}: {e}") from e
    if values.shape[1] != len(header):
        raise DataIntegrityError(f"{path}: header has {len(header)} names but rows have {values.shape[1]} values")
    return header, values


def min_value_counts(x: np.ndarray) -> np.ndarray:
    """Per column, how often its smallest value occurs (MAF's ``max_count``)."""
    return (x == x.min(axis=0)).sum(axis=0)


def transform(train_header: list[str], train: np.ndarray, test_header: list[str], test: np.ndarray) -> Splits:
    train = train[train[:, 0] == 1][:, 1:]
    test = test[test[:, 0] == 1][:, 1:-1]  # label, and the test file's extra last column
    names, test_names = train_header[1:], test_header[1:-1]
    if train.shape[1] != test.shape[1]:
        raise DataIntegrityError(
            f"hepmass: after dropping the label (and the test file's last column) train has {train.shape[1]} "
            f"columns and test {test.shape[1]}; the MAF files differ by exactly one trailing test column"
        )
    if names != test_names:
        warnings.warn(
            f"hepmass: train and test headers differ ({names} vs {test_names}); aligning by position", stacklevel=2
        )
    if train.shape[0] < 2:
        raise DataIntegrityError("hepmass: fewer than 2 signal rows (label == 1) in 1000_train.csv")
    check_finite(train, "hepmass/1000_train.csv (signal rows)", names)
    check_finite(test, "hepmass/1000_test.csv (signal rows)", names)
    mu = train.mean(axis=0)
    s = safe_std(train, "hepmass/1000_train.csv (signal rows)", ddof=1, columns=names)
    train = (train - mu) / s
    test = (test - mu) / s
    keep = min_value_counts(train) <= MAX_MIN_COUNT
    train, test = train[:, keep], test[:, keep]
    n_val = int(0.1 * train.shape[0])
    return {"train": train[: train.shape[0] - n_val], "val": train[train.shape[0] - n_val :], "test": test}


def prepare(root: Path) -> Splits:
    th, tr = read_csv(Path(root) / SPEC.raw_files[0])
    sh, te = read_csv(Path(root) / SPEC.raw_files[1])
    return transform(th, tr, sh, te)


SPEC = DatasetSpec(
    name="hepmass",
    dim=21,
    sizes=(315_123, 35_013, 174_987),  # train, val, test of the MAF paper
    raw_files=("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    source=ARCHIVE,
    description="UCI HEPMASS (signal, mass 1000)",
    recipe_version=1,
    prepare=prepare,
)
