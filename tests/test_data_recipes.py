"""Each MAF recipe on tiny raw files in the archive's exact formats (tests/fixtures/raw/, made by
tests/fixtures/make_fixtures.py), against expected outputs computed step by step here."""

from __future__ import annotations

import gzip
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from flowbench.data import gas, hepmass, mnist, power
from flowbench.data._common import tail_split_sizes
from flowbench.data.safe_pickle import load_dataframe_pickle
from flowbench.errors import DataIntegrityError

FIX = Path(__file__).resolve().parent / "fixtures"
RAW = FIX / "raw"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    shutil.copytree(RAW, tmp_path / "data")
    return tmp_path / "data"


def test_tail_split_sizes_match_the_paper():
    # N of the archive files -> the split sizes of the MAF paper
    assert tail_split_sizes(2_049_280) == (1_659_917, 184_435, 204_928)  # POWER
    assert tail_split_sizes(1_052_065) == (852_174, 94_685, 105_206)  # GAS
    assert tail_split_sizes(36_488) == (29_556, 3_284, 3_648)  # MINIBOONE
    assert tail_split_sizes(20) == (17, 1, 2)


# ------------------------------------------------------------------------------------------------ POWER
def maf_power_transcript(data: np.ndarray):
    """gpapamak/maf datasets/power.py, transcribed literally."""
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    N = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    voltage_noise = 0.01 * rng.rand(N, 1)
    gap_noise = 0.001 * rng.rand(N, 1)
    sm_noise = rng.rand(N, 3)
    time_noise = np.zeros((N, 1))
    noise = np.hstack((gap_noise, voltage_noise, sm_noise, time_noise))
    data = data + noise
    N_test = int(0.1 * data.shape[0])
    data_test = data[-N_test:]
    data = data[0:-N_test]
    N_validate = int(0.1 * data.shape[0])
    data_validate = data[-N_validate:]
    data_train = data[0:-N_validate]
    d = np.vstack((data_train, data_validate))
    mu, s = d.mean(axis=0), d.std(axis=0)
    return (data_train - mu) / s, (data_validate - mu) / s, (data_test - mu) / s


def test_power_matches_the_maf_code_on_the_fixture():
    raw = np.load(RAW / "power" / "data.npy")
    out = power.transform(raw.copy())
    exp = maf_power_transcript(raw.copy())
    assert [out[k].shape for k in ("train", "val", "test")] == [(17, 6), (1, 6), (2, 6)]
    for k, e in zip(("train", "val", "test"), exp):
        np.testing.assert_allclose(out[k], e, rtol=0, atol=1e-12)


def test_power_noise_draw_order_and_column_drops():
    n = 20
    raw = np.zeros((n, 8))
    raw[:, 7] = np.arange(n)  # time: reveals the shuffle
    raw[:, 1] = 1e6  # reactive power and intensity are deleted: must not appear
    raw[:, 3] = -1e6
    out = power.transform(raw.copy())
    full = np.vstack([out["train"], out["val"], out["test"]])
    assert np.abs(full).max() < 10

    rng = np.random.RandomState(42)
    order = np.arange(n)
    rng.shuffle(order)
    v, g, sm = 0.01 * rng.rand(n, 1), 0.001 * rng.rand(n, 1), rng.rand(n, 3)  # voltage drawn before gap
    expected = np.hstack([g, v, sm, order[:, None].astype(float)])
    trval = expected[:18]
    expected = (expected - trval.mean(0)) / trval.std(0)  # ddof = 0
    np.testing.assert_allclose(full, expected, atol=1e-12)
    # the wrong (intuitive) order gives different numbers, so this test can fail
    wrong = np.hstack([v * 0.1, g * 10, sm, order[:, None].astype(float)])
    wrong = (wrong - wrong[:18].mean(0)) / wrong[:18].std(0)
    assert not np.allclose(full[:, :2], wrong[:, :2])


