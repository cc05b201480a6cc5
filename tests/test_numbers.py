"""Every figure a run record reports, recomputed independently (issue 13), and the −inf bookkeeping.

Each test derives a number from its definition (autograd change of variables, the bits/pixel formula on
per-point values, a direct evaluation of the loss at a learning rate too small to move a weight, the
validation split) rather than by calling the code that wrote it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from toy_flows import tiny_flow

import flowbench.models as models
from flowbench.data.base import Dataset
from flowbench.models.spec import ModelSpec
from flowbench.results import RunRecord, read_record, record_path
from flowbench.tables import build_table
from flowbench.training import Trainer, run_experiment
from flowbench.training.evaluate import evaluate_test, finite_mean, log_prob_batches
from flowbench.training.trainer import best_model_state

ALPHA, LEVELS = 1e-2, 17


def opts(tmp_path, **kw):
    return {"out": str(tmp_path), "batch_size": 50, "device": "cpu", **kw}


def image_data(n_train=300, n_val=60, n_test=80, d=4, seed=3) -> Dataset:
    """Dequantised ``LEVELS``-level "images" of ``d`` correlated pixels, in logit space as for digits/MNIST."""
    rng = np.random.RandomState(seed)
    n = n_train + n_val + n_test
    base = rng.rand(n, 1)
    ints = np.clip(np.round((base + 0.2 * rng.randn(n, d)) * (LEVELS - 1)), 0, LEVELS - 1)
    pixels = (ints + rng.rand(n, d)) / LEVELS  # in [0, 1)
    s = ALPHA + (1 - 2 * ALPHA) * pixels
    y = np.log(s) - np.log1p(-s)
    y = y.astype(np.float32)
    return Dataset(
        "img",
        y[:n_train],
        y[n_train : n_train + n_val],
        y[n_train + n_val :],
        logit_alpha=ALPHA,
        levels=LEVELS,
        image_shape=(2, 2),
    )


def gaussian_data(n_train=600, n_val=150, n_test=200, seed=1) -> Dataset:
    rng = np.random.RandomState(seed)
    cov = np.array([[1.0, 0.6], [0.6, 2.0]])
    x = rng.multivariate_normal([0.5, -1.0], cov, size=n_train + n_val + n_test).astype(np.float32)
    return Dataset("toy", x[:n_train], x[n_train : n_train + n_val], x[n_train + n_val :])


# -- pixel space and bits/pixel -------------------------------------------------------------------------
def test_pixel_log_prob_is_the_change_of_variables_through_the_logit_map():
    data = image_data()
    y = torch.tensor(data.test, dtype=torch.float64)
    logp_logit = torch.randn(y.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # pixel p ↦ y = logit(α + (1 − 2α) p); log p_pixel(p) = log p_logit(y) + log|det ∂y/∂p| (diagonal map)
    p = ((torch.sigmoid(y) - ALPHA) / (1 - 2 * ALPHA)).requires_grad_(True)
    s = ALPHA + (1 - 2 * ALPHA) * p
    y_of_p = torch.log(s) - torch.log1p(-s)
    (dy_dp,) = torch.autograd.grad(y_of_p.sum(), p)
    expected = logp_logit + torch.log(dy_dp.abs()).sum(1)
    got = data.pixel_log_prob(logp_logit.numpy(), data.test)
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-5, atol=1e-4)


def test_bits_per_pixel_and_its_error_bar_from_the_definitions():
    data = image_data()
    torch.manual_seed(0)
    flow = models.build_model("made", data.dim, hidden=8)
    flow.eval()
    test_x = torch.tensor(data.test)
    out = evaluate_test(flow, data, test_x)
    logp = flow.log_prob(test_x).double().detach().numpy()
    pixel = data.pixel_log_prob(logp, data.test)
    # per-image bits/pixel of the discrete image: −log2 P(ints) / D with P = p_pixel · (1/LEVELS)^D
    bpp = -pixel / (data.dim * math.log(2)) + math.log2(LEVELS)
    n = bpp.size
    assert out["n_test"] == n and out["n_nonfinite_test"] == 0
    assert out["test_ll"] == pytest.approx(logp.mean(), rel=1e-12)
    assert out["test_ll_2se"] == pytest.approx(2 * logp.std() / math.sqrt(n), rel=1e-9)
    assert out["test_ll_pixel"] == pytest.approx(pixel.mean(), rel=1e-12)
    assert out["test_ll_pixel_2se"] == pytest.approx(2 * pixel.std() / math.sqrt(n), rel=1e-9)
    assert out["bits_per_pixel"] == pytest.approx(bpp.mean(), rel=1e-12)
    assert out["bits_per_pixel_2se"] == pytest.approx(2 * bpp.std() / math.sqrt(n), rel=1e-9)


# -- the record's figures -------------------------------------------------------------------------------
def test_train_loss_in_history_equals_a_direct_evaluation_at_lr_zero(tmp_path):
    """At a learning rate far below float32 resolution the weights never move, so every epoch's train_loss
    is the mean NLL of the initial model over the whole training set."""
    data = image_data()
    rec = run_experiment(
        opts(tmp_path, model="made", hidden=8, lr=1e-30, max_epochs=3, patience=5), data, progress=False
    )
    flow = models.build_model("made", data.dim, **rec.hparams)
    flow.load_state_dict(best_model_state(tmp_path / "runs" / "img" / "made" / "seed0.ckpt"))
    direct = -float(log_prob_batches(flow, torch.tensor(data.train)).mean())
    val = float(log_prob_batches(flow, torch.tensor(data.val)).mean())
    assert [h["epoch"] for h in rec.history] == [1, 2, 3]
    for h in rec.history:
        assert h["train_loss"] == pytest.approx(direct, rel=1e-5)
        assert h["val_ll"] == pytest.approx(val, rel=1e-5) and h["n_nonfinite_val"] == 0


def test_every_number_in_an_image_record(tmp_path):
    data = image_data()
    rec = run_experiment(
        opts(tmp_path, model="made", hidden=8, lr=1e-2, max_epochs=4, patience=2), data, progress=False
    )
    path = record_path(tmp_path, "img", "made", 0)
    assert read_record(path).to_json() == rec.to_json()  # what is on disk is what was returned
    flow = models.build_model("made", data.dim, **rec.hparams)
    flow.load_state_dict(best_model_state(path.with_suffix(".ckpt")))
    logp = log_prob_batches(flow, torch.tensor(data.test))
    val = log_prob_batches(flow, torch.tensor(data.val))
    pixel = data.pixel_log_prob(logp, data.test)
    bpp = -pixel / (data.dim * math.log(2)) + math.log2(LEVELS)
    se = lambda v: 2 * v.std() / math.sqrt(v.size)  # noqa: E731
    n = data.test.shape[0]
    assert rec.status == "ok" and rec.n_test == n and rec.n_nonfinite_test == rec.n_nonfinite_val == 0
    assert rec.params == sum(p.numel() for p in flow.parameters())
    assert rec.epochs == len(rec.history) and 1 <= rec.best_epoch <= rec.epochs
    assert rec.best_val_ll == max(h["val_ll"] for h in rec.history)
    assert rec.history[rec.best_epoch - 1]["val_ll"] == rec.best_val_ll
    assert rec.best_val_ll == pytest.approx(val.mean(), rel=1e-6)  # the restored state is the best epoch's
    for field, value in [
        ("test_ll", logp.mean()),
        ("test_ll_2se", se(logp)),
        ("test_ll_pixel", pixel.mean()),
        ("test_ll_pixel_2se", se(pixel)),
        ("bits_per_pixel", bpp.mean()),
        ("bits_per_pixel_2se", se(bpp)),
    ]:
        assert getattr(rec, field) == pytest.approx(value, rel=1e-6), field
    assert rec.test_ll_finite is None and rec.test_ll_finite_2se is None
    assert 0 < rec.train_time_s <= rec.wall_time_s
    assert rec.jacobian_spectral_norm["n_points"] == min(64, n)


def test_gaussian_best_val_ll_is_computed_on_the_validation_split(tmp_path):
    data = gaussian_data()
    rec = run_experiment(opts(tmp_path, model="gaussian"), data, progress=False)
    train = data.train.astype(np.float64)
    fit = multivariate_normal(train.mean(0), np.cov(train.T, bias=True))
    assert rec.best_val_ll == pytest.approx(fit.logpdf(data.val.astype(np.float64)).mean(), rel=1e-5)
    assert rec.test_ll == pytest.approx(fit.logpdf(data.test.astype(np.float64)).mean(), rel=1e-5)
    assert rec.best_val_ll != pytest.approx(rec.test_ll, rel=1e-5)  # the two splits do differ here


# -- −inf points ------------------------------------------------------------------------------------------


FAR = 1e20  # z² overflows float32: the density's log is −inf there, as far outside the data of a real model


def with_far_points(data: Dataset, val: int, test: int) -> Dataset:
    v, t = data.val.copy(), data.test.copy()
    v[:val, 0] = FAR
    t[:test, 0] = FAR
    return Dataset(data.name, data.train, v, t)


def test_finite_mean_counts_and_skips_neg_inf():
    assert finite_mean(np.array([1.0, -np.inf, 3.0])) == (2.0, 1)
    mean, bad = finite_mean(np.array([-np.inf]))
    assert math.isnan(mean) and bad == 1


def test_neg_inf_validation_and_test_points_are_counted_not_fatal(tmp_path, monkeypatch):
    spec = ModelSpec(name="tiny", build=tiny_flow, hparams={}, label="Tiny", paper="test", lr=1e-2)
    monkeypatch.setitem(models.MODELS, "tiny", spec)
    data = with_far_points(gaussian_data(), val=2, test=3)
    rec = run_experiment(opts(tmp_path, model="tiny", max_epochs=3, patience=5), data, progress=False)
    assert rec.status == "ok" and rec.epochs == 3, rec.failure  # −inf validation points do not stop training
    assert rec.n_nonfinite_val == 2 and all(h["n_nonfinite_val"] == 2 for h in rec.history)
    flow = tiny_flow(2)
    flow.load_state_dict(best_model_state(record_path(tmp_path, "toy", "tiny", 0).with_suffix(".ckpt")))
    val = log_prob_batches(flow, torch.tensor(data.val))
    test = log_prob_batches(flow, torch.tensor(data.test))
    assert np.isneginf(val).sum() == 2 and np.isneginf(test).sum() == 3
    assert rec.best_val_ll == pytest.approx(val[2:].mean(), rel=1e-6)
    assert rec.test_ll == -math.inf and rec.n_nonfinite_test == 3 and math.isnan(rec.test_ll_2se)
    assert rec.test_ll_finite == pytest.approx(test[3:].mean(), rel=1e-6)
    assert rec.test_ll_finite_2se == pytest.approx(2 * test[3:].std() / math.sqrt(test.size - 3), rel=1e-6)
    assert any("3 of 200 test points have log-density −inf" in note for note in rec.notes)
    # JSON has no −inf: stored as null, read back as −inf because the count says why
    path = record_path(tmp_path, "toy", "tiny", 0)
    assert json.loads(path.read_text())["test_ll"] is None
    back = read_record(path)
    assert back.test_ll == -math.inf and back.n_nonfinite_test == 3
    table = build_table([back], sources=())
    assert "−∞ [1]" in table
    assert "seed 0: 3 of 200 test points have log-density −inf" in table
    assert f"over the other 197 it is {rec.test_ll_finite:.2f}" in table


def test_old_records_without_the_counts_still_read():
    data = RunRecord.example().to_json()
    for key in ("n_nonfinite_val", "n_nonfinite_test", "test_ll_finite", "test_ll_finite_2se"):
        data.pop(key)
    rec = RunRecord.from_json(data)
    assert rec.n_nonfinite_test == 0 and rec.test_ll == 0.1
    missing = dict(data, test_ll=None)
    assert RunRecord.from_json(missing).test_ll is None  # no count: a missing value, not −inf


def test_trainer_validation_returns_finite_mean_and_count():
    data = with_far_points(gaussian_data(), val=4, test=0)
    trainer = Trainer(
        tiny_flow(2), torch.tensor(data.train), torch.tensor(data.val), lr=1e-2, max_epochs=1, progress=False
    )
    res = trainer.fit()
    assert res.status == "ok" and res.n_nonfinite_val == 4
