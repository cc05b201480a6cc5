"""CIFAR-10 as MAF prepares it (gpapamak/maf ``datasets/cifar10.py``, ``CIFAR10(logit=True, flip=True,
dequantize=True)``), on the tiny batches in the real format under tests/fixtures/raw/cifar10/ (made by
tests/fixtures/make_fixtures.py: 4 + 3 + 5 + 4 + 4 train rows, so train 18 (36 with flips), val 2; test 3)."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from flowbench.data import DATASETS, cache, cifar10, load_dataset, status
from flowbench.data.base import Dataset
from flowbench.errors import ConfigError, DataIntegrityError, DatasetNotFoundError

RAW = Path(__file__).resolve().parent / "fixtures" / "raw"
FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    shutil.copytree(RAW / "cifar10", tmp_path / "data" / "cifar10")
    return tmp_path / "data"


# -- MAF's code, transcribed literally (datasets/cifar10.py, util.py, experiments.py, collect_results.py) ----------
def one_hot_encode(labels, n_labels):
    assert np.min(labels) >= 0 and np.max(labels) < n_labels
    y = np.zeros([labels.size, n_labels])
    y[range(labels.size), labels] = 1
    return y


def util_logit(x):
    return np.log(x / (1.0 - x))


def util_logistic(x):
    return 1.0 / (1.0 + np.exp(-x))


class MafCIFAR10:
    alpha = 0.05

    class Data:
        def __init__(self, x, l, logit, flip, dequantize, rng):  # noqa: E741 (MAF's name)
            D = int(x.shape[1] / 3)
            x = self._dequantize(x, rng) if dequantize else x
            x = self._logit_transform(x) if logit else x
            x = self._flip_augmentation(x) if flip else x
            self.x = x
            self.r = self.x[:, :D]
            self.g = self.x[:, D : 2 * D]
            self.b = self.x[:, 2 * D :]
            self.labels = np.hstack([l, l]) if flip else l
            self.y = one_hot_encode(self.labels, 10)
            self.N = self.x.shape[0]

        @staticmethod
        def _dequantize(x, rng):
            return (x + rng.rand(*x.shape).astype(np.float32)) / 256.0

        @staticmethod
        def _logit_transform(x):
            return util_logit(MafCIFAR10.alpha + (1 - 2 * MafCIFAR10.alpha) * x)

        @staticmethod
        def _flip_augmentation(x):
            D = int(x.shape[1] / 3)
            I = int(np.sqrt(D))  # noqa: E741 (MAF's name)
            r = x[:, :D].reshape([-1, I, I])[:, :, ::-1].reshape([-1, D])
            g = x[:, D : 2 * D].reshape([-1, I, I])[:, :, ::-1].reshape([-1, D])
            b = x[:, 2 * D :].reshape([-1, I, I])[:, :, ::-1].reshape([-1, D])
            x_flip = np.hstack([r, g, b])
            return np.vstack([x, x_flip])

    def __init__(self, root, logit=False, flip=False, dequantize=True):
        rng = np.random.RandomState(42)
        path = str(root) + "/cifar10/"
        x = []
        l = []  # noqa: E741
        for i in range(1, 6):
            f = open(path + "data_batch_" + str(i), "rb")
            dict = pickle.load(f, encoding="latin1")  # our own fixture: plain pickle is fine here
            x.append(dict["data"])
            l.append(dict["labels"])
            f.close()
        x = np.concatenate(x, axis=0)
        l = np.concatenate(l, axis=0)  # noqa: E741
        split = int(0.9 * x.shape[0])
        self.trn = self.Data(x[:split], l[:split], logit, flip, dequantize, rng)
        self.val = self.Data(x[split:], l[split:], logit, False, dequantize, rng)
        f = open(path + "test_batch", "rb")
        dict = pickle.load(f, encoding="latin1")
        x = dict["data"]
        l = np.array(dict["labels"])  # noqa: E741
        f.close()
        self.tst = self.Data(x, l, logit, False, dequantize, rng)
        self.n_dims = self.trn.x.shape[1]


def maf_image_space_logprobs(logprobs, x, alpha):
    """experiments.evaluate_logprob(use_image_space=True): the correction, on the float32 data as MAF has it."""
    z = util_logistic(x)
    return logprobs + x.shape[1] * np.log(1 - 2 * alpha) - np.sum(np.log(z) + np.log(1 - z), axis=1)


def maf_calc_bits_per_pixel(lp, lp_err, n_dims):
    """collect_results.calc_bits_per_pixel."""
    Dlog2 = n_dims * np.log(2)
    return -lp / Dlog2 + 8, lp_err / Dlog2


# -- the fixture is in the real format ------------------------------------------------------------------------------
def test_fixture_is_a_python2_protocol2_pickle_of_a_dict():
    raw = (RAW / "cifar10" / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)  # Python 2 str holding the pixel bytes: needs latin1, as the real files do
    d = pickle.loads(raw, encoding="bytes")
    assert set(d) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (4, 3072)
    assert all(type(v) is int for v in d[b"labels"]) and isinstance(d[b"batch_label"], bytes)


def test_spec_declares_maf_sizes_and_raw_files():
    spec = DATASETS["cifar10"]
    assert spec.dim == 3072 and spec.sizes == (90_000, 5_000, 10_000) and spec.classes == 10
    assert spec.raw_files == tuple(f"cifar10/{f}" for f in FILES) and spec.source == "archive"
    assert spec.image.shape == (3, 32, 32) and spec.logit_alpha == 0.05 and spec.levels == 256
    assert int(0.9 * 50_000) == 45_000  # MAF's split of the five real batches


# -- the recipe equals MAF's code -----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [1, 3, 2000])
def test_recipe_is_bit_identical_to_maf(root: Path, chunk_rows: int):
    out = cifar10.prepare(root, chunk_rows=chunk_rows)
    maf = MafCIFAR10(root, logit=True, flip=True, dequantize=True)
    for k, d in (("train", maf.trn), ("val", maf.val), ("test", maf.tst)):
        assert d.x.dtype == np.float32 and out[k].dtype == np.float32  # MAF's arithmetic is float32 throughout
        np.testing.assert_array_equal(out[k], d.x)
        np.testing.assert_array_equal(out[f"{k}_labels"], d.labels)
    assert [out[k].shape[0] for k in ("train", "val", "test")] == [36, 2, 3]  # int(0.9·20) = 18, flipped → 36


def test_a_float64_recipe_would_differ(root: Path):
    """The float32 rounding is what MAF computes; float64 arithmetic would give other numbers (not vacuous)."""
    maf = MafCIFAR10(root, logit=True, flip=True, dequantize=True)
    x = np.concatenate(
        [pickle.loads((root / "cifar10" / f).read_bytes(), encoding="latin1")["data"] for f in FILES[:5]]
    )[:18]
    u = np.random.RandomState(42).rand(*x.shape)
    y64 = util_logit(0.05 + 0.9 * ((x + u) / 256.0)).astype(np.float32)
    assert not np.array_equal(y64, maf.trn.x[:18])


def test_logit_values_by_hand(root: Path):
    out = cifar10.prepare(root)
    u = np.random.RandomState(42).rand(18 * 3072 + 1).astype(np.float32)  # train draws, then val
    a = 0.05

    def logit(k: int, noise: float) -> float:
        p = a + (1 - 2 * a) * (k + noise) / 256
        return math.log(p / (1 - p))

    # the fixture sets pixel 0 (R, top-left) to 0 and pixel 1 to 255 in every row
    assert out["train"][0, 0] == pytest.approx(logit(0, u[0]), rel=1e-5)
    assert out["train"][0, 1] == pytest.approx(logit(255, u[1]), rel=1e-5)
    assert out["val"][0, 0] == pytest.approx(logit(0, u[18 * 3072]), rel=1e-5)  # val continues the stream
    lo, hi = math.log(a / (1 - a)), math.log((1 - a) / a)
    assert all(lo <= out[k].min() and out[k].max() <= hi for k in ("train", "val", "test"))


def test_flips_mirror_each_colour_plane(root: Path):
    out = cifar10.prepare(root)
    n = 18
    orig, flipped = out["train"][:n].reshape(n, 3, 32, 32), out["train"][n:].reshape(n, 3, 32, 32)
    np.testing.assert_array_equal(flipped, orig[:, :, :, ::-1])
    assert flipped[0, 0, 0, 31] == orig[0, 0, 0, 0]  # R's top-left pixel lands top-right, still in R
    np.testing.assert_array_equal(out["train_labels"][n:], out["train_labels"][:n])
    # val and test are not augmented
    assert out["val"].shape == (2, 3072) and out["test"].shape == (3, 3072)


def test_labels_are_the_batches_labels(root: Path):
    out = cifar10.prepare(root)
    labels = [pickle.loads((root / "cifar10" / f).read_bytes(), encoding="latin1")["labels"] for f in FILES]
    train_val = np.concatenate(labels[:5])
    np.testing.assert_array_equal(out["train_labels"], np.r_[train_val[:18], train_val[:18]])
    np.testing.assert_array_equal(out["val_labels"], train_val[18:])
    np.testing.assert_array_equal(out["test_labels"], labels[5])


# -- loader, cache, errors ------------------------------------------------------------------------------------------
def test_load_caches_splits_and_labels(root: Path):
    first = load_dataset("cifar10", root)
    m = json.loads((root / "processed" / "cifar10" / "manifest.json").read_text())
    assert m["classes"] == 10 and m["shapes"]["train_labels"] == [36] and m["shapes"]["train"] == [36, 3072]
    assert {"train_labels.npy", "val_labels.npy", "test_labels.npy"} <= set(m["files"])
    second = load_dataset("cifar10", root)
    assert status("cifar10", root) == "prepared"
    assert isinstance(second.train, np.memmap) and isinstance(second.test_labels, np.memmap)
    expected = cifar10.prepare(root)
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(second, k), expected[k])
        np.testing.assert_array_equal(getattr(second, f"{k}_labels"), expected[f"{k}_labels"])
        assert getattr(first, f"{k}_labels").dtype == np.int64
    assert second.classes == 10 and second.image_shape == (3, 32, 32) and second.logit_alpha == 0.05
    y = second.one_hot("train")
    assert y.dtype == np.float32 and y.shape == (36, 10)
    np.testing.assert_array_equal(y, one_hot_encode(np.asarray(second.train_labels), 10))


def test_modified_label_file_is_rebuilt(root: Path):
    load_dataset("cifar10", root)
    path = root / "processed" / "cifar10" / "val_labels.npy"
    b = bytearray(path.read_bytes())
    b[-8] = (b[-8] + 1) % 10  # same size, another label
    path.write_bytes(bytes(b))
    assert status("cifar10", root).startswith("broken (val_labels.npy was modified")
    with pytest.warns(UserWarning, match="val_labels.npy was modified"):
        ds = load_dataset("cifar10", root)
    np.testing.assert_array_equal(ds.val_labels, cifar10.prepare(root)["val_labels"])


def test_missing_label_file_and_a_cache_without_labels(root: Path, monkeypatch):
    load_dataset("cifar10", root)
    (root / "processed" / "cifar10" / "test_labels.npy").unlink()
    assert status("cifar10", root) == "broken (test_labels.npy is missing)"
    with pytest.warns(UserWarning, match="test_labels.npy is missing"):
        load_dataset("cifar10", root)
    # a cache written for another number of classes (an older recipe) is stale: rebuilt silently
    mpath = root / "processed" / "cifar10" / "manifest.json"
    m = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**m, "classes": 0}))
    assert cache.check(root, "cifar10", 1, 10).kind == "stale" and status("cifar10", root) == "raw"
    assert load_dataset("cifar10", root).train_labels is not None


def test_missing_batch_names_flowbench_download(root: Path):
    (root / "cifar10" / "test_batch").unlink()
    with pytest.raises(
        DatasetNotFoundError, match=rf"cifar10/test_batch.*flowbench download --dataset cifar10 --root {root}"
    ):
        load_dataset("cifar10", root)
    assert status("cifar10", root) == "missing"


def test_corrupt_or_malicious_batch_is_refused(root: Path):
    (root / "cifar10" / "data_batch_3").write_bytes(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.")
    with pytest.raises(DataIntegrityError, match=r"data_batch_3: .*os\.system"):
        load_dataset("cifar10", root)
    (root / "cifar10" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataIntegrityError, match="data_batch_3: not a readable CIFAR-10 batch pickle"):
        load_dataset("cifar10", root)
    assert not (root / "processed" / "cifar10").exists()


def test_rows_that_are_not_three_square_planes_are_refused(root: Path):
    d = {b"batch_label": b"x", b"labels": [1, 2], b"data": np.zeros((2, 3 * 30), np.uint8), b"filenames": [b"a", b"b"]}
    (root / "cifar10" / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(DataIntegrityError, match="rows of 90 values are not 3 square colour planes"):
        cifar10.prepare(root)


# -- bits/pixel and pixel-space log-likelihood as MAF reports them ----------------------------------------------------
def test_pixel_log_prob_and_bits_per_pixel_equal_mafs(root: Path):
    ds = load_dataset("cifar10", root)
    x = np.asarray(ds.test)  # float32, as MAF's data_split.x
    lp = np.random.RandomState(1).randn(len(x)) * 50 - 4000.0  # some logit-space log-likelihoods
    ours = ds.pixel_log_prob(lp, x)
    # the same formula in float64 agrees to rounding; MAF evaluates the logistic in float32 (its data's dtype)
    np.testing.assert_allclose(ours, maf_image_space_logprobs(lp, x.astype(np.float64), 0.05), rtol=1e-13)
    maf = maf_image_space_logprobs(lp, x, 0.05)
    np.testing.assert_allclose(ours, maf, rtol=0, atol=5e-3)
    bpp, err = maf_calc_bits_per_pixel(maf.mean(), maf.std() / np.sqrt(len(maf)), ds.dim)
    assert ds.bits_per_pixel(ours.mean()) == pytest.approx(bpp, abs=1e-6)
    np.testing.assert_allclose(ds.bits_per_pixel(ours), -ours / (3072 * np.log(2)) + 8, rtol=1e-14)
    assert err > 0


def test_bits_per_pixel_of_uniform_pixels_is_8(root: Path):
    """Uniform density on [0, 1)^D in pixel space is 8 bits/pixel; pushed to logit space through α = 0.05."""
    ds = load_dataset("cifar10", root)
    y = np.asarray(ds.test, np.float64)
    s = 1 / (1 + np.exp(-y))
    # log p_logit(y) of the uniform: log |dx/dy| = log(s(1 − s)) − log(1 − 2α), summed over pixels
    lp_logit = (np.log(s) + np.log(1 - s)).sum(1) - 3072 * np.log(0.9)
    np.testing.assert_allclose(ds.pixel_log_prob(lp_logit, y), 0.0, atol=1e-8)
    np.testing.assert_allclose(ds.bits_per_pixel(ds.pixel_log_prob(lp_logit, y)), 8.0, atol=1e-12)


# -- RGB sample figures ---------------------------------------------------------------------------------------------
def test_image_layout_reads_channel_major_shapes():
    from flowbench.plots.samples import image_layout

    assert image_layout("cifar10", 3072, (3, 32, 32)) == (3, 32, 32)
    assert image_layout("mnist", 784, (28, 28)) == (28, 28)
    assert image_layout("x", 64, None) == (8, 8) and image_layout("x", 16, (1, 4, 4)) == (4, 4)
    with pytest.raises(ConfigError, match="cannot be drawn"):
        image_layout("x", 48, (4, 3, 4))
    with pytest.raises(ConfigError, match="not a square image"):
        image_layout("x", 3072, None)


def test_rgb_grid_puts_channel_major_planes_in_colour():
    from flowbench.plots._mpl import pyplot
    from flowbench.plots.samples import image_grid_figure

    n, side = 4, 3
    imgs = np.zeros((n, 3, side, side))
    imgs[:, 0] = 1.0  # red plane
    imgs[1, 0], imgs[1, 2] = 0.0, 1.0  # the second image is blue
    samples = imgs.reshape(n, -1).copy()
    samples[3, 5] = np.nan  # a non-finite sample pixel is painted red
    fig = image_grid_figure(samples, imgs.reshape(n, -1), (3, side, side), "t")
    s = fig.axes[0].get_images()[0].get_array()
    t = fig.axes[1].get_images()[0].get_array()
    assert s.shape == t.shape == (2 * (side + 1) + 1, 2 * (side + 1) + 1, 3)  # 2 × 2 grid, RGB
    assert tuple(t[1, 1]) == (1.0, 0.0, 0.0) and tuple(t[1, 1 + side + 1]) == (0.0, 0.0, 1.0)
    assert tuple(t[0, 0]) == (1.0, 1.0, 1.0)  # white separators
    assert "1 non-finite" in fig.axes[0].get_title()
    pyplot().close("all")


def test_plot_samples_draws_a_cifar_like_dataset_in_rgb(monkeypatch):
    from flowbench.plots import samples as S
    from flowbench.plots._mpl import pyplot

    rng = np.random.RandomState(0)
    split = lambda n: rng.randn(n, 48).astype(np.float32)  # noqa: E731
    data = Dataset(
        name="tiny_rgb",
        train=split(10),
        val=split(2),
        test=split(9),
        logit_alpha=0.05,
        levels=256,
        image_shape=(3, 4, 4),
    )
    monkeypatch.setattr(S, "check_checkpoint", lambda rec: None)
    monkeypatch.setattr(S, "load_flow", lambda rec, d: None)
    monkeypatch.setattr(S, "draw", lambda flow, n, seed: rng.randn(n, 48))
    monkeypatch.setattr(S, "_title", lambda rec: "title")
    fig = S.plot_samples(object(), data, n=9)
    t = fig.axes[1].get_images()[0].get_array()
    assert t.shape == (3 * 5 + 1, 3 * 5 + 1, 3)
    first = S.logit_to_pixels(data.test[:1], 0.05).reshape(3, 4, 4).transpose(1, 2, 0)
    np.testing.assert_allclose(t[1:5, 1:5], first)
    pyplot().close("all")
