"""BSDS300: 8×8 monochrome patches of the Berkeley segmentation dataset, as in MAF.

Reproduces gpapamak/maf ``datasets/bsds300.py``: the HDF5 datasets ``train``, ``validation`` and ``test`` are
taken as stored (63 dimensions: the 64th pixel of each patch was dropped upstream because it is minus the
sum of the others). No further preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowbench.data._common import Splits
from flowbench.data.spec import ARCHIVE, DatasetSpec
from flowbench.errors import DataIntegrityError

KEYS = {"train": "train", "val": "validation", "test": "test"}


def prepare(root: Path) -> Splits:
    import h5py  # imported here: only this dataset needs it

    path = Path(root) / SPEC.raw_files[0]
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataIntegrityError(
            f"{path} is not a readable HDF5 file ({e}); re-fetch it with `flowbench download --dataset bsds300 --force`"
        ) from e
    with f:
        missing = [k for k in KEYS.values() if k not in f]
        if missing:
            raise DataIntegrityError(f"{path} lacks the HDF5 dataset(s) {missing}; found {list(f.keys())}")
        return {k: np.asarray(f[key][:], dtype=np.float32) for k, key in KEYS.items()}


SPEC = DatasetSpec(
    name="bsds300",
    dim=63,
    sizes=(1_000_000, 50_000, 250_000),  # MAF paper; val and test unverified
    raw_files=("BSDS300/BSDS300.hdf5",),
    source=ARCHIVE,
    description="BSDS300 8×8 patches (63 d)",
    recipe_version=1,
    prepare=prepare,
)
