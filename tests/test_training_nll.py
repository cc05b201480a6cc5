"""Honest training curves (issue 21, item 4): every evaluation's exact training NLL (history ``train_nll``),
recomputed from its definition; the running loss named for what it is where it is not the NLL (relgrad's
leaves Σ log|det W| out, Gresele et al. 2020 section 4); the console, the curves and TensorBoard show the exact
NLL beside it; the extra evaluation leaves the trajectory bit for bit; older records still plot."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import flowbench.models as models
from flowbench.data.base import Dataset
from flowbench.plots import _records as R
from flowbench.plots._mpl import pyplot
from flowbench.plots.curves import LOSS_LABEL, plot_curves
from flowbench.results import RunRecord
from flowbench.training import Trainer, run_experiment
from flowbench.training import trainer as trainer_mod
from flowbench.training.stacked import RunSpec, StackedTrainer

#: 700 training rows, 250 validation rows: the training NLL is scored on 250 of the 700 (as many as validation).
N_TRAIN, N_VAL = 700, 250


def data4(seed: int = 2) -> Dataset:
    rng = np.random.RandomState(seed)
    a = rng.randn(4, 4) * 0.5 + np.eye(4)
    x = (np.tanh(rng.randn(N_TRAIN + N_VAL + 200, 4)) * 1.5 + 0.2 * rng.randn(N_TRAIN + N_VAL + 200, 4)) @ a.T
    x = x.astype(np.float32)
    return Dataset("toy4", x[:N_TRAIN], x[N_TRAIN : N_TRAIN + N_VAL], x[N_TRAIN + N_VAL :])


def subsample(train_x: torch.Tensor, n: int) -> torch.Tensor:
    """The documented points: the first n of randperm(N) from a generator seeded 0, in the data's order."""
    perm = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(0))
    return train_x[sorted(perm[:n].tolist())]


MODELS = {"relgrad": dict(layers=2), "maf": dict(layers=2, hidden=8, batch_norm=True)}


@pytest.mark.parametrize("model", list(MODELS))
def test_train_nll_is_the_exact_nll_of_each_evaluated_state(model):
    """Each history row's train_nll is −mean log p of that evaluation's state over the fixed subsample, with batch
    norms from the whole training set and in evaluation mode; rebuilt here from a snapshot of the state."""
    data = data4()
    train_x, val_x = torch.tensor(data.train), torch.tensor(data.val)
    torch.manual_seed(0)
    flow = models.build_model(model, 4, **MODELS[model])
    snaps = {}
    res = Trainer(
        flow,
        train_x,
        val_x,
        lr=3e-3,
        max_epochs=3,
        patience=5,
        batch_size=50,
        progress=False,
        callbacks=[lambda info: snaps.__setitem__(info.epoch, copy.deepcopy(flow.state_dict()))],
    ).fit()
    sub = subsample(train_x, N_VAL)
    assert len(res.history) == 3
    for h in res.history:
        twin = models.build_model(model, 4, **MODELS[model])
        twin.load_state_dict(snaps[h["epoch"]])
        twin.prepare_for_eval(train_x)
        twin.eval()
        with torch.no_grad():
            direct = -twin.log_prob(sub).double().mean().item()
            whole = -twin.log_prob(train_x).double().mean().item()
        assert h["train_nll"] == pytest.approx(direct, rel=1e-6, abs=1e-6), h["epoch"]
        assert h["n_nonfinite_train"] == 0
        assert h["train_nll"] != pytest.approx(whole, rel=1e-9)  # a subsample, not the whole set


def test_relgrad_loss_is_named_and_the_nll_sits_beside_it(capsys):
    """Weights scaled by 3 give Σ log|det W| = 2·4·log 3 ≈ 8.8 nats. At a learning rate too small to move a
    weight the running loss is the whole training set's NLL + Σ log|det W| (what relgrad optimises: the log-det
    term's value is left out, its gradient added inside backward), and train_nll is the exact NLL; the console
    names the first for what it is and prints the second beside it."""
    data = data4()
    train_x, val_x = torch.tensor(data.train), torch.tensor(data.val)
    torch.manual_seed(0)
    flow = models.build_model("relgrad", 4, layers=2)
    with torch.no_grad():
        for w in flow.transform.weights:
            w.mul_(3.0)
    logdet = sum(torch.linalg.slogdet(w.double())[1].item() for w in flow.transform.weights)
    assert logdet == pytest.approx(8 * math.log(3), abs=1e-4)  # orthogonal W_k, scaled by 3
    with torch.no_grad():
        nll_whole = -flow.log_prob(train_x).double().mean().item()
        nll_sub = -flow.log_prob(subsample(train_x, N_VAL)).double().mean().item()
    assert flow.loss_omits == "log|det W|"
    res = Trainer(flow, train_x, val_x, lr=1e-30, max_epochs=2, patience=5, batch_size=50, progress=True).fit()
    for h in res.history:
        assert h["train_loss"] == pytest.approx(nll_whole + logdet, rel=1e-5)
        assert h["train_nll"] == pytest.approx(nll_sub, rel=1e-5)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 2
    for ln, h in zip(lines, res.history):
        assert f"loss w/o log|det W| {h['train_loss']:10.4f}" in ln and f"train NLL {h['train_nll']:10.4f}" in ln
        assert "train loss" not in ln
    flow.relative = False  # ordinary gradients: slogdet is in the graph, the loss is the NLL
    assert flow.loss_omits is None


