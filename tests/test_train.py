"""Trainer and run_experiment: early stopping, batch-norm statistics, resume, NaN guard, sanity vs truth."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch import Tensor, nn
from toy_flows import ShiftScale, tiny_flow

import flowbench.models as models
from flowbench.data.base import Dataset
from flowbench.errors import ConfigError, UsageError
from flowbench.models.base import CompositeTransform, Flow, StandardNormal
from flowbench.models.spec import ModelSpec
from flowbench.results import checkpoint_path, record_path
from flowbench.training import EarlyStopping, Trainer, run_experiment
from flowbench.training.evaluate import mean_2se

COV = np.array([[1.0, 0.6, 0.2], [0.6, 2.0, -0.4], [0.2, -0.4, 0.5]])
MEAN = np.array([0.5, -1.0, 2.0])


def gaussian_data(n_train=1500, n_val=300, n_test=1500, seed=1) -> Dataset:
    rng = np.random.RandomState(seed)
    x = rng.multivariate_normal(MEAN, COV, size=n_train + n_val + n_test).astype(np.float32)
    return Dataset("toy", x[:n_train], x[n_train : n_train + n_val], x[n_train + n_val :])


class NaNFlow(Flow):
    """Becomes non-finite after ``after`` training steps (a model that diverges)."""

    def __init__(self, dim: int, after: int = 25):
        super().__init__(CompositeTransform([ShiftScale(dim)]), StandardNormal(dim), dim)
        self.calls, self.after = 0, after

    def train_log_prob(self, x: Tensor) -> Tensor:
        self.calls += 1
        lp = self.log_prob(x)
        return lp * math.nan if self.calls > self.after else lp


@pytest.fixture
def tiny_models(monkeypatch):
    """Register test-only models 'tiny' and 'nanflow' beside the real registry."""
    for name, build in {"tiny": tiny_flow, "nanflow": NaNFlow}.items():
        spec = ModelSpec(name=name, build=build, hparams={}, label=name.upper(), paper="test", lr=1e-3)
        monkeypatch.setitem(models.MODELS, name, spec)


def opts(tmp_path, **kw):
    return {"out": str(tmp_path), "batch_size": 100, "device": "cpu", **kw}


# -- early stopping --------------------------------------------------------------------------------------
def test_early_stopping_counts_restores_stops():
    lin = nn.Linear(2, 2)
    es = EarlyStopping(patience=3)
    snapshots = {}
    for epoch, v in enumerate([1.0, 2.0, 1.5, 1.9, 1.8], start=1):
        with torch.no_grad():
            lin.weight.fill_(epoch)
        snapshots[epoch] = lin.weight.clone()
        improved = es.step(v, epoch, lin)
        assert improved == (epoch in (1, 2))
        assert es.should_stop == (epoch == 5)
    assert (es.best_epoch, es.best_value, es.bad_epochs, es.patience_left) == (2, 2.0, 3, 0)
    assert es.restore(lin) and torch.equal(lin.weight, snapshots[2])
    es2 = EarlyStopping(3)
    es2.load_state_dict(es.state_dict())
    assert (es2.best_epoch, es2.bad_epochs) == (2, 3)
    assert not EarlyStopping(2).step(math.nan, 1, lin)  # NaN is never an improvement


class ScriptedVal(Flow):
    """Validation LL follows a script (one value per prepare_for_eval call); training is real."""

    def __init__(self, dim: int, script: list[float]):
        super().__init__(CompositeTransform([ShiftScale(dim)]), StandardNormal(dim), dim)
        self.script, self.k, self.events = script, -1, []

    def prepare_for_eval(self, train_x: Tensor, batch_size: int = 10_000) -> None:
        self.k += 1
        self.events.append(("prepare", train_x))

    def log_prob(self, x: Tensor) -> Tensor:
        if self.training:
            return super().log_prob(x)
        self.events.append(("eval", x.shape[0]))
        return x.new_full((x.shape[0],), self.script[self.k])


def test_trainer_stops_after_patience_and_restores_best():
    data = gaussian_data(300, 50, 50)
    train_x, val_x = torch.tensor(data.train), torch.tensor(data.val)
    flow = ScriptedVal(3, [0.0, 1.0, 3.0, 2.0, 2.5, 2.9, 9.0, 9.0])
    states = {}
    tr = Trainer(
        flow,
        train_x,
        val_x,
        lr=1e-2,
        patience=3,
        progress=False,
        callbacks=[lambda info: states.__setitem__(info.epoch, {k: v.clone() for k, v in flow.state_dict().items()})],
    )
    res = tr.fit()
    assert (res.epochs, res.best_epoch, res.best_val_ll) == (6, 3, 3.0)  # epochs 4, 5, 6 did not improve
    assert "no improvement for 3 epochs" in res.stop_reason
    for k, v in flow.state_dict().items():
        assert torch.equal(v, states[3][k])  # the best parameters are back
    assert not torch.equal(states[3]["transform.transforms.0.m"], states[6]["transform.transforms.0.m"])
    # validation always comes right after prepare_for_eval on the *whole* training set; once more at the end
    prepares = [e for e in flow.events if e[0] == "prepare"]
    assert len(prepares) == 6 + 1 and all(e[1] is train_x for e in prepares)
    assert all(
        flow.events[i - 1][0] == "prepare"
        for i, e in enumerate(flow.events)
        if e[0] == "eval" and (i == 0 or flow.events[i - 1][0] != "eval")
    )


def test_batchnorm_statistics_from_full_training_set():
    layers = pytest.importorskip("flowbench.models.layers")
    data = gaussian_data(500, 100, 100)
    train_x, val_x = torch.tensor(data.train), torch.tensor(data.val)
    shift = ShiftScale(3)
    bn = layers.BatchNorm(3)
    flow = Flow(CompositeTransform([shift, bn]), StandardNormal(3), 3)
    checked = []

    def check(info):
        with torch.no_grad():
            h = shift(train_x)[0].double()
        torch.testing.assert_close(bn.stat_mean.double(), h.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.stat_var.double(), h.var(0, unbiased=False) + 1e-5, atol=1e-5, rtol=1e-5)
        # ... and not the statistics of the last minibatch (batch 100 of 500)
        assert not torch.allclose(bn.stat_mean.double(), h[-100:].mean(0), atol=1e-3)
        checked.append(info.epoch)

    Trainer(flow, train_x, val_x, lr=1e-2, max_epochs=2, patience=5, progress=False, callbacks=[check]).fit()
    assert checked == [1, 2]


# -- resume ------------------------------------------------------------------------------------------------
class Kill(Exception):
    pass


def numbers(history):
    """A history without each epoch's wall time (the one entry that differs between two identical runs)."""
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    data = gaussian_data(400, 100, 200)
    o = dict(model="maf", layers=2, hidden=8, max_epochs=5, patience=50, seed=3, lr=3e-3, checkpoint_every_s=0)
    full = run_experiment(opts(tmp_path / "a", **o), data, progress=False)

    def kill(info):
        if info.epoch == 2:
            raise Kill

    with pytest.raises(Kill):
        run_experiment(opts(tmp_path / "b", **o), data, progress=False, callbacks=[kill])
    assert checkpoint_path(tmp_path / "b", "toy", "maf", 3).is_file()
    assert not record_path(tmp_path / "b", "toy", "maf", 3).exists()
    with pytest.raises(ConfigError, match="different options.*lr"):
        run_experiment(opts(tmp_path / "b", **dict(o, lr=1e-3), resume=True), data, progress=False)
    resumed = run_experiment(opts(tmp_path / "b", **o, resume=True, keep_checkpoint=True), data, progress=False)
    assert numbers(resumed.history) == numbers(full.history)  # every epoch's numbers, bit for bit
    assert all(h["seconds"] > 0 for h in full.history)
    assert resumed.test_ll == full.test_ll and resumed.best_epoch == full.best_epoch
    assert resumed.epochs == 5 and any("resumed" in n for n in resumed.notes)
    # A finished run can be continued to a later epoch cap (the record is then replaced: --force).
    longer = run_experiment(
        opts(tmp_path / "b", **dict(o, max_epochs=6), resume=True, force=True), data, progress=False
    )
    again = run_experiment(opts(tmp_path / "c", **dict(o, max_epochs=6)), data, progress=False)
    assert numbers(longer.history) == numbers(again.history) and longer.test_ll == again.test_ll


