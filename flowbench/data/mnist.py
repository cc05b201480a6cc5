"""MNIST in logit space, as in MAF (Papamakarios et al. 2017, section 4.3; gpapamak/maf ``datasets/mnist.py``).

``mnist/mnist.pkl.gz`` holds ((x, y), (x, y), (x, y)) for train/val/test (50,000 / 10,000 / 10,000), x in
[0, 1) with values k/256. It is read with the restricted unpickler (numpy arrays only).

1. One ``rng = RandomState(42)`` for all splits, consumed in the order train, val, test:
   ``x = x + rng.rand(*x.shape) / 256`` (uniform dequantisation).
2. ``y = logit(α + (1 − 2α)·x)`` with α = 1e-6. Results are reported in this space; pixel-space values follow
   from :meth:`Dataset.pixel_log_prob`.
3. Class labels (10 classes) are each split's ``y`` of the pickle, unchanged (MAF: ``self.labels = data[1]``).

Rows are processed in chunks to bound memory; legacy ``RandomState.rand`` fills arrays in C order from one
stream, so consecutive chunks draw exactly the numbers one big call would (tested).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from flowbench.data._common import SPLITS, Splits, label_key, logit, refetch_hint
from flowbench.data.safe_pickle import load_numpy_pickle
from flowbench.data.spec import ARCHIVE, DatasetSpec, ImageSpec
from flowbench.errors import DataIntegrityError

LOGIT_ALPHA = 1e-6
LEVELS = 256
SEED = 42


def transform_split(x: np.ndarray, rng: np.random.RandomState, chunk_rows: int = 5000) -> np.ndarray:
    """Dequantise and logit one split, drawing noise row-chunk by row-chunk from ``rng``; float32 out."""
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(0, x.shape[0], chunk_rows):
        xc = np.asarray(x[i : i + chunk_rows], dtype=np.float64)
        xc = xc + rng.rand(*xc.shape) / 256.0
        out[i : i + chunk_rows] = logit(LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * xc)
    return out


def read_pickle(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The ((x, labels), (x, labels), (x, labels)) of train, val, test; x 2-D, labels 1-D, one per row."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # not gzip, or cut short
        raise DataIntegrityError(
            f"{path} is not a readable gzip file ({e}); {refetch_hint('mnist/mnist.pkl.gz')}"
        ) from e
    obj = load_numpy_pickle(raw, source=str(path))
    try:
        parts = tuple((np.asarray(part[0]), np.asarray(part[1])) for part in obj)
        if len(parts) != 3 or any(x.ndim != 2 or y.shape != (x.shape[0],) for x, y in parts):
            raise ValueError
    except (TypeError, ValueError, IndexError):
        raise DataIntegrityError(
            f"{path} is not ((x, y), (x, y), (x, y)) with 2-D x arrays and one label y per "
            f"row; {refetch_hint('mnist/mnist.pkl.gz')}"
        ) from None
    return parts


def prepare(root: Path, chunk_rows: int = 5000) -> Splits:
    parts = read_pickle(Path(root) / SPEC.raw_files[0])
    for k, (x, _) in zip(SPLITS, parts):
        if x.size and (x.min() < 0 or x.max() >= 1):
            raise DataIntegrityError(f"mnist {k} pixels lie in [{x.min()}, {x.max()}], expected [0, 1)")
    rng = np.random.RandomState(SEED)  # one stream: train, then val, then test
    out = {k: transform_split(x, rng, chunk_rows) for k, (x, _) in zip(SPLITS, parts)}
    # the loader checks them (integer, in 0..9, one per row) and casts them to int64
    return {**out, **{label_key(k): y for k, (_, y) in zip(SPLITS, parts)}}


SPEC = DatasetSpec(
    name="mnist",
    dim=784,
    sizes=(50_000, 10_000, 10_000),  # train, val, test of the MAF paper
    raw_files=("mnist/mnist.pkl.gz",),
    source=ARCHIVE,
    description="MNIST, logit space",
    recipe_version=2,  # 2: class labels
    prepare=prepare,
    image=ImageSpec(logit_alpha=LOGIT_ALPHA, levels=LEVELS, shape=(28, 28)),
    classes=10,
)