def test_stacked_console_names_the_loss_as_the_single_trainer_does(capsys):
    data = data4()
    train_x, val_x = torch.tensor(data.train), torch.tensor(data.val)
    flows = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        flows.append(models.build_model("relgrad", 4, layers=2))
    res = StackedTrainer(
        [RunSpec(f, s, 1e-3, max_epochs=1) for s, f in enumerate(flows)], train_x, val_x, batch_size=50, progress=True
    ).fit()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("seed")]
    assert len(lines) == 2
    for ln, r in zip(lines, res):
        h = r.history[0]
        assert f"loss w/o log|det W| {h['train_loss']:10.4f}" in ln and f"train NLL {h['train_nll']:10.4f}" in ln


def test_maf_console_keeps_train_loss_and_adds_the_nll(capsys):
    data = data4()
    torch.manual_seed(0)
    flow = models.build_model("maf", 4, **MODELS["maf"])
    assert flow.loss_omits is None
    res = Trainer(
        flow, torch.tensor(data.train), torch.tensor(data.val), lr=1e-3, max_epochs=1, batch_size=50, progress=True
    ).fit()
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("epoch")]
    h = res.history[0]
    assert f"train loss {h['train_loss']:10.4f}  train NLL {h['train_nll']:10.4f}  val LL" in line


def test_the_extra_evaluation_leaves_the_trajectory_bit_for_bit(tmp_path, monkeypatch):
    """RQ-NSF (C) with dropout draws from the global random stream every training step: choosing the subsample
    and scoring the training NLL must draw nothing (a generator of its own, evaluation mode) and change no state,
    so a run that does neither has the same losses, validation LLs and test LL, bit for bit."""
    data = data4()
    o = dict(
        model="nsf-c",
        layers=2,
        hidden=8,
        blocks=1,
        bins=4,
        dropout=0.2,
        max_epochs=3,
        patience=5,
        lr=3e-3,
        batch_size=50,
        device="cpu",
        checkpoint_every_s=0,
    )
    full = run_experiment({**o, "out": str(tmp_path / "a")}, data, progress=False)
    # the bare run neither draws the subsample nor scores it: the trainer as it was before train_nll
    monkeypatch.setattr(trainer_mod, "train_subsample", lambda x, n: x[:0])
    monkeypatch.setattr(trainer_mod, "training_nll", lambda *a, **k: (math.nan, 0))
    bare = run_experiment({**o, "out": str(tmp_path / "b")}, data, progress=False)
    keys = ("epoch", "step", "train_loss", "val_ll", "n_nonfinite_val")
    assert [{k: h[k] for k in keys} for h in full.history] == [{k: h[k] for k in keys} for h in bare.history]
    assert full.test_ll == bare.test_ll and full.best_val_ll == bare.best_val_ll
    assert all(math.isfinite(h["train_nll"]) for h in full.history)


# -- curves -------------------------------------------------------------------------------------------------------
def _record(model, seed, val, train_loss, train_nll=None, dataset="power"):
    rows = []
    for i, (v, t) in enumerate(zip(val, train_loss)):
        row = {"epoch": i + 1, "train_loss": t, "val_ll": v}
        if train_nll is not None:
            row["train_nll"] = train_nll[i]
        rows.append(row)
    return RunRecord.example(
        dataset=dataset,
        model=model,
        display_name=model,
        seed=seed,
        config={},
        hparams={},
        epochs=len(val),
        best_epoch=int(np.argmax(val)) + 1,
        best_val_ll=max(val),
        stop_reason="reached max_epochs=3",
        history=rows,
    )


def _gid(ax, gid):
    return [a for a in ax.get_children() if a.get_gid() == gid]