def test_a_resume_may_raise_the_patience_and_then_equals_a_run_that_had_it_from_the_start(tmp_path):
    """Issue 24: a run whose patience turns out too short for its schedule is resumed with a larger one. Here
    patience 1 stops at epoch 4 and patience 2 trains to epoch 9; killed at epoch 2 under patience 1 and resumed
    under 2, the run is bit for bit the patience-2 run. Lowering it, or raising it for a finished run, is refused."""
    data = gaussian_data(400, 100, 200)
    o = dict(model="maf", layers=2, hidden=8, max_epochs=12, seed=3, lr=3e-2, checkpoint_every_s=0)
    short = run_experiment(opts(tmp_path / "a", **o, patience=1), data, progress=False)
    full = run_experiment(opts(tmp_path / "b", **o, patience=2), data, progress=False)
    assert short.epochs < full.epochs  # the raise matters: patience 1 alone stops earlier

    def kill(info):
        if info.epoch == 2:
            raise Kill

    with pytest.raises(Kill):
        run_experiment(opts(tmp_path / "c", **o, patience=1), data, progress=False, callbacks=[kill])
    resumed = run_experiment(opts(tmp_path / "c", **o, patience=2, resume=True), data, progress=False)
    assert numbers(resumed.history) == numbers(full.history)
    assert resumed.test_ll == full.test_ll and resumed.config["patience"] == 2
    with pytest.raises(Kill):
        run_experiment(opts(tmp_path / "d", **o, patience=2), data, progress=False, callbacks=[kill])
    with pytest.raises(ConfigError, match="made with patience 2; a resume may raise the patience but not lower it"):
        run_experiment(opts(tmp_path / "d", **o, patience=1, resume=True), data, progress=False)
    run_experiment(opts(tmp_path / "e", **o, patience=1, keep_checkpoint=True), data, progress=False)
    with pytest.raises(ConfigError, match="already finished .* a raised patience cannot continue it"):
        run_experiment(opts(tmp_path / "e", **o, patience=2, resume=True, force=True), data, progress=False)


