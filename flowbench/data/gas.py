"""GAS: UCI gas sensor array under dynamic gas mixtures (ethylene + CO), as preprocessed in MAF.

Reproduces gpapamak/maf ``datasets/gas.py`` on ``gas/ethylene_CO.pickle`` (a pandas DataFrame, read
without pandas by :mod:`flowbench.data.safe_pickle`):

1. Drop the columns ``Meth``, ``Eth`` and ``Time``.
2. Loop: C = Pearson correlation matrix; B = per row, the number of entries > 0.98 (the diagonal counts,
   negative correlations do not); while any B > 1, drop the **first** column with B > 1 and recompute.
3. Standardise the **whole table** (test rows included) with its mean and std, **ddof=1** (pandas' default).
4. Tail split in the file's row order (no shuffle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowbench.data._common import Splits, check_finite, safe_std, tail_split
from flowbench.data.safe_pickle import Frame, load_dataframe_pickle
from flowbench.data.spec import ARCHIVE, DatasetSpec
from flowbench.errors import DataIntegrityError

DROP = ("Meth", "Eth", "Time")
THRESHOLD = 0.98


def drop_correlated(data: np.ndarray, columns: list[str]) -> tuple[np.ndarray, list[str]]:
    """MAF's ``load_data_and_clean`` loop: repeatedly drop the first column correlated > 0.98 with another."""
    columns = list(columns)
    while True:
        c = np.corrcoef(data, rowvar=False)
        b = (c > THRESHOLD).sum(axis=1)
        if not (b > 1).any():
            return data, columns
        j = int(np.flatnonzero(b > 1)[0])
        data = np.delete(data, j, axis=1)
        del columns[j]


def transform(frame: Frame) -> tuple[Splits, list[str]]:
    """The recipe; returns the splits and the names of the kept columns."""
    columns = list(frame.columns)
    missing = [c for c in DROP if c not in columns]
    if missing:
        raise DataIntegrityError(f"gas pickle lacks the column(s) {missing}; its columns are {columns}")
    keep = [j for j, c in enumerate(columns) if c not in DROP]
    data = frame.values[:, keep]
    columns = [columns[j] for j in keep]
    check_finite(data, "gas/ethylene_CO.pickle", columns)
    safe_std(data, "gas/ethylene_CO.pickle", ddof=1, columns=columns)  # a constant column has NaN correlations
    data, columns = drop_correlated(data, columns)
    data = (data - data.mean(axis=0)) / data.std(axis=0, ddof=1)  # whole table, as the original
    return tail_split(data), columns


def prepare(root: Path) -> Splits:
    path = Path(root) / SPEC.raw_files[0]
    frame = load_dataframe_pickle(path.read_bytes(), source=str(path))
    return transform(frame)[0]


SPEC = DatasetSpec(
    name="gas",
    dim=8,
    sizes=(852_174, 94_685, 105_206),  # train, val, test of the MAF paper
    raw_files=("gas/ethylene_CO.pickle",),
    source=ARCHIVE,
    description="UCI gas sensors (ethylene/CO)",
    recipe_version=1,
    prepare=prepare,
)
