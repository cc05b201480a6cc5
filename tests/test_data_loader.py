"""Registry, load_dataset, the processed cache and the `flowbench datasets` table."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from flowbench import cli
from flowbench.data import DATASETS, cache, default_root, load_dataset
from flowbench.errors import ConfigError, DataIntegrityError, DatasetNotFoundError

RAW = Path(__file__).resolve().parent / "fixtures" / "raw"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    shutil.copytree(RAW, tmp_path / "data")
    return tmp_path / "data"


def test_registry_attributes_others_use():
    assert DATASETS["hepmass"].dim == 21 and DATASETS["hepmass"].sizes == (315_123, 35_013, 174_987)
    assert DATASETS["digits"].builtin and not DATASETS["power"].builtin
    assert DATASETS["gas"].raw_files == ("gas/ethylene_CO.pickle",)


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigError, match=re.escape(", ".join(DATASETS))):
        load_dataset("cifar")


def test_default_root_env(monkeypatch):
    monkeypatch.delenv("FLOWBENCH_DATA", raising=False)
    assert default_root() == Path("data")
    monkeypatch.setenv("FLOWBENCH_DATA", "/somewhere")
    assert default_root() == Path("/somewhere")


def test_missing_raw_files_print_the_download_command(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("FLOWBENCH_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match=rf"flowbench download --dataset gas --root {tmp_path}"):
        load_dataset("gas", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("power")
    assert str(e.value).endswith("flowbench download --dataset power")


def test_cache_written_then_memory_mapped(root: Path, monkeypatch):
    first = load_dataset("miniboone", root)
    m = json.loads((root / "processed" / "miniboone" / "manifest.json").read_text())
    assert m["shapes"] == {"train": [41, 43], "val": [4, 43], "test": [5, 43]}
    assert m["recipe_version"] == 1 and m["dtype"] == "float32"
    raw_sha = hashlib.sha256((root / "miniboone" / "data.npy").read_bytes()).hexdigest()
    assert m["sources"]["miniboone/data.npy"]["sha256"] == raw_sha

    # `first` is itself memory-mapped from the new cache: compare with the recipe's own output instead
    expected = DATASETS["miniboone"].prepare(root)["train"].astype(np.float32)
    np.testing.assert_array_equal(first.train, expected)
    monkeypatch.setitem(
        DATASETS,
        "miniboone",
        dataclasses.replace(DATASETS["miniboone"], prepare=lambda r: pytest.fail("cache not used")),
    )
    second = load_dataset("miniboone", root)
    assert isinstance(second.train, np.memmap) and second.train.dtype == np.float32
    np.testing.assert_array_equal(second.train, expected)
    second.train[0, 0] = 1e9  # copy-on-write: the cache on disk is untouched
    assert load_dataset("miniboone", root).train[0, 0] != 1e9


def test_cache_rebuilt_when_raw_or_recipe_changes(root: Path, monkeypatch):
    load_dataset("miniboone", root)
    raw = np.load(root / "miniboone" / "data.npy")
    np.save(root / "miniboone" / "data.npy", raw[:40])  # different size -> stale cache
    assert load_dataset("miniboone", root).train.shape[0] == 40 - 4 - 3
    monkeypatch.setitem(DATASETS, "miniboone", dataclasses.replace(DATASETS["miniboone"], recipe_version=2))
    assert not cache.is_valid(root, "miniboone", 2)  # the cache on disk says recipe 1
    load_dataset("miniboone", root)
    assert cache.read_manifest(root, "miniboone")["recipe_version"] == 2


def test_cache_without_manifest_is_not_used(root: Path):
    load_dataset("power", root)
    (root / "processed" / "power" / "manifest.json").unlink()
    assert not cache.is_valid(root, "power", 1)


def test_cache_survives_deleting_raw_files(root: Path):
    a = load_dataset("power", root).test.copy()
    shutil.rmtree(root / "power")
    np.testing.assert_array_equal(load_dataset("power", root).test, a)


def test_nan_and_constant_column_in_raw_data(root: Path):
    raw = np.load(root / "miniboone" / "data.npy")
    raw[3, 5] = np.inf
    np.save(root / "miniboone" / "data.npy", raw)
    with pytest.raises(DataIntegrityError, match=r"column 5 contains 0 NaN and 1 inf"):
        load_dataset("miniboone", root)
    raw[3, 5] = 0.0
    raw[:, 7] = 2.0
    np.save(root / "miniboone" / "data.npy", raw)
    with pytest.raises(DataIntegrityError, match=r"column 7 has zero variance"):
        load_dataset("miniboone", root)
    assert not (root / "processed" / "miniboone").exists()


def test_bsds300_nan_in_prepared_split_is_refused(root: Path):
    import h5py

    with h5py.File(root / "BSDS300" / "BSDS300.hdf5", "r+") as f:
        f["test"][1, 4] = np.nan
    with pytest.raises(DataIntegrityError, match=r"bsds300 test split: column 4 contains 1 NaN"):
        load_dataset("bsds300", root)


def test_datasets_command_shows_status(root: Path, capsys):
    load_dataset("power", root)
    (root / "gas" / "ethylene_CO.pickle").unlink()
    assert cli.main(["datasets", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and line.split()[0] in DATASETS}
    assert "prepared" in lines["power"] and "17" in lines["power"]
    assert "missing" in lines["gas"] and "852,174" in lines["gas"]
    assert "raw" in lines["hepmass"] and "built-in" in lines["digits"]


# -- class labels -----------------------------------------------------------------------------------------------------
def _labelled(monkeypatch, labels: dict, classes: int = 3) -> None:
    """miniboone's recipe with ``labels`` added and ``classes`` declared."""
    spec = DATASETS["miniboone"]
    monkeypatch.setitem(
        DATASETS,
        "miniboone",
        dataclasses.replace(spec, classes=classes, recipe_version=7, prepare=lambda r: {**spec.prepare(r), **labels}),
    )