def test_power_standardises_with_train_plus_val_ddof0():
    out = power.transform(np.load(RAW / "power" / "data.npy"))
    trval = np.vstack([out["train"], out["val"]])
    np.testing.assert_allclose(trval.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(trval.std(0, ddof=0), 1, atol=1e-12)


def test_power_nan_is_named(tmp_path: Path):
    raw = np.load(RAW / "power" / "data.npy")
    raw[4, 2] = np.nan
    with pytest.raises(DataIntegrityError, match=r"column 2 contains 1 NaN"):
        power.transform(raw)


# ------------------------------------------------------------------------------------------------ GAS
def gas_table():
    t = np.load(FIX / "gas_table.npz")
    return [str(c) for c in t["columns"]], t["values"]


def test_gas_correlation_loop_and_whole_table_ddof1():
    frame = load_dataframe_pickle((RAW / "gas" / "ethylene_CO.pickle").read_bytes())
    splits, kept = gas.transform(frame)
    # A, B, F are mutually correlated > 0.98: the loop drops A (first), then B; E = -D (corr ≈ -1) stays
    assert kept == ["C", "D", "E", "F"]
    cols, vals = gas_table()
    t = vals[:, [cols.index(c) for c in kept]]
    t = (t - t.mean(0)) / t.std(0, ddof=1)  # whole table, test rows included, pandas' ddof=1
    assert [splits[k].shape[0] for k in ("train", "val", "test")] == [25, 2, 3]  # file order, 30 rows
    np.testing.assert_allclose(np.vstack([splits[k] for k in ("train", "val", "test")]), t, atol=1e-12)
    c = np.corrcoef(t, rowvar=False)
    assert c[1, 2] < -0.98  # the negative correlation was not counted


def test_gas_pickle_variants_give_identical_results():
    ref = gas.transform(load_dataframe_pickle((RAW / "gas" / "ethylene_CO.pickle").read_bytes()))[0]
    for name in ("proto5.pickle", "pandas0x.pickle"):
        out = gas.transform(load_dataframe_pickle((FIX / "gas_variants" / name).read_bytes()))[0]
        for k in ref:
            np.testing.assert_array_equal(out[k], ref[k])


def test_gas_constant_column_is_an_error_naming_it():
    cols, vals = gas_table()
    vals = vals.copy()
    vals[:, cols.index("D")] = 3.0
    from flowbench.data.safe_pickle import Frame

    with pytest.raises(DataIntegrityError, match=r"'D'.*zero variance"):
        gas.transform(Frame(cols, vals))


# ------------------------------------------------------------------------------------------------ HEPMASS
def test_hepmass_recipe_on_the_fixture(root: Path):
    out = hepmass.prepare(root)
    tr = np.loadtxt(RAW / "hepmass" / "1000_train.csv", delimiter=",", skiprows=1)
    te = np.loadtxt(RAW / "hepmass" / "1000_test.csv", delimiter=",", skiprows=1)
    tr = tr[tr[:, 0] == 1][:, 1:]
    te = te[te[:, 0] == 1][:, 1:-1]  # test file: label and its extra last column dropped
    mu, s = tr.mean(0), tr.std(0, ddof=1)
    tr, te = (tr - mu) / s, (te - mu) / s
    # MAF's rule, literally: first entry of the value-sorted counts = count of the smallest value
    drop = [j for j, col in enumerate(tr.T) if np.array([v for k, v in sorted(Counter(col).items())])[0] > 5]
    assert drop == [3]  # f3: min ×6 dropped; f5: min ×5, f7: max ×10, f10: min ×6 in background rows: kept
    keep = [j for j in range(27) if j not in drop]
    assert out["train"].shape == (27, 26) and out["val"].shape == (3, 26) and out["test"].shape == (15, 26)
    np.testing.assert_allclose(out["train"], tr[:27, keep], atol=1e-12)
    np.testing.assert_allclose(out["val"], tr[27:, keep], atol=1e-12)
    np.testing.assert_allclose(out["test"], te[:, keep], atol=1e-12)


def test_hepmass_min_value_counts():
    x = np.array([[1.0, 5.0], [1.0, 5.0], [2.0, 4.0], [3.0, 5.0]])
    np.testing.assert_array_equal(hepmass.min_value_counts(x), [2, 1])


def test_hepmass_width_mismatch_and_zero_variance(root: Path):
    h, tr = hepmass.read_csv(root / "hepmass" / "1000_train.csv")
    th, te = hepmass.read_csv(root / "hepmass" / "1000_test.csv")
    with pytest.raises(DataIntegrityError, match="train has 27 columns and test 26"):
        hepmass.transform(h, tr, th[:-1], te[:, :-1])
    tr = tr.copy()
    tr[:, 1 + 2] = 0.5
    with pytest.raises(DataIntegrityError, match=r"column 2 \('f2'\) has zero variance"):
        hepmass.transform(h, tr, th, te)


# ------------------------------------------------------------------------------------------------ MINIBOONE / BSDS300
def test_miniboone_tail_split_and_ddof0(root: Path):
    from flowbench.data import miniboone

    raw = np.load(RAW / "miniboone" / "data.npy")
    out = miniboone.prepare(root)
    trval = raw[:45]
    exp = (raw - trval.mean(0)) / trval.std(0)
    np.testing.assert_allclose(np.vstack([out["train"], out["val"], out["test"]]), exp, atol=1e-12)
    assert [out[k].shape[0] for k in ("train", "val", "test")] == [41, 4, 5]


def test_bsds300_taken_as_stored(root: Path):
    import h5py

    from flowbench.data import bsds300

    out = bsds300.prepare(root)
    with h5py.File(RAW / "BSDS300" / "BSDS300.hdf5") as f:
        for k, key in (("train", "train"), ("val", "validation"), ("test", "test")):
            np.testing.assert_array_equal(out[k], f[key][:].astype(np.float32))


# ------------------------------------------------------------------------------------------------ MNIST
def test_mnist_fixture_is_a_python2_pickle_needing_latin1():
    raw = gzip.open(RAW / "mnist" / "mnist.pkl.gz").read()
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)  # default encoding fails on Python 2 array data, as the real file does


