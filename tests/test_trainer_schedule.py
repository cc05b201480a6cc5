"""The trainer's step-budget options (the NSF protocol's needs, as general options): max_steps, the cosine
learning-rate schedule, gradient-norm clipping, evaluation every N steps, and exact resume mid-epoch."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn
from toy_flows import ShiftScale
from toy_flows import tiny_flow as tiny

from flowbench.errors import ConfigError, advice_format
from flowbench.models.base import CompositeTransform, Flow, StandardNormal
from flowbench.models.nsf import NSF_AR_SPEC
from flowbench.training import Trainer


def data(n: int, dim: int = 2, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) * torch.tensor([2.0, 0.5][:dim]) + 1.0


class StepLog:
    """Records, at every optimiser step, the learning rate and the global gradient norm Adam is given."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.lrs: list[float] = []
        self.norms: list[float] = []
        step = optimizer.step

        def logged(*args, **kwargs):  # not a step pre-hook: torch 2.1 skips those once dynamo has been imported
            self(optimizer, args, kwargs)
            return step(*args, **kwargs)

        optimizer.step = logged

    def __call__(self, opt, args, kwargs) -> None:
        self.lrs.append(opt.param_groups[0]["lr"])
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))


def trainer(flow: Flow, n: int = 250, **kw) -> Trainer:
    kw = {"lr": 1e-2, "batch_size": 100, "patience": 1000, "progress": False, **kw}
    return Trainer(flow, data(n), data(60, seed=1), **kw)


# -- max_steps and the cosine schedule --------------------------------------------------------------------
def test_cosine_schedule_matches_torch_cosine_annealing():
    tr = trainer(tiny(), max_steps=37, lr_schedule="cosine", lr=3e-3)
    log = StepLog(tr.optimizer)
    res = tr.fit()
    # the reference: torch's scheduler stepped once per optimiser step, as bayesiains/nsf uci.py does
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=37, eta_min=0)
    want = []
    for _ in range(37):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert len(log.lrs) == 37 and res.steps == 37
    assert log.lrs == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert log.lrs[0] == 3e-3 and 0 < log.lrs[-1] < 1e-5
    const = trainer(tiny(), max_steps=5, lr=3e-3)
    log = StepLog(const.optimizer)
    const.fit()
    assert log.lrs == [3e-3] * 5


def test_max_steps_stops_mid_epoch_after_a_last_evaluation():
    tr = trainer(tiny(), max_steps=7)  # 250 rows, batches of 100: 3 steps per epoch
    log = StepLog(tr.optimizer)
    res = tr.fit()
    assert res.stop_reason == "reached max_steps=7"
    # epoch mode: an evaluation at each epoch end, and one where the budget ran out (in epoch 3)
    assert [(h["epoch"], h["step"]) for h in res.history] == [(1, 3), (2, 6), (3, 7)]
    # epoch 3, trained in part and evaluated, counts as run: the best epoch can be 3, never past the epochs run
    assert len(log.lrs) == 7 and (res.steps, res.epochs) == (7, 3) and res.best_epoch <= res.epochs


def test_max_epochs_still_caps_step_mode():
    res = trainer(tiny(), eval_every=2, max_epochs=2).fit()  # 6 steps: evaluations at 2, 4, 6
    assert [h["step"] for h in res.history] == [2, 4, 6] and res.stop_reason == "reached max_epochs=2"


# -- gradient clipping ------------------------------------------------------------------------------------
class LoudGradients(Flow):
    """The training objective is 1000× the log-density: clipping must act on the gradient Adam is given."""

    def __init__(self):
        super().__init__(CompositeTransform([ShiftScale(2)]), StandardNormal(2), 2)

    def train_log_prob(self, x):
        return 1000.0 * self.log_prob(x)


def test_grad_clip_bounds_the_norm_adam_is_given():
    torch.manual_seed(0)
    unclipped = trainer(LoudGradients(), max_steps=6)
    log = StepLog(unclipped.optimizer)
    unclipped.fit()
    assert min(log.norms) > 10.0  # without clipping the norms are large
    clipped = trainer(LoudGradients(), max_steps=6, grad_clip=2.5)
    log_c = StepLog(clipped.optimizer)
    clipped.fit()
    assert max(log_c.norms) == pytest.approx(2.5, rel=1e-5)  # every step was over the bound: rescaled onto it


