"""How a dataset declares itself: one :class:`DatasetSpec` named ``SPEC`` at the end of its module.

Everything that needs to know about a dataset reads its spec: the registry (:data:`flowbench.data.DATASETS`),
``flowbench datasets``, the download manifest (which archive members belong to which dataset), the loader
and its processed cache (recipe version, raw files), and :class:`~flowbench.data.base.Dataset`'s image
settings. Nothing else lists datasets or their files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

__all__ = ["DatasetSpec", "ImageSpec"]

#: ``DatasetSpec.source`` of the datasets inside the MAF archive (Zenodo record 1161203).
ARCHIVE = "archive"


@dataclass(frozen=True)
class ImageSpec:
    """Image data modelled in logit space (MAF paper, section 4.3).

    Attributes:
        logit_alpha: α of ``y = logit(α + (1 − 2α)·x)``; pixel-space log-likelihoods are derived from it.
        levels: intensity levels of the discrete image (256 for MNIST); bits/pixel add ``log2(levels)``.
        shape: image shape, its product the dataset's dimension: ``(H, W)`` for grey images (``(28, 28)``),
            ``(C, H, W)`` channel-major for colour ones (CIFAR-10: ``(3, 32, 32)``, a row is R 1024, G 1024,
            B 1024 as in MAF's ``datasets/cifar10.py``).
    """

    logit_alpha: float
    levels: int
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (isinstance(self.logit_alpha, float) and 0.0 < self.logit_alpha < 0.5):
            raise ValueError(f"ImageSpec.logit_alpha must be a float in (0, 0.5); got {self.logit_alpha!r}")
        if not (isinstance(self.levels, int) and self.levels >= 2):
            raise ValueError(f"ImageSpec.levels must be an int ≥ 2; got {self.levels!r}")
        if not (isinstance(self.shape, tuple) and self.shape and all(isinstance(s, int) and s > 0 for s in self.shape)):
            raise ValueError(f"ImageSpec.shape must be a tuple of positive ints; got {self.shape!r}")


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset, declared once.

    Attributes:
        name: registry name (``power``), used on the command line, in configs, record paths and
            ``ROOT/processed/NAME/``; the module is ``flowbench/data/<name>.py``.
        dim: D, the number of columns of every split of the full-size data.
        sizes: rows of the (train, val, test) splits of the full-size data.
        raw_files: the raw files, relative to the data root in the MAF archive's layout
            (``power/data.npy``; archive member ``data/power/data.npy``). Empty for a built-in dataset.
        source: where the raw files come from: ``"archive"`` (the MAF archive, fetched by
            ``flowbench download``) or a description of any other source: a bundled one without raw files
            (``"scikit-learn (bundled)"``), or a user's own files under the data root, placed there by hand.
        description: one line for ``flowbench datasets``.
        recipe_version: bump it whenever ``prepare`` changes its output, so that processed caches are rebuilt.
        prepare: ``prepare(root) -> {"train", "val", "test"}``: 2-D arrays (float64 is fine; the loader
            casts them to float32 and checks them), plus the label arrays where ``classes`` > 0.
        image: logit-space image settings, or None for tabular data.
        classes: number of class labels (0: unlabelled). A labelled dataset's ``prepare`` also returns
            ``train_labels``, ``val_labels``, ``test_labels``: integer arrays of shape (N,) in 0..classes-1,
            aligned with the rows of their split (MAF's ``data.trn.labels`` …).
    """

    name: str
    dim: int
    sizes: tuple[int, int, int]
    raw_files: tuple[str, ...]
    source: str
    description: str
    recipe_version: int
    prepare: Callable[[Path], dict[str, np.ndarray]]
    image: ImageSpec | None = None
    classes: int = 0

    def __post_init__(self) -> None:
        def bad(what: str) -> ValueError:
            return ValueError(f"DatasetSpec {self.name!r}: {what}")

        if not (isinstance(self.name, str) and self.name.isidentifier() and self.name == self.name.lower()):
            raise bad("name must be a lower-case identifier (it names the module and the cache folder)")
        if not (isinstance(self.dim, int) and self.dim > 0):
            raise bad(f"dim must be a positive int; got {self.dim!r}")
        if not (
            isinstance(self.sizes, tuple)
            and len(self.sizes) == 3
            and all(isinstance(n, int) and n > 0 for n in self.sizes)
        ):
            raise bad(f"sizes must be three positive ints (train, val, test); got {self.sizes!r}")
        if not isinstance(self.raw_files, tuple) or not all(isinstance(f, str) for f in self.raw_files):
            raise bad(f"raw_files must be a tuple of str; got {self.raw_files!r}")
        for f in self.raw_files:
            p = PurePosixPath(f)
            # the download manifest maps these to archive members: they must stay inside the data root
            if p.is_absolute() or ".." in p.parts or len(p.parts) < 2 or str(p) != f:
                raise bad(f"raw file {f!r} must be a normalised relative path FOLDER/FILE under the data root")
        if not (isinstance(self.source, str) and self.source):
            raise bad("source must be a non-empty str")
        if self.source == ARCHIVE and not self.raw_files:
            raise bad('source "archive" goes with raw files (a bundled source has none)')
        if not (isinstance(self.recipe_version, int) and self.recipe_version >= 1):
            raise bad(f"recipe_version must be an int ≥ 1; got {self.recipe_version!r}")
        if not callable(self.prepare):
            raise bad("prepare must be callable")
        if self.image is not None:
            if not isinstance(self.image, ImageSpec):
                raise bad(f"image must be an ImageSpec or None; got {self.image!r}")
            if math.prod(self.image.shape) != self.dim:
                raise bad(f"image shape {self.image.shape} has {math.prod(self.image.shape)} pixels, dim is {self.dim}")
        # bool is an int subclass: classes=True would silently mean one class
        if not (isinstance(self.classes, int) and not isinstance(self.classes, bool) and self.classes >= 0):
            raise bad(f"classes must be an int ≥ 0 (0: unlabelled); got {self.classes!r}")

    @property
    def builtin(self) -> bool:
        """No raw files to download: the data ships with a dependency."""
        return not self.raw_files

    @property
    def logit_alpha(self) -> float | None:
        return self.image.logit_alpha if self.image else None

    @property
    def levels(self) -> int | None:
        return self.image.levels if self.image else None
