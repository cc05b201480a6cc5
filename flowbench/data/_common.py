"""Shared preprocessing steps of the MAF recipes (Papamakarios et al. 2017, gpapamak/maf ``datasets/``).

Every recipe is numpy-only and computes in float64; the result is cast to float32 at the very end, as
the original code effectively did when feeding Theano/TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from flowbench.errors import DataIntegrityError

Splits = dict[str, np.ndarray]
SPLITS: tuple[str, str, str] = ("train", "val", "test")
#: the label arrays of a labelled dataset (``DatasetSpec.classes`` > 0), one per split, in the order of SPLITS
LABELS: tuple[str, str, str] = ("train_labels", "val_labels", "test_labels")


def label_key(split: str) -> str:
    """``train`` → ``train_labels``."""
    return f"{split}_labels"


def tail_split_sizes(n: int) -> tuple[int, int, int]:
    """MAF's "tail split" sizes: test = int(0.1·N), val = int(0.1·(N − test)), train = the rest."""
    n_test = int(0.1 * n)
    n_val = int(0.1 * (n - n_test))
    return n - n_test - n_val, n_val, n_test


def tail_split(data: np.ndarray) -> Splits:
    """Split rows in file order: the last 10 % are test, the last 10 % of the rest validation."""
    n_train, n_val, _ = tail_split_sizes(data.shape[0])
    return {
        "train": data[:n_train],
        "val": data[n_train : n_train + n_val],
        "test": data[n_train + n_val :],
    }


def maf_split(data: np.ndarray, seed: int = 42, standardize: bool = True) -> Splits:
    """A user's table under the MAF protocol: rows shuffled by ``RandomState(seed)``, :func:`tail_split`, then
    (``standardize``) every split standardised with the mean and standard deviation of train + validation, as
    MAF's POWER, GAS and MINIBOONE recipes do. Float64 in, float64 out (the loader casts and checks)."""
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < 10:
        raise DataIntegrityError(f"maf_split needs a 2-D table of at least 10 rows; got shape {data.shape}")
    data = data[np.random.RandomState(seed).permutation(data.shape[0])]
    splits = tail_split(data)
    if standardize:
        both = np.vstack([splits["train"], splits["val"]])
        mu, s = both.mean(axis=0), safe_std(both, "maf_split", ddof=0)
        splits = {k: (v - mu) / s for k, v in splits.items()}
    return splits


def column_label(columns: Sequence[str] | None, j: int) -> str:
    """``column 3 ('CO')`` when names are known, else ``column 3``."""
    if columns is not None and j < len(columns):
        return f"column {j} ({columns[j]!r})"
    return f"column {j}"


def check_finite(x: np.ndarray, what: str, columns: Sequence[str] | None = None) -> None:
    """Raise :class:`DataIntegrityError` naming the first column holding a NaN or an inf."""
    bad = ~np.isfinite(x).all(axis=0) if x.ndim == 2 else np.array([not np.isfinite(x).all()])
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        col = x[:, j] if x.ndim == 2 else x
        n_nan, n_inf = int(np.isnan(col).sum()), int(np.isinf(col).sum())
        raise DataIntegrityError(
            f"{what}: {column_label(columns, j)} contains {n_nan} NaN and {n_inf} inf values; the raw file "
            "is corrupt or not the MAF archive's — re-fetch it with `flowbench download --force`"
        )


def safe_std(x: np.ndarray, what: str, ddof: int, columns: Sequence[str] | None = None) -> np.ndarray:
    """Column standard deviations; a zero one would turn the column into NaN, so it is an error."""
    s = x.std(axis=0, ddof=ddof)
    zero = ~(s > 0)
    if zero.any():
        j = int(np.flatnonzero(zero)[0])
        raise DataIntegrityError(
            f"{what}: {column_label(columns, j)} has zero variance (every value is {x[0, j]!r}); standardising "
            "it would divide by zero. The raw file is not the expected one — re-fetch it with "
            "`flowbench download --force`"
        )
    return s


