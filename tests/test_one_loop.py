"""One run lifecycle (issue 23): a single run and a stack go through one loop (flowbench.training.loop), in epoch
mode and in step mode (max_steps, eval_every, the cosine schedule, gradient clipping); stacked run r follows
the single run of seed r, resumes exactly mid-epoch, and old checkpoints still resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import flowbench.models as models
from flowbench.data import load_dataset
from flowbench.training.loop import RunLoop
from flowbench.training.stacked import RunSpec, StackedTrainer
from flowbench.training.trainer import Trainer
from flowbench.utils import seed_everything

HP = {"maf": dict(layers=2, hidden=16, batch_norm=False), "relgrad": dict(layers=2), "made": dict(hidden=16)}
LR = {"maf": 3e-3, "relgrad": 1e-3, "made": 3e-3}
#: the NSF protocol's options, scaled down: evaluations every 4 steps (mid-epoch: 10 steps an epoch)
STEP_MODE = dict(max_steps=37, eval_every=4, lr_schedule="cosine", grad_clip=1.0)
KEYS = ("epoch", "step", "train_loss", "train_nll", "val_ll", "n_nonfinite_val", "n_nonfinite_train")


@pytest.fixture(scope="module")
def digits():
    return digits_rows()


def digits_rows():
    data = load_dataset("digits")
    # 400 training rows in batches of 40: 10 steps an epoch
    return (
        torch.tensor(np.asarray(data.train[:400]), dtype=torch.float64),
        torch.tensor(np.asarray(data.val[:200]), dtype=torch.float64),
    )


def build(model: str, seed: int, train_x):
    seed_everything(seed)
    flow = models.build_model(model, train_x.shape[1], **HP[model]).double()
    flow.initialize(train_x)
    return flow


def rows(res):
    return [tuple(h[k] for k in KEYS) for h in res.history]


def assert_same_run(a, b, flow_a, flow_b, atol=1e-9):
    assert (a.epochs, a.steps, a.best_epoch, a.best_step, a.stop_reason, a.ended, a.status) == (
        b.epochs,
        b.steps,
        b.best_epoch,
        b.best_step,
        b.stop_reason,
        b.ended,
        b.status,
    )
    assert [r[:2] for r in rows(a)] == [r[:2] for r in rows(b)]
    np.testing.assert_allclose(
        np.array([r[2:] for r in rows(a)]), np.array([r[2:] for r in rows(b)]), rtol=0, atol=atol
    )
    for (k, v), w in zip(flow_a.state_dict().items(), flow_b.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=atol, msg=k)


def test_both_trainers_are_the_one_loop():
    assert issubclass(Trainer, RunLoop) and issubclass(StackedTrainer, RunLoop)
    assert Trainer.fit is not StackedTrainer.fit and "_fit" not in vars(Trainer) and "_fit" not in vars(StackedTrainer)


@pytest.mark.parametrize("model", list(HP))
def test_stack_in_step_mode_equals_single_runs(model, digits):
    """max_steps, evaluations every 4 steps across epoch boundaries, the cosine schedule and gradient clipping:
    each stacked run has the single run's evaluations, result and restored best state."""
    train_x, val_x = digits
    seeds = (0, 1)
    singles = []
    for seed in seeds:
        flow = build(model, seed, train_x)
        res = Trainer(
            flow, train_x, val_x, lr=LR[model], patience=50, seed=seed, batch_size=40, progress=False, **STEP_MODE
        ).fit()
        singles.append((res, flow))
    flows = [build(model, s, train_x) for s in seeds]
    results = StackedTrainer(
        [RunSpec(f, s, LR[model], patience=50) for f, s in zip(flows, seeds)],
        train_x,
        val_x,
        batch_size=40,
        progress=False,
        **STEP_MODE,
    ).fit()
    for (single, sflow), res, flow in zip(singles, results, flows):
        assert [h["step"] for h in res.history] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 37]
        assert res.stop_reason == "reached max_steps=37" and res.ended == "budget" and res.steps == 37
        assert_same_run(res, single, flow, sflow)
    assert not torch.equal(next(flows[0].parameters()), next(flows[1].parameters()))


def test_gradient_clipping_acts_on_each_run_of_a_stack(digits):
    """A bound every step exceeds: clipped and unclipped stacks differ, and each clipped run is its single run."""
    train_x, val_x = digits
    kw = dict(max_steps=6, eval_every=3, batch_size=40, progress=False)
    clipped = [build("maf", s, train_x) for s in (0, 1)]
    free = [build("maf", s, train_x) for s in (0, 1)]
    StackedTrainer([RunSpec(f, s, 3e-2) for s, f in enumerate(clipped)], train_x, val_x, grad_clip=1e-3, **kw).fit()
    StackedTrainer([RunSpec(f, s, 3e-2) for s, f in enumerate(free)], train_x, val_x, **kw).fit()
    single = build("maf", 1, train_x)
    Trainer(single, train_x, val_x, lr=3e-2, seed=1, grad_clip=1e-3, **kw).fit()
    assert not torch.allclose(next(clipped[1].parameters()), next(free[1].parameters()), atol=1e-6)
    for (k, v), w in zip(clipped[1].state_dict().items(), single.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=1e-10, msg=k)


