"""The restricted unpickler: real pandas 1.5.3 pickles (and a 0.x-path variant) decode without pandas, and
CIFAR-10 batches with nothing but numpy's array reconstructor; anything else is refused before it runs."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from flowbench.data.safe_pickle import Frame, load_cifar_batch, load_dataframe_pickle, load_numpy_pickle
from flowbench.errors import DataIntegrityError, UnsafePickleError

FIX = Path(__file__).resolve().parent / "fixtures"


@pytest.mark.parametrize(
    "path",
    [
        "raw/gas/ethylene_CO.pickle",  # pandas 1.5.3, protocol 2: BlockManager(blocks, axes) + _unpickle_block
        "gas_variants/proto5.pickle",  # pandas 1.5.3, protocol 5, RangeIndex
        "gas_variants/pandas0x.pickle",  # the same with pandas 0.x module paths
        "gas_variants/pandas0x_state.pickle",  # 0.14.1–0.x __getstate__ layout with mgr_locs
        "gas_variants/pandas013_state.pickle",  # 0.13 layout: blocks named by items
    ],
)
def test_dataframe_pickles_decode_exactly(path: str):
    t = np.load(FIX / "gas_table.npz")
    frame = load_dataframe_pickle((FIX / path).read_bytes())
    assert frame.columns == [str(c) for c in t["columns"]]
    np.testing.assert_array_equal(frame.values, t["values"])  # int and float blocks placed by mgr_locs


def test_pandas_0x_variant_really_uses_old_module_paths():
    b = (FIX / "gas_variants" / "pandas0x.pickle").read_bytes()
    assert b"pandas.core.internals\nBlockManager" in b and b"pandas.indexes.base\n_new_Index" in b


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_os_system_is_refused_and_not_run(tmp_path: Path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=2)
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system"):
        load_dataframe_pickle(payload)
    with pytest.raises(UnsafePickleError):
        load_numpy_pickle(payload)
    assert not marker.exists()


def test_other_globals_are_refused():
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_numpy_pickle(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1q\x85R.")
    # a class named like a pandas one but from another package is not pandas
    with pytest.raises(UnsafePickleError, match="evil.DataFrame"):
        load_dataframe_pickle(b"\x80\x02cevil\nDataFrame\n)\x81.")
    # pandas names are not allowed when reading MNIST
    with pytest.raises(UnsafePickleError, match="pandas.core.frame.DataFrame"):
        load_numpy_pickle((FIX / "raw" / "gas" / "ethylene_CO.pickle").read_bytes())


def test_non_dataframe_and_garbage():
    with pytest.raises(DataIntegrityError, match="expected a pandas DataFrame"):
        load_dataframe_pickle(pickle.dumps(np.zeros(3)))
    with pytest.raises(DataIntegrityError):
        load_dataframe_pickle(b"not a pickle")


def test_mnist_python2_pickle_with_latin1_fallback():
    obj = load_numpy_pickle(gzip.open(FIX / "raw" / "mnist" / "mnist.pkl.gz").read())
    (xtr, ytr), (xva, _), (xte, _) = obj
    assert xtr.shape == (6, 784) and xva.shape == (2, 784) and xte.shape == (3, 784) and xtr.dtype == np.float32
    np.testing.assert_array_equal(xtr * 256, np.round(xtr * 256))  # values k/256
    assert ytr.dtype == np.int64
    # a Python 3 pickle of arrays loads with the default encoding
    a = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(load_numpy_pickle(pickle.dumps((a, a), protocol=4))[1], a)


# -- CIFAR-10 batches: the narrowest allow-list ---------------------------------------------------------------------
def _batch(changes: dict | None = None) -> dict:
    d = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [3, 0],
        b"data": np.arange(2 * 12, dtype=np.uint8).reshape(2, 12),
        b"filenames": [b"a.png", b"b.png"],
    }
    return {**d, **(changes or {})}


def test_cifar_python2_fixture_and_python3_bytes_keys_decode_alike():
    raw = (FIX / "raw" / "cifar10" / "data_batch_1").read_bytes()
    x, labels = load_cifar_batch(raw)
    ref = pickle.loads(raw, encoding="latin1")  # how MAF reads it (our own fixture: safe here)
    np.testing.assert_array_equal(x, ref["data"])
    assert x.dtype == np.uint8 and labels.dtype == np.int64 and labels.tolist() == ref["labels"]
    # Python 3 writes bytes keys (through _codecs.encode at protocol 2); str keys load the same
    for d in (_batch(), {k.decode(): v for k, v in _batch().items()}):
        x, labels = load_cifar_batch(pickle.dumps(d, protocol=2))
        np.testing.assert_array_equal(x, _batch()[b"data"])
        assert labels.tolist() == [3, 0]


def test_cifar_batch_smuggling_code_is_refused_and_not_run(tmp_path: Path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_batch({b"batch_label": _Evil(marker)}), protocol=2)
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system"):
        load_cifar_batch(payload, source="cifar10/data_batch_1")
    assert not marker.exists()


@pytest.mark.parametrize(
    "value, why",
    [
        (Frame(["a"], np.zeros((1, 1))), r"flowbench\.data\.safe_pickle\.Frame"),  # an object of another class
        (np.float64(1.5), r"numpy\..*scalar"),  # numpy scalars: allowed for MNIST, not here
        (slice(1, 2), "builtins.slice"),
        ({1, 2}, "builtins.set"),
    ],
)
def test_cifar_batch_refuses_any_other_global(value, why):
    with pytest.raises(UnsafePickleError, match=why):
        load_cifar_batch(pickle.dumps(_batch({b"batch_label": value}), protocol=2))


@pytest.mark.parametrize(
    "batch, why",
    [
        (_batch({b"extra": b"x"}), "unexpected key b'extra'"),
        (_batch({b"data": np.zeros((2, 12), np.float32)}), "2-D uint8 array; got float32"),
        (_batch({b"data": np.zeros(12, np.uint8)}), "2-D uint8 array"),
        (_batch({b"labels": [1.0, 2.0]}), "list of ints"),
        (_batch({b"labels": [True, False]}), "list of ints"),
        (_batch({b"labels": [1, 2, 3]}), "2 images and 3 labels"),
        (_batch({b"filenames": [1, 2]}), "'filenames' must be a list of strings"),
        (_batch({b"batch_label": 3}), "'batch_label' must be a string"),
        ([1, 2], "holds a list, expected the dict"),
    ],
)
def test_cifar_batch_of_another_layout_is_refused(batch, why):
    with pytest.raises(DataIntegrityError, match=why) as e:
        load_cifar_batch(pickle.dumps(batch, protocol=2), source="cifar10/test_batch")
    assert str(e.value).startswith("cifar10/test_batch: ")