def test_grad_clip_leaves_small_gradients_alone():
    a, b = trainer(tiny(), max_steps=9), trainer(tiny(), max_steps=9, grad_clip=1e6)
    a.fit(), b.fit()
    for (ka, va), (kb, vb) in zip(a.flow.state_dict().items(), b.flow.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# -- evaluation every N steps -----------------------------------------------------------------------------
class ScriptedVal(Flow):
    """Validation LL follows a script (one value per evaluation); training is real."""

    def __init__(self, script: list[float]):
        super().__init__(CompositeTransform([ShiftScale(2)]), StandardNormal(2), 2)
        self.script, self.k = script, -1

    def prepare_for_eval(self, train_x: Tensor, batch_size: int = 10_000) -> None:
        self.k += 1

    def log_prob(self, x: Tensor) -> Tensor:
        if self.training:
            return super().log_prob(x)
        return x.new_full((x.shape[0],), self.script[min(self.k, len(self.script) - 1)])


def test_eval_every_spans_epochs_counts_patience_in_evaluations_and_restores_best():
    flow = ScriptedVal([0.0, 1.0, 5.0, 2.0, 3.0, 4.0, 9.0])
    snapshots = {}
    tr = trainer(
        flow,
        eval_every=2,
        patience=3,
        callbacks=[lambda info: snapshots.__setitem__(info.step, {k: v.clone() for k, v in flow.state_dict().items()})],
    )
    res = tr.fit()
    # 3 steps per epoch; evaluations after steps 2, 4, …; the best is the third (step 6, in epoch 2)
    assert [(h["step"], h["epoch"]) for h in res.history] == [(2, 1), (4, 2), (6, 2), (8, 3), (10, 4), (12, 4)]
    assert (res.best_step, res.best_epoch, res.best_val_ll, res.steps) == (6, 2, 5.0, 12)
    assert res.stop_reason == "no improvement for 3 evaluations (2 steps apart)"
    for k, v in flow.state_dict().items():
        assert torch.equal(v, snapshots[6][k])
    assert not torch.equal(snapshots[6]["transform.transforms.0.m"], snapshots[12]["transform.transforms.0.m"])


def test_eval_every_one_epoch_is_epoch_mode():
    a = trainer(tiny(), max_epochs=4, seed=3)
    b = trainer(tiny(), eval_every=a.batches_per_epoch, max_steps=4 * a.batches_per_epoch, seed=3)
    ra, rb = a.fit(), b.fit()
    assert [(h["epoch"], h["step"], h["train_loss"], h["val_ll"]) for h in ra.history] == [
        (h["epoch"], h["step"], h["train_loss"], h["val_ll"]) for h in rb.history
    ]
    for va, vb in zip(a.flow.state_dict().values(), b.flow.state_dict().values()):
        assert torch.equal(va, vb)
    assert ra.best_epoch == rb.best_epoch and ra.best_step == rb.best_step == 12


# -- exact resume -----------------------------------------------------------------------------------------
class Kill(Exception):
    pass


def nsf_trainer(ckpt, callbacks=()) -> Trainer:
    torch.manual_seed(5)
    hp = NSF_AR_SPEC.resolve({"layers": 2, "hidden": 8, "blocks": 1, "bins": 4, "dropout": 0.3})
    flow = NSF_AR_SPEC.build(2, **hp)
    # 300 rows in batches of 64: 5 steps per epoch, so evaluations every 4 steps fall mid-epoch
    return Trainer(
        flow,
        data(300),
        data(60, seed=1),
        lr=3e-3,
        batch_size=64,
        patience=100,
        seed=7,
        max_steps=23,
        lr_schedule="cosine",
        grad_clip=1.0,
        eval_every=4,
        checkpoint_path=ckpt,
        fingerprint={"k": 1},
        callbacks=list(callbacks),
        progress=False,
    )


def test_kill_mid_epoch_and_resume_equals_uninterrupted(tmp_path):
    full_tr = nsf_trainer(tmp_path / "full.ckpt")
    full = full_tr.fit()

    def kill(info):
        if info.step == 12:  # mid epoch 3, after that evaluation's checkpoint
            raise Kill

    with pytest.raises(Kill):
        nsf_trainer(tmp_path / "b.ckpt", [kill]).fit()
    torch.manual_seed(99)  # the resumed process starts from other random states: the checkpoint restores them
    resumed_tr = nsf_trainer(tmp_path / "b.ckpt")
    resumed_tr.load_checkpoint()
    assert (resumed_tr._step, resumed_tr._pos) == (12, 2)
    resumed = resumed_tr.fit()
    # every evaluation, bit for bit (dropout and shuffles included), but each one's wall time
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == [
        {k: v for k, v in h.items() if k != "seconds"} for h in full.history
    ]
    assert (resumed.steps, resumed.best_step, resumed.best_val_ll) == (full.steps, full.best_step, full.best_val_ll)
    for (k, a), b in zip(full_tr.flow.state_dict().items(), resumed_tr.flow.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["step"] for h in full.history] == [4, 8, 12, 16, 20, 23]


def test_epoch_checkpoints_of_format_1_still_resume(tmp_path):
    full_tr = trainer(tiny(), max_epochs=4, checkpoint_path=tmp_path / "a.ckpt", seed=2)
    full = full_tr.fit()
    trainer(tiny(), max_epochs=2, checkpoint_path=tmp_path / "b.ckpt", seed=2).fit()
    state = torch.load(tmp_path / "b.ckpt", weights_only=True)
    for key in ("step", "pos", "epoch_rng", "best_step"):
        del state[key]
    state["format"] = 1
    torch.save(state, tmp_path / "b.ckpt")
    resumed_tr = trainer(tiny(), max_epochs=4, checkpoint_path=tmp_path / "b.ckpt", seed=2)
    resumed_tr.load_checkpoint()
    resumed = resumed_tr.fit()
    assert [h["val_ll"] for h in resumed.history] == [h["val_ll"] for h in full.history]
    assert resumed.steps == full.steps == 12


# -- option errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"lr_schedule": "cosine"}, "give --max-steps"),
        ({"lr_schedule": "linear", "max_steps": 3}, "--lr-schedule must be one of constant, cosine"),
        ({"max_steps": 0}, "--max-steps must be a positive integer"),
        ({"eval_every": 2.5}, "--eval-every must be a positive integer"),
        ({"grad_clip": 0.0}, "--grad-clip must be a positive number"),
        ({"grad_clip": math.inf}, "--grad-clip must be a positive number"),
    ],
)
def test_bad_options_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        trainer(tiny(), **kw)


