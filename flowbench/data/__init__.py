"""Datasets: an explicit registry, ``load_dataset`` and the processed cache.

Six datasets of the MAF paper (Papamakarios et al. 2017), preprocessed exactly as its code does (see each
module's docstring), plus ``digits`` (scikit-learn's bundled 8×8 digits; no download) so that everything
runs offline. Raw files live under ``ROOT`` in the layout of the MAF archive (``ROOT/power/data.npy``, …);
``flowbench download`` puts them there. Adding a dataset = one module exposing ``RECIPE_VERSION``,
``RAW_FILES`` and ``prepare(root) -> {"train", "val", "test"}`` plus one line in :data:`DATASETS`.

Example::

    from flowbench.data import load_dataset
    ds = load_dataset("digits")          # no download needed
    ds.train.shape, ds.dim               # ((1457, 64), 64)
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from flowbench.data import cache
from flowbench.data._common import check_splits, to_float32
from flowbench.data.base import Dataset
from flowbench.errors import ConfigError, DatasetNotFoundError

__all__ = ["DATASETS", "DatasetInfo", "Dataset", "default_root", "load_dataset", "prepare_dataset", "status"]


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows without reading any data: module, dimension, split sizes, raw files."""

    name: str
    module: str
    dim: int
    sizes: tuple[int, int, int]  # train, val, test
    raw_files: tuple[str, ...]  # relative to the data root, in the MAF archive's layout
    description: str

    @property
    def builtin(self) -> bool:
        return not self.raw_files

    def load_module(self) -> ModuleType:
        return importlib.import_module(self.module)


def _info(name: str, dim: int, sizes: tuple[int, int, int], raw: tuple[str, ...], desc: str) -> DatasetInfo:
    return DatasetInfo(name, f"flowbench.data.{name}", dim, sizes, raw, desc)


# Explicit registry (sizes: MAF paper table 4 / maf-protocol.md; digits: 1,797 rows tail-split).
DATASETS: dict[str, DatasetInfo] = {
    "power": _info("power", 6, (1_659_917, 184_435, 204_928), ("power/data.npy",), "UCI household power"),
    "gas": _info("gas", 8, (852_174, 94_685, 105_206), ("gas/ethylene_CO.pickle",), "UCI gas sensors (ethylene/CO)"),
    "hepmass": _info(
        "hepmass", 21, (315_123, 35_013, 174_987), ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
        "UCI HEPMASS (signal, mass 1000)",
    ),
    "miniboone": _info("miniboone", 43, (29_556, 3_284, 3_648), ("miniboone/data.npy",), "UCI MiniBooNE"),
    "bsds300": _info(
        "bsds300", 63, (1_000_000, 50_000, 250_000), ("BSDS300/BSDS300.hdf5",), "BSDS300 8×8 patches (63 d)"
    ),
    "mnist": _info("mnist", 784, (50_000, 10_000, 10_000), ("mnist/mnist.pkl.gz",), "MNIST, logit space"),
    "digits": _info("digits", 64, (1_457, 161, 179), (), "sklearn 8×8 digits, logit space (built in)"),
}

ENV_VAR = "FLOWBENCH_DATA"


def default_root() -> Path:
    """``$FLOWBENCH_DATA`` if set, else ``data`` (relative to the working directory)."""
    return Path(os.environ.get(ENV_VAR) or "data")


def get_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None


def download_command(name: str, root: Path) -> str:
    """The exact command that fetches ``name`` into ``root``."""
    cmd = f"flowbench download --dataset {name}"
    if Path(root) != default_root():
        cmd += f" --root {root}"
    return cmd


def _dataset(info: DatasetInfo, module: ModuleType, splits: dict, meta: dict) -> Dataset:
    return Dataset(
        name=info.name, train=splits["train"], val=splits["val"], test=splits["test"],
        logit_alpha=getattr(module, "LOGIT_ALPHA", None), levels=getattr(module, "LEVELS", None), meta=meta,
    )


def prepare_dataset(name: str, root: str | Path | None = None, *, write_cache: bool = True) -> Dataset:
    """Run the recipe on the raw files under ``root`` (always, ignoring any cache) and write the cache."""
    info = get_info(name)
    root = Path(root) if root is not None else default_root()
    missing = [f for f in info.raw_files if not (root / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset {name!r} is not in {root}: missing {', '.join(str(root / f) for f in missing)}. "
            f"Fetch it with: {download_command(name, root)}"
        )
    module = info.load_module()
    splits = to_float32(module.prepare(root))
    check_splits(name, splits)  # D is not enforced: small test fixtures have fewer columns
    meta: dict = {"recipe_version": module.RECIPE_VERSION, "root": str(root)}
    if info.builtin or not write_cache:
        return _dataset(info, module, splits, meta)
    sources = {f: cache.fingerprint(root / f) for f in info.raw_files}
    try:
        manifest = cache.write(root, name, splits, module.RECIPE_VERSION, sources)
    except OSError as e:  # read-only data root: still usable, just not cached
        warnings.warn(f"could not write the processed cache for {name} under {root} ({e}); using it in memory")
        return _dataset(info, module, splits, meta)
    meta = {**meta, "cache": str(cache.cache_dir(root, name)), "manifest": manifest}
    return _dataset(info, module, cache.load(root, name, manifest), meta)


def load_dataset(name: str, root: str | Path | None = None) -> Dataset:
    """Load a prepared dataset: memory-mapped from the processed cache, else prepared from the raw files.

    Args:
        name: one of :data:`DATASETS` (``power, gas, hepmass, miniboone, bsds300, mnist, digits``).
        root: data root; ``None`` → ``$FLOWBENCH_DATA`` or ``data``.

    Raises:
        ConfigError: unknown name. DatasetNotFoundError: raw files missing (message has the download command).
        DataIntegrityError: NaN/inf, zero-variance column or malformed raw file.
    """
    info = get_info(name)
    root = Path(root) if root is not None else default_root()
    if not info.builtin:
        module = info.load_module()
        manifest = cache.read_manifest(root, name)
        if manifest is not None and cache.is_valid(root, name, module.RECIPE_VERSION, manifest):
            meta = {"recipe_version": module.RECIPE_VERSION, "root": str(root), "cache": str(cache.cache_dir(root, name)),
                    "manifest": manifest}
            return _dataset(info, module, cache.load(root, name, manifest), meta)
    return prepare_dataset(name, root)


def status(name: str, root: str | Path | None = None) -> str:
    """``built-in``, ``prepared``, ``raw`` (files present, cache not built) or ``missing``."""
    info = get_info(name)
    root = Path(root) if root is not None else default_root()
    if info.builtin:
        return "built-in"
    if cache.is_valid(root, name, info.load_module().RECIPE_VERSION):
        return "prepared"
    if all((root / f).is_file() for f in info.raw_files):
        return "raw"
    return "missing"
