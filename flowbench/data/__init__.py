"""Datasets: the registry, ``load_dataset`` and the processed cache.

The seven datasets of the MAF paper (Papamakarios et al. 2017), preprocessed exactly as its code does (see
each module's docstring), plus ``digits`` (scikit-learn's bundled 8×8 digits; no download) so that everything
runs offline. Raw files live under ``ROOT`` in the layout of the MAF archive (``ROOT/power/data.npy``, …);
``flowbench download`` puts them there.

Each dataset module ends with ``SPEC = DatasetSpec(...)`` (:mod:`flowbench.data.spec`): its one declaration,
read by everything else. Adding a dataset = one module ``flowbench/data/<name>.py`` plus one line in
:data:`_MODULES`.

Example::

    from flowbench.data import load_dataset
    ds = load_dataset("digits")          # no download needed
    ds.train.shape, ds.dim               # ((1457, 64), 64)
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

from flowbench.data import cache
from flowbench.data._common import LABELS, check_labels, check_splits, maf_split, tail_split, to_float32
from flowbench.data.base import Dataset
from flowbench.data.spec import ARCHIVE, DatasetSpec, ImageSpec
from flowbench.errors import ConfigError, DataIntegrityError, DatasetNotFoundError
from flowbench.plugins import Origin, Registry

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetSpec",
    "ImageSpec",
    "check_root",
    "dataset_origin",
    "default_root",
    "download_command",
    "get_info",
    "load_dataset",
    "maf_split",
    "prepare_dataset",
    "status",
    "tail_split",
]

# The registry: one line per dataset, in the order of the MAF paper's tables.
_MODULES: tuple[str, ...] = (
    "power",
    "gas",
    "hepmass",
    "miniboone",
    "bsds300",
    "mnist",
    "cifar10",
    "digits",
)


def _register(modules: tuple[str, ...]) -> dict[str, DatasetSpec]:
    out: dict[str, DatasetSpec] = {}
    for m in modules:
        spec = getattr(importlib.import_module(f"{__name__}.{m}"), "SPEC", None)
        if not isinstance(spec, DatasetSpec):
            raise TypeError(f"flowbench/data/{m}.py must end with SPEC = DatasetSpec(...)")
        if spec.name != m or m in out:  # one file per dataset, named for it
            raise ValueError(f"flowbench/data/{m}.py declares the dataset {spec.name!r}; name it {m!r}")
        out[m] = spec
    return out


def _coerce(obj: object, ref: str) -> DatasetSpec:
    """A loaded object as a DatasetSpec: the spec itself, or a function without arguments returning one."""
    if callable(obj) and not isinstance(obj, (DatasetSpec, type)):
        try:
            obj = obj()
        except TypeError as e:
            raise ConfigError(
                f"dataset {ref!r}: calling it to get its spec failed ({e}); point at a DatasetSpec or "
                "a function without arguments that returns one"
            ) from e
        except Exception as e:
            raise ConfigError(f"dataset {ref!r}: calling it to get its spec failed: {type(e).__name__}: {e}") from e
    if not isinstance(obj, DatasetSpec):
        raise ConfigError(
            f"dataset {ref!r} is a {type(obj).__name__}, not a dataset: point at a "
            "flowbench.data.DatasetSpec (or a function returning one); see the tutorial in docs/"
        )
    return obj


#: name → :class:`DatasetSpec`: the built-ins, then installed plugins (entry-point group ``flowbench.datasets``).
DATASETS = Registry("dataset", "flowbench.datasets", _register(_MODULES), _coerce)

ENV_VAR = "FLOWBENCH_DATA"


def default_root() -> Path:
    """``$FLOWBENCH_DATA`` if set, else ``data`` (relative to the working directory)."""
    return Path(os.environ.get(ENV_VAR) or "data")


def check_root(root: str | Path | None, *, create: bool = False) -> Path:
    """The data root as a Path (``None`` → :func:`default_root`), refusing one that cannot be a folder.

    Raises:
        ConfigError: ``root`` is a file, or lies under one; with ``create``, it cannot be created or written.
    """
    root = Path(root) if root is not None else default_root()
    how = "give a folder (--root, --data-root or $FLOWBENCH_DATA)"
    if root.exists() and not root.is_dir():
        raise ConfigError(f"data root {root} is a file, not a folder; {how}")
    if not root.exists():
        parent = next((p for p in root.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ConfigError(f"data root {root} cannot be created: {parent} is a file; {how}")
    if create:
        import tempfile

        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=root):
                pass
        except OSError as e:
            raise ConfigError(f"data root {root} cannot be created or written ({e.strerror or e}); {how}") from e
    return root


def get_info(name: str) -> DatasetSpec:
    """The spec of a registered dataset, a plugin's, or a reference ``module:ATTR`` / ``file.py:ATTR``;
    ConfigError listing the registered names if it is unknown, or saying what is wrong with the reference."""
    return DATASETS.resolve(name)[0]


def dataset_origin(name: str) -> Origin:
    """Where the spec of ``name`` (name or reference) comes from: built-in, plugin, module or file."""
    return DATASETS.resolve(name)[1]


def download_command(name: str, root: Path) -> str:
    """The exact command that fetches ``name`` into ``root``."""
    cmd = f"flowbench download --dataset {name}"
    if Path(root) != default_root():
        cmd += f" --root {root}"
    return cmd


def _fetch_hint(spec: DatasetSpec, root: Path) -> str:
    """How to get missing raw files: ``flowbench download`` for the MAF archive's, the spec's source otherwise."""
    if spec.source == ARCHIVE:
        return f"Fetch it with: {download_command(spec.name, root)}"
    return f"Put the files there (their source: {spec.source}), or pass the folder that holds them as the data root"


def _dataset(spec: DatasetSpec, splits: dict, meta: dict) -> Dataset:
    labels = {k: splits[k] for k in LABELS if k in splits} if spec.classes else {}
    return Dataset(
        name=spec.name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        logit_alpha=spec.logit_alpha,
        levels=spec.levels,
        image_shape=spec.image.shape if spec.image else None,
        meta=meta,
        classes=spec.classes,
        **labels,
    )


def _missing_raw(spec: DatasetSpec, root: Path) -> list[Path]:
    return [root / f for f in spec.raw_files if not (root / f).is_file()]


def prepare_dataset(name: str, root: str | Path | None = None, *, write_cache: bool = True) -> Dataset:
    """Run the recipe on the raw files under ``root`` (always, ignoring any cache) and write the cache."""
    spec = get_info(name)
    name = spec.name  # a reference resolves to its spec: the cache is named for the spec
    root = check_root(root)
    missing = _missing_raw(spec, root)
    if missing:
        raise DatasetNotFoundError(
            f"dataset {name!r} is not in {root}: missing {', '.join(map(str, missing))}. {_fetch_hint(spec, root)}"
        )
    out = spec.prepare(root)
    missing = [k for k in ("train", "val", "test") if not isinstance(out, dict) or k not in out]
    if missing:
        raise DataIntegrityError(f"{name}: prepare returned no {missing}; it must return a dict of the splits")
    # labels are checked (and cast to int64) before anything touches rows, so a misaligned array is named
    splits = check_labels(name, to_float32(out), spec.classes)
    check_splits(name, splits)  # D is not enforced: small test fixtures have fewer columns
    meta: dict = {"recipe_version": spec.recipe_version, "root": str(root)}
    if spec.builtin or not write_cache:
        return _dataset(spec, splits, meta)
    sources = {f: cache.fingerprint(root / f) for f in spec.raw_files}
    try:
        manifest = cache.write(root, name, splits, spec.recipe_version, sources, classes=spec.classes)
    except OSError as e:  # read-only data root: still usable, just not cached
        warnings.warn(
            f"could not write the processed cache for {name} under {root} ({e}); using it in memory", stacklevel=2
        )
        return _dataset(spec, splits, meta)
    state = cache.check(root, name, spec.recipe_version, spec.classes)
    if state.kind != "ok":  # changed under our feet (another process?): the arrays in memory are right
        warnings.warn(
            f"the processed cache of {name} just written under {root} does not check ({state.reason}); "
            "using the prepared data in memory",
            stacklevel=2,
        )
        return _dataset(spec, splits, meta)
    return _dataset(spec, state.splits, {**meta, "cache": str(cache.cache_dir(root, name)), "manifest": manifest})


def load_dataset(name: str, root: str | Path | None = None) -> Dataset:
    """Load a prepared dataset: memory-mapped from the processed cache, else prepared from the raw files.

    A broken cache (truncated, overwritten, unreadable; see :mod:`flowbench.data.cache`) is rebuilt from the
    raw files with a warning saying what was wrong; nothing is downloaded.

    Args:
        name: one of :data:`DATASETS` (``power, gas, hepmass, miniboone, bsds300, mnist, cifar10, digits``).
        root: data root; ``None`` → ``$FLOWBENCH_DATA`` or ``data``.

    Raises:
        ConfigError: unknown name, or a data root that is a file. DatasetNotFoundError: raw files missing
        (also when the cache is broken; the message has the download command). DataIntegrityError: NaN/inf,
        zero-variance column or malformed raw file.
    """
    key, spec = name, get_info(name)
    name = spec.name  # a reference resolves to its spec: the cache is named for the spec
    root = check_root(root)
    if not spec.builtin:
        state = cache.check(root, name, spec.recipe_version, spec.classes)
        if state.kind == "ok":
            meta = {
                "recipe_version": spec.recipe_version,
                "root": str(root),
                "cache": str(cache.cache_dir(root, name)),
                "manifest": state.manifest,
            }
            return _dataset(spec, state.splits, meta)
        if state.kind == "broken":
            where = cache.cache_dir(root, name)
            missing = _missing_raw(spec, root)
            if missing:
                raise DatasetNotFoundError(
                    f"the processed cache of {name!r} in {where} is broken ({state.reason}) and cannot be rebuilt: "
                    f"its raw files are missing ({', '.join(map(str, missing))}). "
                    f"{_fetch_hint(spec, root)}"
                )
            warnings.warn(
                f"the processed cache of {name!r} in {where} is broken ({state.reason}); "
                f"rebuilding it from the raw files in {root}",
                stacklevel=2,
            )
    return prepare_dataset(key, root)


def status(name: str, root: str | Path | None = None) -> str:
    """``built-in``, ``prepared``, ``broken (REASON)``, ``raw`` (files present, cache not built or stale) or
    ``missing``."""
    spec = get_info(name)
    name = spec.name  # a reference resolves to its spec: the cache is named for the spec
    root = check_root(root)
    if spec.builtin:
        return "built-in"
    state = cache.check(root, name, spec.recipe_version, spec.classes)
    if state.kind == "ok":
        return "prepared"
    if state.kind == "broken":
        return f"broken ({state.reason}{'; raw files missing' if _missing_raw(spec, root) else ''})"
    return "missing" if _missing_raw(spec, root) else "raw"