# -- early stopping inside a decay ----------------------------------------------------------------------------
def test_a_patience_shorter_than_the_cosine_budget_is_warned(tmp_path):
    """Issue 24: patience 30 would have ended 60-epoch cosine runs on POWER while their rate was high; a run whose
    patience does not cover its cosine budget is warned, in the budget's own unit, with the patience that does."""
    from flowbench import cli
    from flowbench.config import resolve_options
    from flowbench.data import get_info
    from flowbench.training import lifecycle
    from flowbench.training.lifecycle import patience_within_decay

    power = resolve_options({"dataset": "power", "model": "relgrad"})
    n = 1_659_917  # MAF's POWER training rows: 16,600 steps an epoch at batch 100
    assert patience_within_decay(power, n) is None  # the shipped budget is 30 epochs, patience 30
    longer = power.replace(max_steps=996_000)
    msg = patience_within_decay(longer, n)
    assert msg is not None and "--patience 30 epochs is shorter than the cosine schedule's 60 epochs" in msg
    assert "--patience 60 lets the decay end it" in msg
    assert patience_within_decay(longer.replace(patience=60), n) is None
    assert "schedule's 996 evaluations" in patience_within_decay(longer.replace(eval_every=1000), n)
    assert patience_within_decay(longer.replace(lr_schedule="constant"), n) is None
    # end to end: the warning reaches a user of `flowbench run`
    evals = math.ceil(1000 / math.ceil(get_info("digits").sizes[0] / 100))
    args = ["run", "--dataset", "digits", "--model", "relgrad", "--lr-schedule", "cosine", "--max-steps", "1000"]
    args += ["--max-epochs", "1", "--batch-size", "100", "--out", str(tmp_path)]
    before = warnings.formatwarning
    with pytest.warns(UserWarning, match=f"--patience 30 epochs is shorter than the cosine schedule's {evals} epochs"):
        assert cli.main(args) == 0
    # ... said as flowbench's errors are, not as a Python source line; other warnings as Python says them
    assert warnings.formatwarning is before  # restored after the command
    fmt = advice_format("run", warnings.formatwarning)
    assert fmt(UserWarning(msg), UserWarning, lifecycle.__file__, 1) == f"flowbench run: warning: {msg}\n"
    assert fmt(UserWarning("x"), UserWarning, __file__, 7).startswith(f"{__file__}:7: UserWarning: x")