def test_a_checkpoint_from_before_an_option_existed_resumes_only_at_its_default(tmp_path):
    """A checkpoint written before an option (or a model hyperparameter) existed has no entry for it: it trained
    as that option's default does, so it resumes while the option has its default now and is refused otherwise."""
    from flowbench.config import UNKNOWN_DEFAULT, unset_value

    data = gaussian_data(400, 100, 200)
    o = dict(
        model="maf",
        layers=1,
        hidden=8,
        batch_norm=True,
        max_epochs=2,
        patience=50,
        seed=3,
        lr=3e-3,
        checkpoint_every_s=0,
    )
    run_experiment(opts(tmp_path / "a", **o, keep_checkpoint=True), data, progress=False)
    ckpt = checkpoint_path(tmp_path / "a", "toy", "maf", 3)
    state = torch.load(ckpt, weights_only=True)
    added_since = {"lr_schedule": "constant", "adam_epoch_step": False, "grad_clip": None, "batch_norm": True}
    for key, value in added_since.items():
        assert state["fingerprint"].pop(key) == value
    torch.save(state, ckpt)
    more = dict(o, max_epochs=3)
    for key, other in [("lr_schedule", "cosine"), ("adam_epoch_step", True), ("grad_clip", 5.0), ("batch_norm", False)]:
        extra = {"max_steps": 100} if key == "lr_schedule" else {}
        with pytest.raises(ConfigError, match=rf"different options \({key}(, max_steps)?\)"):
            run_experiment(
                opts(tmp_path / "a", **dict(more, **extra, **{key: other}), resume=True, force=True),
                data,
                progress=False,
            )
    # at their defaults (batch_norm given explicitly, the others unset) the old checkpoint resumes
    resumed = run_experiment(opts(tmp_path / "a", **more, resume=True, force=True), data, progress=False)
    assert resumed.epochs == 3 and any("resumed from the checkpoint after epoch 2" in n for n in resumed.notes)
    # what a key missing on one side stands for
    assert unset_value("lr_schedule", {"model": "maf"}) == "constant" and unset_value("grad_clip", {}) is None
    assert unset_value("batch_norm", {"model": "maf"}) is True and unset_value("model_ref", {}) is None
    assert unset_value("no_such_option", {"model": "maf"}) is UNKNOWN_DEFAULT != UNKNOWN_DEFAULT


