"""The contract every registered dataset keeps, checked over :data:`flowbench.data.DATASETS` (no names pinned).

The checks are :mod:`flowbench.testing`'s, the ones ``flowbench check-dataset`` runs on a user's dataset. A new
dataset (one module ending with ``SPEC = DatasetSpec(...)`` plus one registry line) is picked up here
automatically; it needs a tiny raw fixture under ``tests/fixtures/raw/`` unless it is built in.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest

from flowbench.data import DATASETS, DatasetSpec, ImageSpec, default_root, load_dataset, status
from flowbench.data.download import ARCHIVE_TOP, archive_members
from flowbench.testing import PASS, SKIP, WARN, check_dataset, dataset_check_names

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


@pytest.mark.parametrize("name", [n for n in NAMES if not DATASETS[n].builtin])
def test_raw_files_have_fixtures_and_archive_members(name: str):
    spec = DATASETS[name]
    missing = [f for f in spec.raw_files if not (RAW / f).is_file()]
    assert not missing, f"add tiny fixtures in the real format: tests/fixtures/raw/{missing}"
    assert archive_members([spec]) == {f"{ARCHIVE_TOP}/{f}": f for f in spec.raw_files}


#: check → the reasons for which a registered dataset may skip it; any other skip or a failure fails the test.
MAY_SKIP = {"raw-files": "built in", "sizes": "test fixtures"}
#: checks that may warn: rows shared between splits (real data can repeat rows; the fixtures happen not to).
MAY_WARN = {"overlap"}


@pytest.fixture(scope="module")
def reports(root: Path) -> dict:
    """The kit's report on every dataset (all checks, over the fixtures; built-ins on their real data)."""
    return {name: check_dataset(name, root, fixture=True, width=FIXTURE_WIDTH.get(name)) for name in NAMES}


@pytest.mark.parametrize("check", dataset_check_names())
@pytest.mark.parametrize("name", NAMES)
def test_dataset_contract(name: str, check: str, reports: dict):
    """Spec typed; recipe deterministic (bit for bit), one width (D, or the fixture's), finite, non-empty; the
    declared sizes for built-in (real, full-size) data; float32 loads that round-trip through the cache."""
    res = reports[name][check]
    if res.status == SKIP and MAY_SKIP.get(check, "\0") in res.detail:
        # built-in data are real, so their sizes are always checked; only they have no raw files
        assert DATASETS[name].builtin is (check == "raw-files")
        pytest.skip(f"{name}: {res.detail}")
    allowed = {PASS, WARN} if check in MAY_WARN else {PASS}
    assert res.status in allowed, f"{name} {check}: {res.status} — {res.measured} ({res.bound}): {res.detail}"


def test_fixture_widths_are_checked(reports: dict):
    """The width check holds fixtures to their own width and everything else to D (not vacuous)."""
    for name in NAMES:
        want = FIXTURE_WIDTH.get(name, DATASETS[name].dim)
        assert reports[name]["width"].tolerance == want and reports[name]["width"].figure == want


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
    base = {
        "name": "toy",
        "dim": 4,
        "sizes": (8, 1, 1),
        "raw_files": ("toy/data.npy",),
        "source": "archive",
        "description": "a toy",
        "recipe_version": 1,
        "prepare": lambda root: {},
    }
    return DatasetSpec(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, why",
    [
        ({"name": "Toy-2"}, "lower-case identifier"),
        ({"dim": 0}, "dim must be a positive int"),
        ({"sizes": (8, 1)}, "three positive ints"),
        ({"raw_files": ("../etc/passwd",)}, "normalised relative path"),
        ({"raw_files": ("data.npy",)}, "FOLDER/FILE"),
        ({"raw_files": ()}, 'source "archive" goes with raw files'),
        ({"recipe_version": 0}, "recipe_version"),
        ({"prepare": None}, "callable"),
        ({"image": ImageSpec(1e-6, 256, (3, 3))}, "9 pixels, dim is 4"),
        ({"classes": -1}, "classes must be an int ≥ 0"),
        ({"classes": True}, "classes must be an int ≥ 0"),
        ({"classes": 10.0}, "classes must be an int ≥ 0"),
    ],
)
def test_bad_declarations_are_refused(kw: dict, why: str):
    _spec()  # the base declaration is valid
    with pytest.raises(ValueError, match=why):
        _spec(**kw)
