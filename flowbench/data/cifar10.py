"""CIFAR-10 in logit space, as in MAF (Papamakarios et al. 2017, section 4.3; gpapamak/maf ``datasets/cifar10.py``,
loaded there as ``CIFAR10(logit=True, flip=True, dequantize=True)``).

``cifar10/data_batch_1`` … ``data_batch_5`` and ``cifar10/test_batch`` are the Python 2 pickles of the CIFAR-10
"python version" (a dict: ``data`` uint8 (10,000, 3,072), channel-major rows R 1,024, G 1,024, B 1,024 of
32 × 32 images; ``labels`` a list of ints 0..9), read with the restricted unpickler
(:func:`~flowbench.data.safe_pickle.load_cifar_batch`).

The recipe, bit for bit as MAF's code computes it (dtypes included):

1. Train = the first ``int(0.9·N)`` rows of batches 1..5 concatenated (45,000 of N = 50,000), val = the rest
   (5,000), test = ``test_batch`` (10,000). One ``rng = RandomState(42)``, consumed train, val, test.
2. Dequantise in float32: ``x = (x + rng.rand(*x.shape).astype(float32)) / 256.0``.
3. Logit in float32: ``y = logit(α + (1 − 2α)·x)``, α = 0.05 (numpy keeps the float32 dtype: the Python
   float constants are rounded to float32).
4. Train only: its horizontal flips appended, ``vstack([y, y_flip])`` (90,000 rows), labels ``hstack([l, l])``.

Rows are processed in chunks to bound memory; legacy ``RandomState.rand`` fills arrays in C order from one
stream and every step is elementwise, so consecutive chunks give exactly what one big call would (tested).

Memory: the prepared set is float32, train 90,000 × 3,072 ≈ 1.1 GB, val 63 MB, test 126 MB (≈ 1.3 GB in
all; the processed cache on disk is the same size and loads memory-mapped). Preparing it holds the raw
uint8 batches (184 MB) and the output; each chunk adds a few tens of MB.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from flowbench.data._common import Splits, refetch_hint
from flowbench.data.safe_pickle import load_cifar_batch
from flowbench.data.spec import ARCHIVE, DatasetSpec, ImageSpec
from flowbench.errors import DataIntegrityError

LOGIT_ALPHA = 0.05
LEVELS = 256
SEED = 42
CHANNELS = 3
TRAIN_FILES = tuple(f"cifar10/data_batch_{i}" for i in range(1, 6))
TEST_FILE = "cifar10/test_batch"


def read_batch(root: Path, rel: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, D), int64 labels (N,)) of one batch file ``ROOT/rel``."""
    path = Path(root) / rel
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataIntegrityError(f"{path} cannot be read ({e.strerror or e}); {refetch_hint(rel)}") from e
    x, labels = load_cifar_batch(raw, source=str(path))
    if x.shape[1] % CHANNELS or math.isqrt(x.shape[1] // CHANNELS) ** 2 != x.shape[1] // CHANNELS:
        raise DataIntegrityError(
            f"{path}: rows of {x.shape[1]} values are not {CHANNELS} square colour planes; {refetch_hint(rel)}"
        )
    return x, labels


def flip(y: np.ndarray) -> np.ndarray:
    """Each channel-major row (R, G, B planes of square images) mirrored left–right (MAF ``_flip_augmentation``)."""
    side = math.isqrt(y.shape[1] // CHANNELS)
    return y.reshape(-1, CHANNELS, side, side)[:, :, :, ::-1].reshape(y.shape[0], -1)


def transform_split(
    x: np.ndarray, rng: np.random.RandomState, *, augment: bool = False, chunk_rows: int = 2000
) -> np.ndarray:
    """Dequantise and logit the uint8 rows ``x`` in float32, noise drawn chunk by chunk from ``rng``; with
    ``augment`` the flipped rows follow the originals (2N rows)."""
    n = x.shape[0]
    out = np.empty((2 * n if augment else n, x.shape[1]), dtype=np.float32)
    for i in range(0, n, chunk_rows):
        xc = x[i : i + chunk_rows]
        # MAF's expressions as written: uint8 + float32 → float32; the Python floats stay weak (float32 math)
        xc = (xc + rng.rand(*xc.shape).astype(np.float32)) / 256.0
        xc = LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * xc
        yc = np.log(xc / (1.0 - xc))  # MAF util.logit, float32 throughout (tested against a transcription)
        out[i : i + len(yc)] = yc
        if augment:
            out[n + i : n + i + len(yc)] = flip(yc)
    return out


def prepare(root: Path, chunk_rows: int = 2000) -> Splits:
    """The three splits (float32) and their labels."""
    root = Path(root)
    parts = [read_batch(root, rel) for rel in TRAIN_FILES]
    widths = {x.shape[1] for x, _ in parts}
    test, test_labels = read_batch(root, TEST_FILE)
    if len(widths | {test.shape[1]}) != 1:
        raise DataIntegrityError(
            f"cifar10 batches under {root} have different row widths "
            f"{sorted(widths | {test.shape[1]})}; {refetch_hint(TEST_FILE)}"
        )
    x = np.concatenate([p[0] for p in parts], axis=0)
    labels = np.concatenate([p[1] for p in parts], axis=0)
    del parts
    split = int(0.9 * x.shape[0])  # MAF: 45,000 of 50,000
    rng = np.random.RandomState(SEED)  # one stream: train, then val, then test
    return {
        "train": transform_split(x[:split], rng, augment=True, chunk_rows=chunk_rows),
        "val": transform_split(x[split:], rng, chunk_rows=chunk_rows),
        "test": transform_split(test, rng, chunk_rows=chunk_rows),
        "train_labels": np.hstack([labels[:split], labels[:split]]),
        "val_labels": labels[split:],
        "test_labels": test_labels,
    }


SPEC = DatasetSpec(
    name="cifar10",
    dim=3_072,
    sizes=(90_000, 5_000, 10_000),  # 45,000 train + their horizontal flips, val, test
    raw_files=(*TRAIN_FILES, TEST_FILE),
    source=ARCHIVE,
    description="CIFAR-10 (train + flips), logit space",
    recipe_version=1,
    prepare=prepare,
    image=ImageSpec(logit_alpha=LOGIT_ALPHA, levels=LEVELS, shape=(CHANNELS, 32, 32)),
    classes=10,
)
