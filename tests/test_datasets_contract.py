"""The contract every registered dataset keeps, checked over :data:`flowbench.data.DATASETS` (no names pinned).

A new dataset (one module ending with ``SPEC = DatasetSpec(...)`` plus one registry line) is picked up here
automatically; it needs a tiny raw fixture under ``tests/fixtures/raw/`` unless it is built in.
"""

from __future__ import annotations

import importlib
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from flowbench.data import DATASETS, DatasetSpec, ImageSpec, cache, default_root, load_dataset, status
from flowbench.data._common import SPLITS, to_float32
from flowbench.data.download import ARCHIVE_TOP, archive_members

RAW = Path(__file__).resolve().parent / "fixtures" / "raw"

# Fixtures whose width deliberately differs from the real D (their column-dropping steps are exercised on
# fewer/more columns than the real files have); every other fixture must have the full width D.
FIXTURE_WIDTH = {"gas": 4, "hepmass": 26}

NAMES = list(DATASETS)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("contract") / "data"
    shutil.copytree(RAW, r)
    return r


def test_registry_is_keyed_by_spec_name_and_module():
    assert NAMES, "no dataset registered"
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert importlib.import_module(f"flowbench.data.{name}").SPEC is spec  # one file per dataset


@pytest.mark.parametrize("name", NAMES)
def test_spec_attributes_are_present_and_typed(name: str):
    s = DATASETS[name]
    assert isinstance(s, DatasetSpec)
    assert isinstance(s.dim, int) and s.dim > 0
    assert isinstance(s.sizes, tuple) and len(s.sizes) == 3 and all(isinstance(n, int) and n > 0 for n in s.sizes)
    assert isinstance(s.raw_files, tuple) and all(isinstance(f, str) for f in s.raw_files)
    assert isinstance(s.source, str) and s.source and isinstance(s.description, str) and s.description
    assert isinstance(s.recipe_version, int) and s.recipe_version >= 1
    assert callable(s.prepare)
    assert s.builtin is (not s.raw_files)
    if s.image is None:
        assert s.logit_alpha is None and s.levels is None
    else:
        assert isinstance(s.image, ImageSpec) and math.prod(s.image.shape) == s.dim
        assert (s.logit_alpha, s.levels) == (s.image.logit_alpha, s.image.levels)


@pytest.mark.parametrize("name", [n for n in NAMES if not DATASETS[n].builtin])
def test_raw_files_have_fixtures_and_archive_members(name: str):
    spec = DATASETS[name]
    missing = [f for f in spec.raw_files if not (RAW / f).is_file()]
    assert not missing, f"add tiny fixtures in the real format: tests/fixtures/raw/{missing}"
    assert archive_members([spec]) == {f"{ARCHIVE_TOP}/{f}": f for f in spec.raw_files}


@pytest.mark.parametrize("name", NAMES)
def test_recipe_splits_are_deterministic_one_width_and_finite(name: str, root: Path):
    spec = DATASETS[name]
    a, b = spec.prepare(root), spec.prepare(root)
    assert set(a) == set(SPLITS)
    widths = {a[k].shape[1] for k in SPLITS}
    assert all(a[k].ndim == 2 for k in SPLITS) and len(widths) == 1
    for k in SPLITS:
        assert np.isfinite(a[k]).all(), f"{name} {k} split has NaN/inf"
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k])  # bit for bit: same seeds, same order of draws
    want = FIXTURE_WIDTH.get(name, spec.dim)
    assert widths == {want}, f"{name}: fixture width {widths}, expected {want} (D={spec.dim})"
    if spec.builtin:  # real, full-size data
        assert tuple(a[k].shape[0] for k in SPLITS) == spec.sizes


@pytest.mark.parametrize("name", NAMES)
def test_load_round_trips_through_the_cache(name: str, root: Path):
    spec = DATASETS[name]
    expected = to_float32(spec.prepare(root))
    for _ in range(2):  # first load writes the cache, the second memory-maps it
        ds = load_dataset(name, root)
        for k in SPLITS:
            np.testing.assert_array_equal(getattr(ds, k), expected[k])
            assert getattr(ds, k).dtype == np.float32
        assert (ds.logit_alpha, ds.levels) == (spec.logit_alpha, spec.levels)
        assert ds.image_shape == (spec.image.shape if spec.image else None)
    if spec.builtin:
        assert status(name, root) == "built-in" and not cache.cache_dir(root, name).exists()
    else:
        assert status(name, root) == "prepared" and isinstance(ds.train, np.memmap)


def test_declared_d_and_sizes_match_the_real_data():
    """Where real data is prepared under the default root, its D and split sizes are the declared ones."""
    r = default_root()
    real = [n for n in NAMES if DATASETS[n].builtin or status(n, r) == "prepared"]
    if not real:
        pytest.skip(f"no dataset prepared under {r}")
    for name in real:
        ds, spec = load_dataset(name, r), DATASETS[name]
        assert ds.dim == spec.dim and (len(ds.train), len(ds.val), len(ds.test)) == spec.sizes, name


def _spec(**kw) -> DatasetSpec:
    base = {"name": "toy", "dim": 4, "sizes": (8, 1, 1), "raw_files": ("toy/data.npy",), "source": "archive",
            "description": "a toy", "recipe_version": 1, "prepare": lambda root: {}}
    return DatasetSpec(**{**base, **kw})


@pytest.mark.parametrize("kw, why", [
    ({"name": "Toy-2"}, "lower-case identifier"),
    ({"dim": 0}, "dim must be a positive int"),
    ({"sizes": (8, 1)}, "three positive ints"),
    ({"raw_files": ("../etc/passwd",)}, "normalised relative path"),
    ({"raw_files": ("data.npy",)}, "FOLDER/FILE"),
    ({"raw_files": ()}, 'source "archive" goes with raw files'),
    ({"recipe_version": 0}, "recipe_version"),
    ({"prepare": None}, "callable"),
    ({"image": ImageSpec(1e-6, 256, (3, 3))}, "9 pixels, dim is 4"),
])
def test_bad_declarations_are_refused(kw: dict, why: str):
    _spec()  # the base declaration is valid
    with pytest.raises(ValueError, match=why):
        _spec(**kw)
