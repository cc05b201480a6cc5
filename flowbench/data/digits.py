"""digits: scikit-learn's bundled 8×8 handwritten digits (1,797 × 64, integer values 0..16), no download.

The embedded real dataset that lets everything run offline. It is treated like MAF's MNIST
(Papamakarios et al. 2017, section 4.3): uniform dequantisation to [0, 1), then the logit transform with
α = 1e-6, so image-space results (pixel log-likelihood, bits/pixel with 17 levels) are derived the same way.

Recipe (one ``RandomState(42)``, draws in this order):
1. ``x = (v + u) / 17`` with ``u = rng.rand(1797, 64)`` (17 levels, so x ∈ [0, 1)).
2. ``y = logit(α + (1 − 2α)·x)``.
3. ``perm = rng.permutation(1797)``; rows reordered by it (sklearn's file is grouped by writer).
4. Tail split as MAF: 1,457 / 161 / 179.

Class labels (10 classes): scikit-learn's ``target``, reordered by the same ``perm`` and split the same way,
so each label stays with its image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowbench.data._common import Splits, label_key, logit, tail_split
from flowbench.data.spec import DatasetSpec, ImageSpec

LOGIT_ALPHA = 1e-6
LEVELS = 17
SEED = 42


def transform(v: np.ndarray, rng: np.random.RandomState, target: np.ndarray | None = None) -> Splits:
    """Dequantise, logit, permute and split integer pixel values ``v`` (N, 64) in 0..16; with ``target``
    (N labels) also the label arrays, permuted and split with their rows."""
    x = (np.asarray(v, dtype=np.float64) + rng.rand(*v.shape)) / LEVELS
    y = logit(LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * x)
    perm = rng.permutation(y.shape[0])
    out = tail_split(y[perm])
    if target is not None:
        out.update({label_key(k): v for k, v in tail_split(np.asarray(target)[perm]).items()})
    return out


def prepare(root: Path | None = None) -> Splits:
    """The three splits in float64 and their labels (the loader casts and checks them)."""
    from sklearn.datasets import load_digits  # bundled file, no network

    d = load_digits()
    return transform(d.data, np.random.RandomState(SEED), d.target)


SPEC = DatasetSpec(
    name="digits",
    dim=64,
    sizes=(1_457, 161, 179),  # 1,797 rows, tail split
    raw_files=(),
    source="scikit-learn (bundled)",
    description="8×8 handwritten digits, logit space",
    recipe_version=2,  # 2: class labels
    prepare=prepare,
    image=ImageSpec(logit_alpha=LOGIT_ALPHA, levels=LEVELS, shape=(8, 8)),
    classes=10,
)
