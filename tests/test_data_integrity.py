"""Nothing on disk is trusted blindly: a corrupted processed cache, a data root that is a file, malicious or
junk raw files. Each fault is simulated on a copy of the fixtures."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from flowbench import cli
from flowbench.data import DATASETS, cache, load_dataset, status
from flowbench.errors import ConfigError, DataIntegrityError, DatasetNotFoundError, UnsafePickleError

RAW = Path(__file__).resolve().parent / "fixtures" / "raw"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    shutil.copytree(RAW, tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def prepared(root: Path) -> tuple[Path, np.ndarray]:
    """A root with POWER prepared, and its train split as the recipe makes it."""
    train = np.array(load_dataset("power", root).train)
    return root, train


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:100])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _overwrite_bytes(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[-24:-8] = b"\x7f" * 16  # inside the data, not the header: same size, still a valid .npy
    p.write_bytes(bytes(b))


def _nan_same_shape(p: Path) -> None:
    np.save(p, np.full_like(np.load(p), np.nan))


def _garbage_header(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[:10] = b"not an npy"
    p.write_bytes(bytes(b))


FAULTS = {
    "truncated": (_truncate, r"train\.npy has 100 bytes, the manifest says \d+"),
    "emptied": (_empty, r"train\.npy has 0 bytes, the manifest says \d+"),
    "bytes overwritten": (_overwrite_bytes, r"train\.npy was modified: its SHA-256 differs"),
    "NaN of the right shape": (_nan_same_shape, r"train\.npy was modified: its SHA-256 differs"),
    "header overwritten": (_garbage_header, r"train\.npy is not a readable \.npy file"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_broken_cache_is_reported_and_rebuilt_from_raw(prepared, fault: str, capsys):
    root, train = prepared
    corrupt, why = FAULTS[fault]
    npy = root / "processed" / "power" / "train.npy"
    size = npy.stat().st_size
    corrupt(npy)
    if fault in ("bytes overwritten", "NaN of the right shape", "header overwritten"):
        assert npy.stat().st_size == size  # only the content hash can tell
    st = status("power", root)
    assert st.startswith("broken (") and re.search(why, st), st
    assert cli.main(["datasets", "--root", str(root)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("power"))
    assert "broken (" in line
    with pytest.warns(
        UserWarning, match=rf"processed cache of 'power' .* is broken \({why}.*rebuilding it from the raw"
    ):
        ds = load_dataset("power", root)
    np.testing.assert_array_equal(ds.train, train)
    assert status("power", root) == "prepared"
    np.testing.assert_array_equal(load_dataset("power", root).train, train)


@pytest.mark.parametrize("fault", FAULTS)
def test_broken_cache_without_raw_files_asks_for_the_download(prepared, fault: str, monkeypatch):
    root, _ = prepared
    FAULTS[fault][0](root / "processed" / "power" / "train.npy")
    shutil.rmtree(root / "power")
    assert status("power", root).endswith("; raw files missing)")
    with pytest.raises(
        DatasetNotFoundError,
        match=rf"broken \({FAULTS[fault][1]}.*cannot be rebuilt.*"
        rf"flowbench download --dataset power --root {re.escape(str(root))}",
    ):
        load_dataset("power", root)


def test_finite_values_are_checked_when_a_file_is_verified(prepared):
    """A NaN split whose manifest was rewritten to match it (hash and all) is still refused."""
    root, _ = prepared
    d = root / "processed" / "power"
    _nan_same_shape(d / "train.npy")
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["train.npy"]["sha256"] = cache.sha256_file(d / "train.npy")
    (d / "manifest.json").write_text(json.dumps(m))
    assert status("power", root) == "broken (train.npy holds NaN or inf values (first in row 0))"


def test_manifest_unreadable_or_malformed_is_broken(prepared):
    root, _ = prepared
    mpath = root / "processed" / "power" / "manifest.json"
    good = mpath.read_text()
    mpath.write_text('{"format": 2, "recipe')
    assert status("power", root).startswith("broken (manifest.json is unreadable")
    m = json.loads(good)
    del m["files"]
    mpath.write_text(json.dumps(m))
    assert status("power", root).startswith("broken (manifest.json is malformed (KeyError")
    with pytest.warns(UserWarning, match="is broken"):
        load_dataset("power", root)
    assert status("power", root) == "prepared"


def test_cache_of_an_older_format_is_stale_and_rebuilt_silently(prepared, recwarn):
    root, train = prepared
    mpath = root / "processed" / "power" / "manifest.json"
    m = json.loads(mpath.read_text())
    del m["format"]
    mpath.write_text(json.dumps(m))
    assert status("power", root) == "raw"
    np.testing.assert_array_equal(load_dataset("power", root).train, train)
    assert not recwarn.list and status("power", root) == "prepared"


def test_hash_is_checked_once_per_file_change(prepared, monkeypatch):
    """Loads of an unchanged cache do not hash; a file touched since (new stamp) is hashed once."""
    root, train = prepared
    calls = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    for _ in range(3):
        load_dataset("power", root)
    assert calls == []  # first load after writing and later ones trust the recorded stamps
    os.utime(root / "processed" / "power" / "val.npy", ns=(1, 1))  # same bytes, other stamp
    load_dataset("power", root)
    load_dataset("power", root)
    assert calls == ["val.npy"]  # verified, recorded, trusted again
    v = json.loads((root / "processed" / "power" / "verified.json").read_text())
    assert v["val.npy"]["stamp"][1] == 1


def test_split_replaced_by_a_folder_is_broken_and_rebuilt(prepared):
    root, train = prepared
    npy = root / "processed" / "power" / "test.npy"
    npy.unlink()
    npy.mkdir()
    assert status("power", root) == "broken (test.npy is not a regular file)"
    with pytest.warns(UserWarning, match="is broken"):
        load_dataset("power", root)
    assert status("power", root) == "prepared" and npy.is_file()


def test_data_root_that_is_a_file_is_a_clean_error(tmp_path: Path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"data root .*afile is a file, not a folder"):
        load_dataset("power", f)
    assert cli.main(["datasets", "--root", str(f)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    arc = tmp_path / "a.tar.gz"
    arc.write_bytes(b"x")
    for r, why in ((f, "is a file, not a folder"), (f / "sub", "cannot be created: .*afile is a file")):
        argv = ["download", "--root", str(r), "--dataset", "power", "--from-archive", str(arc), "--sha256", "0" * 64]
        assert cli.main(argv) == 2
        assert re.search(why, capsys.readouterr().err)
        assert cli.main(["datasets", "--root", str(r)]) == 2
        capsys.readouterr()


def test_malicious_pickles_are_refused_naming_the_file(root: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'pwned'}",))

    payload = pickle.dumps(Evil(), protocol=2)
    (root / "gas" / "ethylene_CO.pickle").write_bytes(payload)
    with pytest.raises(
        UnsafePickleError, match=rf"^{re.escape(str(root / 'gas/ethylene_CO.pickle'))}: .*(posix|os)\.system"
    ):
        load_dataset("gas", root)
    with gzip.open(root / "mnist" / "mnist.pkl.gz", "wb") as g:
        g.write(payload)
    with pytest.raises(
        UnsafePickleError, match=rf"^{re.escape(str(root / 'mnist/mnist.pkl.gz'))}: .*(posix|os)\.system"
    ):
        load_dataset("mnist", root)
    assert not (root / "pwned").exists()


@pytest.mark.parametrize(
    "rel",
    ["power/data.npy", "miniboone/data.npy", "mnist/mnist.pkl.gz", "hepmass/1000_train.csv", "BSDS300/BSDS300.hdf5"],
)
def test_junk_raw_files_are_data_integrity_errors(root: Path, rel: str):
    name = next(n for n, s in DATASETS.items() if rel in s.raw_files)
    (root / rel).write_bytes(b"\x80\x81junk\xff" * 10)
    with pytest.raises(DataIntegrityError, match=re.escape(str(root / rel))):
        load_dataset(name, root)