def test_stack_in_step_mode_with_different_epoch_caps(digits):
    """Runs of one stack may differ in max_epochs: in step mode one run's last period is shorter, so the
    stack trains to the nearer evaluation and evaluates only the runs whose evaluation it is."""
    train_x, val_x = digits
    caps = {0: 2, 1: 3}  # 20 and 30 steps; evaluations every 7
    kw = dict(eval_every=7, batch_size=40, progress=False)
    singles = {}
    for seed, cap in caps.items():
        flow = build("maf", seed, train_x)
        singles[seed] = (Trainer(flow, train_x, val_x, lr=3e-3, seed=seed, max_epochs=cap, **kw).fit(), flow)
    flows = {s: build("maf", s, train_x) for s in caps}
    results = StackedTrainer(
        [RunSpec(flows[s], s, 3e-3, max_epochs=c) for s, c in caps.items()], train_x, val_x, **kw
    ).fit()
    assert [h["step"] for h in results[0].history] == [7, 14, 20]
    assert [h["step"] for h in results[1].history] == [7, 14, 21, 28, 30]
    for seed, res in zip(caps, results):
        assert res.ended == "capped"
        assert_same_run(res, singles[seed][0], flows[seed], singles[seed][1])


class Kill(Exception):
    pass


def stack(data, flows, ckpts, callbacks=(), max_epochs=None, **kw):
    specs = [
        RunSpec(f, s, 3e-3, patience=50, max_epochs=max_epochs, checkpoint_path=c, fingerprint={"k": 1})
        for s, (f, c) in enumerate(zip(flows, ckpts))
    ]
    return StackedTrainer(specs, *data, batch_size=40, progress=False, callbacks=list(callbacks), **kw)


def single_run(data, flow, seed, ckpt, **kw):
    """The single run of :func:`stack`'s run ``seed``: its settings, checkpointing to ``ckpt``."""
    return Trainer(
        flow,
        *data,
        lr=3e-3,
        patience=50,
        seed=seed,
        batch_size=40,
        progress=False,
        checkpoint_path=ckpt,
        fingerprint={"k": 1},
        **kw,
    )


def test_stack_killed_mid_epoch_resumes_exactly_stacked_or_alone(digits, tmp_path):
    train_x, val_x = digits
    full_flows = [build("maf", s, train_x) for s in (0, 1)]
    full = stack(digits, full_flows, [tmp_path / f"full{s}.ckpt" for s in (0, 1)], **STEP_MODE).fit()

    def kill(info):
        if info.step == 12 and info.seed == 1:  # mid epoch 2, after both runs' checkpoints
            raise Kill

    ckpts = [tmp_path / f"b{s}.ckpt" for s in (0, 1)]
    with pytest.raises(Kill):
        stack(digits, [build("maf", s, train_x) for s in (0, 1)], ckpts, [kill], **STEP_MODE).fit()
    state = torch.load(ckpts[0], weights_only=True)
    assert (state["format"], state["step"], state["pos"], state["epoch"]) == (2, 12, 2, 1)
    shutil.copy(ckpts[1], tmp_path / "alone.ckpt")
    torch.manual_seed(99)  # other global random states: the checkpoints restore them
    flows = [build("maf", s, train_x) for s in (0, 1)]
    tr = stack(digits, flows, ckpts, **STEP_MODE)
    for i in (0, 1):
        tr.load_checkpoint(i)
    for res, ref, f, g in zip(tr.fit(), full, flows, full_flows):
        assert rows(res) == rows(ref)  # bit for bit
        assert_same_run(res, ref, f, g, atol=0)
    # a stacked run's mid-epoch checkpoint is a single run's: run 1 resumes alone, as the single run of seed 1
    alone_flow = build("maf", 1, train_x)
    alone = single_run(digits, alone_flow, 1, tmp_path / "alone.ckpt", **STEP_MODE)
    alone.load_checkpoint()
    assert (alone._step, alone._pos) == (12, 2)
    assert_same_run(alone.fit(), full[1], alone_flow, full_flows[1])