def check_splits(name: str, splits: Splits) -> None:
    """Every split is 2-D with the same width, finite, and train has no constant column."""
    widths = {k: splits[k].shape[1] if splits[k].ndim == 2 else None for k in SPLITS}
    if None in widths.values() or len(set(widths.values())) != 1:
        raise DataIntegrityError(f"{name}: prepared splits have inconsistent shapes {widths}")
    for k in SPLITS:
        check_finite(splits[k], f"{name} {k} split")
    train = splits["train"]
    if train.shape[0] > 1:
        const = train.max(axis=0) == train.min(axis=0)
        if const.any():
            j = int(np.flatnonzero(const)[0])
            raise DataIntegrityError(f"{name} train split: column {j} has zero variance")


def refetch_hint(rel: str) -> str:
    """How to replace a corrupt raw file ``rel`` (``power/data.npy``) of the MAF archive."""
    return f"re-fetch it with `flowbench download --dataset {rel.split('/')[0].lower()} --force`"


def load_raw_npy(root: Path, rel: str) -> np.ndarray:
    """``ROOT/rel`` as an array; an unreadable file is a :class:`DataIntegrityError`, not a numpy traceback."""
    path = Path(root) / rel
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataIntegrityError(f"{path} is not a readable .npy file ({e}); {refetch_hint(rel)}") from e


def logit(x: np.ndarray) -> np.ndarray:
    """``log(x / (1 − x))`` as in MAF's ``util.logit``."""
    return np.log(x / (1.0 - x))


def to_float32(splits: Splits) -> Splits:
    """The splits as contiguous float32; any other entry (the label arrays) as it is: :func:`check_labels`
    checks and casts those, so that a float label array is refused rather than truncated."""
    return {k: np.ascontiguousarray(v, dtype=np.float32) if k in SPLITS else v for k, v in splits.items()}


def check_labels(name: str, out: Splits, classes: int) -> Splits:
    """Check the label arrays of a recipe's output against its spec's ``classes``; they come back as int64.

    A labelled dataset (``classes`` > 0) returns one integer array of shape (N,) per split, N the split's rows,
    values in 0..classes-1; an unlabelled one returns none. Anything else is a :class:`DataIntegrityError`.
    """
    extra = sorted(set(out) - set(SPLITS) - set(LABELS))
    if extra:
        raise DataIntegrityError(
            f"{name}: prepare returned unknown entries {extra}; expected {list(SPLITS)}"
            + (f" and {list(LABELS)}" if classes else "")
        )
    given = [k for k in LABELS if k in out]
    if not classes:
        if given:
            raise DataIntegrityError(
                f"{name}: prepare returned {given}, but the spec declares no classes; "
                "set DatasetSpec.classes to the number of labels"
            )
        return out
    missing = [k for k in LABELS if k not in out]
    if missing:
        raise DataIntegrityError(f"{name}: the spec declares {classes} classes, but prepare returned no {missing}")
    res = dict(out)
    for split, k in zip(SPLITS, LABELS):
        lab = np.asarray(out[k])
        rows = out[split].shape[0]
        if lab.ndim != 1 or lab.shape[0] != rows:
            raise DataIntegrityError(
                f"{name}: {k} has shape {lab.shape}; expected ({rows},), one label per row of the {split} split"
            )
        if lab.dtype.kind not in "iu":  # bool and float labels are a recipe's mistake, not something to round
            raise DataIntegrityError(f"{name}: {k} is {lab.dtype}; class labels must be integers")
        if lab.size and (lab.min() < 0 or lab.max() >= classes):
            raise DataIntegrityError(
                f"{name}: {k} holds labels in [{lab.min()}, {lab.max()}]; the spec declares "
                f"{classes} classes (0..{classes - 1})"
            )
        res[k] = np.ascontiguousarray(lab, dtype=np.int64)
    return res