def _ok_labels() -> dict:  # the fixture's 41 / 4 / 5 rows
    return {
        "train_labels": np.arange(41) % 3,
        "val_labels": np.array([0, 1, 2, 0], np.int32),
        "test_labels": np.zeros(5, np.uint8),
    }


def test_labels_are_checked_cached_and_returned(root: Path, monkeypatch):
    _labelled(monkeypatch, _ok_labels())
    first = load_dataset("miniboone", root)
    assert first.classes == 3 and first.val_labels.dtype == np.int64 and first.test_labels.tolist() == [0] * 5
    second = load_dataset("miniboone", root)  # from the cache
    assert isinstance(second.train_labels, np.memmap) and second.train_labels.dtype == np.int64
    np.testing.assert_array_equal(second.train_labels, np.arange(41) % 3)
    assert cache.read_manifest(root, "miniboone")["classes"] == 3
    np.testing.assert_array_equal(second.one_hot("val"), np.eye(3, dtype=np.float32)[[0, 1, 2, 0]])


@pytest.mark.parametrize(
    "change, why",
    [
        ({"val_labels": np.array([0, 1, 2])}, r"val_labels has shape \(3,\); expected \(4,\)"),
        ({"val_labels": np.zeros((4, 1), int)}, r"val_labels has shape \(4, 1\)"),
        ({"test_labels": np.zeros(5)}, "test_labels is float64; class labels must be integers"),
        ({"train_labels": np.full(41, 3)}, r"train_labels holds labels in \[3, 3\]; the spec declares 3 classes"),
        ({"train_labels": np.full(41, -1)}, r"labels in \[-1, -1\]"),
        ({"extra": np.zeros(3)}, r"unknown entries \['extra'\]"),
    ],
)
def test_bad_labels_are_refused_clearly(root: Path, monkeypatch, change: dict, why: str):
    _labelled(monkeypatch, {**_ok_labels(), **change})
    with pytest.raises(DataIntegrityError, match=why):
        load_dataset("miniboone", root)
    assert not (root / "processed" / "miniboone").exists()


def test_labels_and_classes_go_together(root: Path, monkeypatch):
    labels = _ok_labels()
    del labels["test_labels"]
    _labelled(monkeypatch, labels)
    with pytest.raises(DataIntegrityError, match=r"declares 3 classes, but prepare returned no \['test_labels'\]"):
        load_dataset("miniboone", root)
    _labelled(monkeypatch, _ok_labels(), classes=0)
    with pytest.raises(DataIntegrityError, match="declares no classes; set DatasetSpec.classes"):
        load_dataset("miniboone", root)


def test_unlabelled_dataset_has_no_labels(root: Path):
    ds = load_dataset("miniboone", root)
    assert ds.classes == 0 and ds.train_labels is None and "classes" in cache.read_manifest(root, "miniboone")
    assert not (root / "processed" / "miniboone" / "train_labels.npy").exists()
    with pytest.raises(ConfigError, match="miniboone has no class labels"):
        ds.one_hot("train")
    with pytest.raises(ConfigError, match="unknown split 'trn'"):
        load_dataset("digits").one_hot("trn")


def test_labelled_datasets_are_declared():
    assert {n: s.classes for n, s in DATASETS.items() if s.classes} == {"mnist": 10, "cifar10": 10, "digits": 10}


def test_datasets_command_shows_labels(root: Path, capsys):
    assert cli.main(["datasets", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("dataset"))
    assert header.split()[:7] == ["dataset", "D", "train", "val", "test", "labels", "status"]
    lines = {line.split()[0]: line for line in out.splitlines() if line and line.split()[0] in DATASETS}
    assert "10 classes" in lines["mnist"] and "10 classes" in lines["cifar10"] and "10 classes" in lines["digits"]
    assert "–" in lines["power"] and "classes" not in lines["power"]
    assert "cifar10/ (6 files)" in lines["cifar10"] and "raw" in lines["cifar10"]


def test_datasets_command_says_where_a_missing_dataset_outside_the_archive_comes_from(tmp_path, capsys, monkeypatch):
    # `flowbench download` fetches MAF's archive only: for another source the note must not send the user there.
    import dataclasses

    from flowbench.data.spec import ARCHIVE

    other = dataclasses.replace(DATASETS["miniboone"], name="mytable", source="my lab's share, /srv/tables")
    other = dataclasses.replace(other, raw_files=("mytable/table.npy",))
    monkeypatch.setitem(DATASETS, "mytable", other)
    assert DATASETS["power"].source == ARCHIVE
    assert cli.main(["datasets", "--root", str(tmp_path)]) == 0
    notes = capsys.readouterr().out.split("\n\n")[-1]
    assert "missing → `flowbench download --dataset NAME" in notes  # the archive's, all missing here
    assert f"mytable missing → not in MAF's archive: put mytable/table.npy under {tmp_path}" in notes
    assert "(its source: my lab's share, /srv/tables)" in notes and "raw →" not in notes