def test_curves_plot_the_exact_nll_and_older_records_their_loss():
    """New records: the training panel is the mean over seeds of train_nll (solid); a configuration with records
    written before train_nll existed falls back to its running loss (dotted), and the title says what that is."""
    new = [
        _record("relgrad", s, [-3.0, -2.9, -2.88], [24.6, 24.59, 24.58], [3.1 + s, 3.0 + s, 2.95 + s]) for s in (0, 1)
    ]
    old = [_record("maf", 0, [-1.0, -0.5, 0.1], [1.2, 0.6, 0.0])]
    assert not R.history(old[0]).has_train_nll and R.history(new[0]).has_train_nll
    fig = plot_curves(new + old, sources=())
    val_ax, loss_ax = fig.axes[:2]
    (exact,) = _gid(loss_ax, "loss-mean")
    np.testing.assert_allclose(exact.get_ydata(), [3.6, 3.5, 3.45])
    assert exact.get_linestyle() == "-"
    (fallback,) = _gid(loss_ax, "loss-fallback")
    np.testing.assert_allclose(fallback.get_ydata(), [1.2, 0.6, 0.0])
    assert fallback.get_linestyle() == ":"
    assert loss_ax.get_ylabel() == LOSS_LABEL == "training NLL (nats per example)"
    title = loss_ax.get_title()
    assert "training NLL" in title and "dotted: older records' running training loss" in title
    assert "log|det W|" not in title  # relgrad's records here are new: nothing to excuse
    pyplot().close(fig)
    # an older relgrad record: its running loss is not its NLL, and the title says so
    fig = plot_curves([_record("relgrad", 0, [-3.0, -2.9], [24.6, 24.58])], sources=())
    assert "relgrad's: without log|det W|, not its NLL" in fig.axes[1].get_title()
    assert _gid(fig.axes[1], "loss-fallback") and not _gid(fig.axes[1], "loss-mean")
    pyplot().close(fig)


def test_curves_of_a_real_relgrad_run_show_its_train_nll(tmp_path):
    data = data4()
    rec = run_experiment(
        {"model": "relgrad", "max_epochs": 2, "lr": 1e-3, "batch_size": 50, "device": "cpu", "out": str(tmp_path)},
        data,
        progress=False,
    )
    fig = plot_curves([rec], sources=())
    (line,) = _gid(fig.axes[1], "loss-mean")
    np.testing.assert_allclose(line.get_ydata(), [h["train_nll"] for h in rec.history])
    pyplot().close(fig)


# -- TensorBoard ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,loss_tag", [("relgrad", "train_loss_not_nll"), ("maf", "train_loss")])
def test_tensorboard_logs_the_exact_nll_and_names_the_loss(tmp_path, model, loss_tag):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowbench.training.tensorboard import run_log_dir

    data = data4()
    hp = {"layers": 1, "hidden": 8} if model == "maf" else {"layers": 2}
    rec = run_experiment(
        {
            "model": model,
            **hp,
            "max_epochs": 2,
            "lr": 1e-3,
            "batch_size": 50,
            "device": "cpu",
            "out": str(tmp_path),
            "tensorboard": str(tmp_path / "tb"),
        },
        data,
        progress=False,
    )
    acc = EventAccumulator(str(run_log_dir(tmp_path / "tb", "toy4", model, 0)))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {loss_tag, "train_nll", "val_ll", "best_val_ll"} <= tags
    assert ("train_loss" in tags) == (loss_tag == "train_loss")  # relgrad's loss is never called train_loss
    np.testing.assert_allclose(
        [e.value for e in acc.Scalars("train_nll")], [h["train_nll"] for h in rec.history], rtol=1e-6
    )
    np.testing.assert_allclose(
        [e.value for e in acc.Scalars(loss_tag)], [h["train_loss"] for h in rec.history], rtol=1e-6
    )


def test_scoring_the_training_nll_adds_no_log_determinant(monkeypatch):
    """relgrad's exact log-likelihood needs Σ log|det W| (slogdet, O(D³)); validation computes it once per epoch
    and the training NLL reuses it, so a run computes exactly as many as one that does not score the training
    NLL (a mode switch between the two would drop the cached value and recompute it)."""
    data = data4()
    train_x, val_x = torch.tensor(data.train), torch.tensor(data.val)
    calls = []
    real = torch.linalg.slogdet
    monkeypatch.setattr(torch.linalg, "slogdet", lambda w: calls.append(1) or real(w))

    def count() -> int:
        calls.clear()
        torch.manual_seed(0)
        flow = models.build_model("relgrad", 4, layers=2)
        Trainer(flow, train_x, val_x, lr=1e-3, max_epochs=3, batch_size=50, progress=False).fit()
        return len(calls)

    with_nll = count()
    monkeypatch.setattr(trainer_mod, "training_nll", lambda *a, **k: (math.nan, 0))
    assert with_nll == count() > 0