def test_checkpoints_on_a_time_cadence_still_resume_exactly(tmp_path, monkeypatch):
    """Every epoch takes 10 s of a fake clock (it ticks after the epoch's checkpoint decision); with
    checkpoint_every_s = 15 checkpoints follow epochs 3, 5 and 7 (the end); a kill after epoch 4 resumes from
    epoch 3 and ends exactly as the uninterrupted run."""
    import types

    from flowbench.training import loop as loop_mod
    from flowbench.training import trainer as trainer_mod
    from flowbench.utils import atomic_torch_save

    clock = [0.0]
    monkeypatch.setattr(loop_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))  # the loop's clock
    saved: list[int] = []

    def save(path, state):
        if "epoch" in state:  # training checkpoints (not the model-state file kept after the record)
            saved.append(state["epoch"])
        atomic_torch_save(path, state)

    monkeypatch.setattr(trainer_mod, "atomic_torch_save", save)

    def tick(info):
        clock[0] += 10.0

    data = gaussian_data(400, 100, 200)
    o = dict(model="maf", layers=2, hidden=8, max_epochs=7, patience=50, seed=3, lr=3e-3, checkpoint_every_s=15)
    full = run_experiment(opts(tmp_path / "a", **o), data, progress=False, callbacks=[tick])
    assert saved == [3, 5, 7]  # due 20 s after the start or the last checkpoint
    assert [h["seconds"] for h in full.history] == [0.0] * 7  # the fake clock stands still within an epoch

    def kill(info):
        if info.epoch == 4:
            raise Kill

    saved.clear()
    with pytest.raises(Kill):
        run_experiment(opts(tmp_path / "b", **o), data, progress=False, callbacks=[tick, kill])
    assert saved == [3]
    resumed = run_experiment(opts(tmp_path / "b", **o, resume=True), data, progress=False, callbacks=[tick])
    assert any("resumed from the checkpoint after epoch 3" in n for n in resumed.notes)
    assert numbers(resumed.history) == numbers(full.history) and resumed.test_ll == full.test_ll
    # every epoch (0) and never before the end (a huge cadence) give the same run
    every = run_experiment(opts(tmp_path / "c", **dict(o, checkpoint_every_s=0)), data, progress=False)
    saved.clear()
    once = run_experiment(opts(tmp_path / "d", **dict(o, checkpoint_every_s=1e9)), data, progress=False)
    assert saved == [7] and numbers(every.history) == numbers(once.history) == numbers(full.history)


def test_record_refuses_overwrite(tmp_path, tiny_models):
    data = gaussian_data(200, 50, 50)
    run_experiment(opts(tmp_path, model="tiny", max_epochs=1), data, progress=False)
    with pytest.raises(UsageError, match="already exists.*--force"):
        run_experiment(opts(tmp_path, model="tiny", max_epochs=1), data, progress=False)
    run_experiment(opts(tmp_path, model="tiny", max_epochs=1, force=True), data, progress=False)
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_experiment(opts(tmp_path, model="tiny", seed=9, resume=True), data, progress=False)