def test_old_stack_checkpoints_of_format_1_still_resume(digits, tmp_path):
    """A stack's checkpoint from before the one loop (format 1: no step, pos, epoch_rng or best_step) resumes, in
    a stack and alone, and ends as the uninterrupted run."""
    train_x, val_x = digits

    def capped(flows, ckpts, cap):
        return stack(digits, flows, ckpts, max_epochs=cap)

    full_flows = [build("maf", s, train_x) for s in (0, 1)]
    full = capped(full_flows, [None, None], 4).fit()
    ckpts = [tmp_path / f"{s}.ckpt" for s in (0, 1)]
    capped([build("maf", s, train_x) for s in (0, 1)], ckpts, 2).fit()
    for c in ckpts:
        state = torch.load(c, weights_only=True)
        for key in ("step", "pos", "epoch_rng", "best_step"):
            del state[key]
        state["format"] = 1
        torch.save(state, c)
    flows = [build("maf", s, train_x) for s in (0, 1)]
    tr = capped(flows, ckpts, 4)
    for i in (0, 1):
        tr.load_checkpoint(i)
    assert [r.state.step for r in tr.runs] == [20, 20] and tr.runs[0].result.resumed_from_epoch == 2
    for res, ref, f, g in zip(tr.fit(), full, flows, full_flows):
        assert_same_run(res, ref, f, g, atol=0)
    alone_flow = build("maf", 0, train_x)
    alone = single_run(digits, alone_flow, 0, ckpts[0], max_epochs=4)
    alone.load_checkpoint()
    assert_same_run(alone.fit(), full[0], alone_flow, full_flows[0])


def test_a_stacks_lines_are_the_single_runs_with_its_label(digits, capsys):
    train_x, val_x = digits
    for step_mode in (False, True):
        kw = dict(max_steps=12, eval_every=5) if step_mode else {}
        Trainer(build("made", 0, train_x), train_x, val_x, lr=3e-3, batch_size=40, seed=0, max_epochs=2, **kw).fit()
        single = [ln for ln in capsys.readouterr().err.splitlines() if "patience left" in ln]
        StackedTrainer(
            [RunSpec(build("made", s, train_x), s, 3e-3, max_epochs=2) for s in (0, 1)],
            train_x,
            val_x,
            batch_size=40,
            **kw,
        ).fit()
        stacked = [ln for ln in capsys.readouterr().err.splitlines() if "patience left" in ln]
        assert len(single) == (3 if step_mode else 2) and len(stacked) == 2 * len(single)
        assert [ln for ln in stacked if ln.startswith("seed 0 ")] == [f"seed 0 {ln}" for ln in single]
        assert single[0].startswith("step       5 (epoch 1)  train loss" if step_mode else "epoch    1  train loss")


def test_a_stack_at_different_places_in_its_epochs_trains_group_by_group(digits):
    """Runs resumed mid-epoch from checkpoints of different steps (a sweep regroups them) train in groups of
    one place each: run 0 follows exactly the stack it would have been in alone, run 1 goes on from its place."""
    train_x, val_x = digits

    def stack(seeds, pos1=None):
        tr = StackedTrainer(
            [RunSpec(build("made", s, train_x), s, 3e-3) for s in seeds],
            train_x,
            val_x,
            batch_size=40,
            progress=False,
            eval_every=3,
            max_steps=9,
        )
        if pos1 is not None:
            tr.runs[1].state.pos, tr.runs[1].state.perm = pos1, torch.arange(train_x.shape[0])
        return tr.fit()

    mixed, alone = stack((0, 1), pos1=3), stack((0,))
    assert [h["val_ll"] for h in mixed[0].history] == [h["val_ll"] for h in alone[0].history]
    assert mixed[1].steps == 9 and mixed[1].status == "ok"


def test_run_seeds_stacks_the_step_options(tmp_path):
    """``run --seeds`` with the NSF protocol's step options (budget, evaluations every N steps, cosine schedule,
    clipping) trains one stack whose records equal the single runs'."""
    from flowbench.training.experiment import run_experiment
    from flowbench.training.stacked import run_stacked

    base = {
        "dataset": "digits",
        "model": "made",
        "device": "cpu",
        "hidden": 16,
        "max_steps": 40,
        "eval_every": 10,
        "lr_schedule": "cosine",
        "grad_clip": 1.0,
    }
    stacked = run_stacked([{**base, "seed": s, "out": str(tmp_path / "stack")} for s in (0, 1)], progress=False)
    single = run_experiment({**base, "seed": 1, "out": str(tmp_path / "one")}, progress=False)
    assert [r.steps for r in stacked] == [40, 40] and stacked[1].ended == single.ended == "budget"
    assert stacked[1].test_ll == pytest.approx(single.test_ll, rel=1e-5)
    assert [h["step"] for h in stacked[1].history] == [h["step"] for h in single.history] == [10, 20, 30, 40]