def test_mnist_logit_values_by_hand(root: Path):
    out = mnist.prepare(root)
    rng = np.random.RandomState(42)
    u = rng.rand(6 * 784 + 2)  # train draws first, then val
    a = 1e-6

    def logit(p: float) -> float:
        return float(np.log(p / (1 - p)))

    # train[0, 0] is pixel 0 and train[0, 1] is pixel 255/256 (the fixture sets them)
    assert out["train"][0, 0] == pytest.approx(logit(a + (1 - 2 * a) * (0 + u[0] / 256)), rel=1e-6)
    assert out["train"][0, 1] == pytest.approx(logit(a + (1 - 2 * a) * (255 / 256 + u[1] / 256)), rel=1e-6)
    # val continues the same RandomState after all of train's draws
    assert out["val"][0, 0] == pytest.approx(logit(a + (1 - 2 * a) * (u[6 * 784] / 256)), rel=1e-6)
    assert out["train"].dtype == np.float32 and out["test"].shape == (3, 784)


def test_mnist_labels_are_each_splits_y(root: Path):
    """MAF datasets/mnist.py: ``self.labels = data[1]`` of each of (trn, val, tst)."""
    out = mnist.prepare(root)
    (_, ytr), (_, yva), (_, yte) = pickle.loads(gzip.open(RAW / "mnist" / "mnist.pkl.gz").read(), encoding="latin1")
    for k, y in (("train", ytr), ("val", yva), ("test", yte)):
        np.testing.assert_array_equal(out[f"{k}_labels"], y)
        assert len(out[f"{k}_labels"]) == len(out[k])
    assert mnist.SPEC.classes == 10


def test_mnist_label_count_must_match_the_rows(root: Path):
    (xtr, ytr), val, test = pickle.loads(gzip.open(RAW / "mnist" / "mnist.pkl.gz").read(), encoding="latin1")
    with gzip.open(root / "mnist" / "mnist.pkl.gz", "wb") as f:
        pickle.dump(((xtr, ytr[:-1]), val, test), f, protocol=2)
    with pytest.raises(DataIntegrityError, match="one label y per row"):
        mnist.prepare(root)


def test_mnist_chunking_draws_the_same_numbers():
    x = (np.random.RandomState(1).randint(0, 256, (7, 784)) / 256).astype(np.float32)
    a = mnist.transform_split(x, np.random.RandomState(3), chunk_rows=2)
    b = mnist.transform_split(x, np.random.RandomState(3), chunk_rows=100)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ digits
def test_digits_recipe():
    from sklearn.datasets import load_digits

    from flowbench.data import load_dataset

    ds = load_dataset("digits")
    v = load_digits().data
    rng = np.random.RandomState(42)
    x = (v + rng.rand(*v.shape)) / 17
    y = np.log((1e-6 + (1 - 2e-6) * x) / (1 - (1e-6 + (1 - 2e-6) * x)))
    y = y[rng.permutation(len(y))]
    assert (ds.train.shape, ds.val.shape, ds.test.shape) == ((1457, 64), (161, 64), (179, 64))
    np.testing.assert_allclose(np.vstack([ds.train, ds.val, ds.test]), y.astype(np.float32), rtol=1e-6)
    assert ds.logit_alpha == 1e-6 and ds.levels == 17 and ds.dim == 64 and ds.image


def test_digits_labels_stay_with_their_images():
    from sklearn.datasets import load_digits

    from flowbench.data import load_dataset

    ds, d = load_dataset("digits"), load_digits()
    rng = np.random.RandomState(42)
    rng.rand(*d.data.shape)
    perm = rng.permutation(len(d.target))  # the recipe's own permutation, drawn after the noise
    np.testing.assert_array_equal(np.concatenate([ds.train_labels, ds.val_labels, ds.test_labels]), d.target[perm])
    # and each label sits beside its image: the pixel values recovered from logit space are the image's
    for split, lab in ((ds.train, ds.train_labels), (ds.test, ds.test_labels)):
        x = 1 / (1 + np.exp(-split.astype(np.float64)))
        pixels = np.floor((x - 1e-6) / (1 - 2e-6) * 17)
        rows = {bytes(v.astype(np.uint8)): t for v, t in zip(d.data, d.target)}
        assert all(rows[bytes(p.astype(np.uint8))] == t for p, t in zip(pixels, lab))
    assert ds.classes == 10 and ds.train_labels.dtype == np.int64 and len(ds.val_labels) == 161