# -- NaN guard ---------------------------------------------------------------------------------------------
def test_nan_guard_stops_keeps_best_and_records(tmp_path, tiny_models):
    data = gaussian_data(500, 100, 100)  # 5 batches per epoch; NaN from step 26 = epoch 6
    rec = run_experiment(opts(tmp_path, model="nanflow", max_epochs=20, lr=1e-2), data, progress=False)
    assert rec.status == "nonfinite"
    assert "non-finite training loss" in rec.failure and "epoch 6" in rec.failure
    assert rec.epochs == 6 and rec.best_epoch == 5
    assert math.isfinite(rec.test_ll) and math.isfinite(rec.best_val_ll)
    on_disk = json.loads(record_path(tmp_path, "toy", "nanflow", 0).read_text())
    assert on_disk["status"] == "nonfinite" and on_disk["failure"] == rec.failure


def test_a_run_that_diverges_before_its_first_validation_says_it_has_no_best_model(tmp_path, capsys, monkeypatch):
    # "keeping the best model so far" was logged with no validated epoch at all, and the summary read
    # "val LL nan"; the diverged model is what the test set scores, and the run says so.
    from flowbench.training.experiment import summary_line

    spec = ModelSpec(
        name="nanearly", build=lambda dim: NaNFlow(dim, after=1), hparams={}, label="E", paper="t", lr=1e-3
    )
    monkeypatch.setitem(models.MODELS, "nanearly", spec)
    rec = run_experiment(opts(tmp_path, model="nanearly", max_epochs=3), gaussian_data(500, 100, 100))
    assert rec.status == "nonfinite" and rec.best_epoch is None and rec.epochs == 1
    log = capsys.readouterr().err
    assert "stopping, no epoch was validated before it, so the test set scores the diverged model" in log
    assert "keeping the best model so far" not in log
    assert "(no epoch validated, non-finite loss," in summary_line(rec, "r.json")


# -- evaluation --------------------------------------------------------------------------------------------
def test_mean_2se_matches_maf_formula():
    v = np.array([1.0, 2.0, 4.0, 7.0])
    assert mean_2se(v) == (3.5, 2 * np.std(v) / 2.0)
    # a non-finite value: the mean says it, no error bar, and no numpy warning (a diverged model's pixel LLs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mean_2se(np.array([1.0, -np.inf])) == (-np.inf, pytest.approx(np.nan, nan_ok=True))
        mean, err = mean_2se(np.array([np.inf, -np.inf, 1.0]))
    assert math.isnan(mean) and math.isnan(err)


def test_no_model_beats_the_true_density(tmp_path):
    """On data from a known Gaussian, test LL ≤ the true density's LL + the model's error bar."""
    data = gaussian_data()
    true_ll = multivariate_normal(MEAN, COV).logpdf(data.test.astype(np.float64)).mean()
    configs = [
        dict(model="gaussian"),
        dict(model="made", hidden=16, lr=1e-2),
        dict(model="made-mog", hidden=16, components=3, lr=1e-2),
        dict(model="maf", layers=2, hidden=16, lr=1e-2),
        dict(model="realnvp", layers=2, hidden=16, lr=1e-2),
        dict(model="relgrad", lr=1e-2),
    ]
    for c in configs:
        rec = run_experiment(opts(tmp_path, max_epochs=4, **c), data, progress=False)
        assert rec.status == "ok", rec.failure
        assert rec.test_ll <= true_ll + rec.test_ll_2se, (c, rec.test_ll, true_ll)
        assert rec.test_ll > true_ll - 3.0, (c, rec.test_ll, true_ll)  # and it did learn something
        if c["model"] == "gaussian":
            assert rec.epochs == 0 and abs(rec.test_ll - true_ll) < rec.test_ll_2se


def test_match_params(tmp_path):
    data = gaussian_data(200, 50, 50)
    rec = run_experiment(opts(tmp_path, model="maf", layers=2, match_params=2000, max_epochs=1), data, progress=False)
    m = rec.match_target
    assert m["target"] == 2000 and m["achieved"] == rec.params and abs(m["achieved"] - 2000) < 200
    rec = run_experiment(opts(tmp_path, model="made", match_params="relgrad", max_epochs=1), data, progress=False)
    # relgrad with 2 layers and biases on D = 3: L(D² + D) = 24
    assert rec.match_target["target"] == 24 and rec.match_target["against"] == "relgrad"
    with pytest.raises(ConfigError, match="does not apply"):
        run_experiment(opts(tmp_path, model="relgrad", hidden=8, max_epochs=1, tag="x"), data, progress=False)


class ZeroGrad(Flow):
    """A training objective with no gradient: only the L2 term can move the parameters."""

    def __init__(self, dim: int):
        super().__init__(CompositeTransform([ShiftScale(dim)]), StandardNormal(dim), dim)
        with torch.no_grad():
            self.transform.transforms[0].m.fill_(1.0)

    def train_log_prob(self, x: Tensor) -> Tensor:
        # the value of the likelihood, but no gradient from it (the parameters enter times zero)
        return self.log_prob(x).detach() + 0.0 * sum(p.sum() for p in self.parameters())


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_l2_penalty_is_applied_by_the_optimiser_step(wd):
    data = gaussian_data(200, 50, 50)
    flow = ZeroGrad(3)
    Trainer(
        flow, torch.tensor(data.train), torch.tensor(data.val), lr=1e-2, weight_decay=wd, max_epochs=1, progress=False
    ).fit()
    m = flow.transform.transforms[0].m.detach()
    if wd == 0:
        assert torch.equal(m, torch.ones(3))  # nothing but the (wiped) likelihood gradient
    else:
        assert (m < 1).all()  # the penalty's gradient wd·w survived the model's gradient transform


def test_summary_line_says_when_the_config_is_unverified():
    from flowbench.results import RunRecord
    from flowbench.training.experiment import summary_line

    ours = RunRecord.example(provenance={"verified": False, "source": "ours"})  # MAF (5) on POWER: published
    assert "(ours, config unverified" in summary_line(ours, "x.json") and "0.14" in summary_line(ours, "x.json")
    digits = RunRecord.example(dataset="digits", provenance={"verified": False, "source": "ours"})
    assert "unverified" not in summary_line(digits, "x.json")  # no published number to mistake it for
    paper = RunRecord.example(provenance={"verified": True, "source": "MAF paper section 4"})
    assert "unverified" not in summary_line(paper, "x.json")
    assert "unverified" not in summary_line(RunRecord.example(), "x.json")


_FAULTS = """
import resource, sys, torch
from flowbench.utils import keep_freed_memory
on = sys.argv[1] == "on" and keep_freed_memory()
w = torch.randn(4, 784, 784)
def step():
    g = [w * 0.5 for _ in range(4)]  # a stacked relgrad step's 9.8 MB gradients, freed after the update
    return sum(t.sum() for t in g)
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    step()
print(int(on), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not __import__("platform").libc_ver()[0] == "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_stops_per_step_page_faults():
    """What the trainers set on the CPU: freed gradient-sized blocks are reused, not faulted in again (the
    same loop faults without it: measured 382,880 faults in 40 steps, 0–2,401 with it)."""
    import subprocess
    import sys

    faults = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        on, n = map(int, out.stdout.split())
        assert on == (mode == "on")
        faults[mode] = n
    pages = 40 * 4 * (4 * 784 * 784 * 4) // 4096  # every page the 40 measured steps allocate (384,160)
    assert faults["off"] > pages // 50, faults  # the loop does fault without the setting (the test can fail)
    assert faults["on"] < pages // 40, faults  # at most a block or two while the heap settles


def test_both_trainers_keep_freed_memory_on_the_cpu(monkeypatch):
    """The setting above is what the trainers ask for when their data are on the CPU (each, once built)."""
    from flowbench.training import stacked, trainer
    from flowbench.training.stacked import RunSpec, StackedTrainer

    calls = []
    for module in (trainer, stacked):
        monkeypatch.setattr(module, "keep_freed_memory", lambda module=module: calls.append(module.__name__))
    x = torch.randn(20, 2)
    Trainer(tiny_flow(), x, x, lr=1e-3, progress=False)
    StackedTrainer([RunSpec(tiny_flow(), 0, 1e-3)], x, x, progress=False)
    assert calls == ["flowbench.training.trainer", "flowbench.training.stacked"]
