"""A stop asked for by a signal (Ctrl-C, SIGTERM) is honoured between two optimiser steps: every training run's
checkpoint is written at that position, mid-epoch and between evaluations, with its running loss, and the resumed
run takes exactly the steps of an uninterrupted one (flowbench.interrupts, the loop's _stop_here)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest
import torch
from test_one_loop import STEP_MODE, assert_same_run, build, digits_rows, rows, single_run, stack

from flowbench import interrupts
from flowbench.cli import main
from flowbench.errors import Terminated
from flowbench.plots.report import report_markdown
from flowbench.results import checkpoint_path, record_path
from flowbench.training.loop import RunLoop, RunState
from flowbench.training.trainer import Trainer

NEVER = 1e9  # checkpoint_every_s: no checkpoint comes due, so whatever is on disk was written by the stop


@pytest.fixture(scope="module")
def digits():
    return digits_rows()


def make(kind, data, ckpts, mode, seeds=(0, 1)):
    """A single run (seed 0) or a stack of seeds 0 and 1: MAF on 400 digits rows, 10 steps an epoch."""
    torch.manual_seed(99)  # other global random states each time: checkpoints must restore what matters
    kw = dict(STEP_MODE if mode == "step" else {}, checkpoint_every_s=NEVER)
    epochs = None if mode == "step" else 3
    if kind == "single":
        flows = [build("maf", 0, data[0])]
        return single_run(data, flows[0], 0, ckpts[0], max_epochs=epochs, **kw), flows
    flows = [build("maf", s, data[0]) for s in seeds]
    return stack(data, flows, ckpts, max_epochs=epochs, **kw), flows


def fit(tr):
    res = tr.fit()
    return res if isinstance(res, list) else [res]


def load(tr):
    if isinstance(tr, Trainer):
        tr.load_checkpoint()
    else:
        for i in range(len(tr.runs)):
            tr.load_checkpoint(i)


def ask_at(monkeypatch, step, exc=KeyboardInterrupt, times=1):
    """The signal handler's call, made ``times`` times right after a run's optimiser step ``step``."""
    advance = RunState.advance

    def advance_and_ask(self, end_of_epoch):
        advance(self, end_of_epoch)
        if self.step == step and not interrupts.asked():
            for _ in range(times):
                interrupts.ask(exc)

    monkeypatch.setattr(RunState, "advance", advance_and_ask)


@pytest.mark.parametrize("kind", ["single", "stack"])
@pytest.mark.parametrize("mode", ["epoch", "step"])
def test_a_stop_between_evaluations_resumes_exactly(digits, tmp_path, monkeypatch, kind, mode):
    ref_tr, ref_flows = make(kind, digits, [tmp_path / f"ref{s}.ckpt" for s in (0, 1)], mode)
    ref = fit(ref_tr)
    ckpts = [tmp_path / f"b{s}.ckpt" for s in (0, 1)]
    tr, _ = make(kind, digits, ckpts, mode)
    with monkeypatch.context() as m:
        ask_at(m, 13)  # epoch 2, batch 3; step mode: between the evaluations of steps 12 and 16
        with pytest.raises(KeyboardInterrupt) as stop:
            tr.fit()
    assert stop.value.saved == "at step 13 (epoch 2, batch 3 of 10)"
    for ckpt in ckpts[: len(ref)]:
        state = torch.load(ckpt, weights_only=True)
        assert (state["step"], state["pos"], state["epoch"], state["finished"]) == (13, 3, 1, False)
        # the running loss since the last evaluation: 3 batches of 40 (epoch mode), or 1 (evaluated at step 12)
        assert state["period_loss"][1] == (120 if mode == "epoch" else 40)
        assert state["result"]["train_time_s"] > 0
    tr, flows = make(kind, digits, ckpts, mode)
    load(tr)
    for res, want, f, g in zip(fit(tr), ref, flows, ref_flows):
        assert rows(res) == rows(want)  # every evaluation bit for bit, the running training loss included
        assert_same_run(res, want, f, g, atol=0)
        for (k, a), b in zip(f.state_dict().items(), g.state_dict().values()):
            assert torch.equal(a, b), k
    assert not interrupts.asked()


@pytest.mark.parametrize(
    ("mode", "step", "saved"),
    [
        ("epoch", 10, "at step 10 (epoch 1, batch 10 of 10)"),  # an epoch's last step: its validation first
        ("step", 12, "at step 12 (epoch 2, batch 2 of 10)"),  # an evaluation's step: the evaluation first
        ("epoch", 30, "after its last step"),  # the budget's last step: the run ends as it would have
    ],
)
def test_a_stop_on_an_evaluations_step_evaluates_first(digits, tmp_path, monkeypatch, mode, step, saved):
    ref = fit(make("single", digits, [tmp_path / "ref.ckpt"], mode)[0])[0]
    ckpt = tmp_path / "b.ckpt"
    tr, _ = make("single", digits, [ckpt], mode)
    with monkeypatch.context() as m:
        ask_at(m, step)
        with pytest.raises(KeyboardInterrupt) as stop:
            tr.fit()
    assert stop.value.saved == saved
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == step and state["result"]["history"][-1]["step"] == step  # evaluated, then written
    tr, _ = make("single", digits, [ckpt], mode)
    load(tr)
    assert rows(tr.fit()) == rows(ref)


def test_a_stop_asked_while_evaluating_writes_the_position_before_the_next_step(digits, tmp_path):
    ref = fit(make("single", digits, [tmp_path / "ref.ckpt"], "step")[0])[0]
    ckpt = tmp_path / "b.ckpt"
    tr, _ = make("single", digits, [ckpt], "step")
    tr.callbacks.append(lambda info: info.step == 8 and interrupts.ask(Terminated))
    with pytest.raises(Terminated) as stop:
        tr.fit()
    assert stop.value.saved == "at step 8 (epoch 1, batch 8 of 10)"
    state = torch.load(ckpt, weights_only=True)
    assert (state["step"], state["period_loss"]) == (8, (0.0, 0))
    tr, _ = make("single", digits, [ckpt], "step")
    load(tr)
    assert rows(tr.fit()) == rows(ref)


def test_a_second_ctrl_c_stops_at_once_and_a_second_sigterm_waits(digits, tmp_path, monkeypatch):
    ckpt = tmp_path / "a.ckpt"
    tr, _ = make("single", digits, [ckpt], "epoch")
    with monkeypatch.context() as m:
        ask_at(m, 13, KeyboardInterrupt, times=2)
        with pytest.raises(KeyboardInterrupt) as stop:
            tr.fit()
    assert not hasattr(stop.value, "saved") and not ckpt.exists()  # at once: nothing written since
    assert not interrupts.asked()  # the loop left: the next one starts clean
    tr, _ = make("single", digits, [ckpt], "epoch")
    ask_at(monkeypatch, 13, Terminated, times=2)
    with pytest.raises(Terminated) as stop:
        tr.fit()
    assert stop.value.saved.startswith("at step 13 ") and torch.load(ckpt, weights_only=True)["step"] == 13


def test_a_stop_after_the_last_step_is_raised_when_the_loop_ends(digits, tmp_path, monkeypatch):
    ckpt = tmp_path / "a.ckpt"
    tr, _ = make("single", digits, [ckpt], "epoch")
    finish = RunLoop._finish

    def ask_then_finish(self, i, t):
        interrupts.ask(KeyboardInterrupt)
        return finish(self, i, t)

    monkeypatch.setattr(RunLoop, "_finish", ask_then_finish)
    with pytest.raises(KeyboardInterrupt) as stop:
        tr.fit()
    assert stop.value.saved == "after its last step"
    assert torch.load(ckpt, weights_only=True)["step"] == 30  # the budget's end, written as it always is


def test_an_interrupt_that_stopped_at_once_says_what_is_on_disk(tmp_path, monkeypatch, capsys):
    from flowbench.training import lifecycle

    run = ["run", "--model", "made", "--hidden", "8", "--max-epochs", "2", "--quiet", "--out", str(tmp_path)]

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # while loading the data: nothing on disk yet
        m.setattr(lifecycle, "prepare", interrupt)
        assert main(run) == 130
    assert "before the run's first checkpoint: run the same command again to start it afresh" in capsys.readouterr().err
    ckpt = checkpoint_path(tmp_path, "digits", "made", 0)
    with monkeypatch.context() as m:  # right after the record: nothing to resume
        write = lifecycle.write_record

        def write_then_interrupt(*args, **kwargs):
            write(*args, **kwargs)
            assert ckpt.is_file()
            os.kill(os.getpid(), signal.SIGINT)

        m.setattr(lifecycle, "write_record", write_then_interrupt)
        inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            assert main(run) == 130
        finally:
            signal.signal(signal.SIGINT, inherited)
    err = capsys.readouterr().err
    assert "training interrupted after the record was written (" in err and "the run is done" in err
    assert "--resume" not in err
    assert not ckpt.exists()  # it went with the record, as the run's end removes it (a stop there left it)
    torch.save({"step": 1}, ckpt)  # as an older flowbench could leave it
    # a stack: one seed recorded, one with a checkpoint, one with none (as a second Ctrl-C may leave them)
    ckpt.rename(checkpoint_path(tmp_path, "digits", "made", 1))
    from flowbench.config import RunOptions
    from flowbench.training.experiment import _stopped

    runs = [RunOptions(model="made", out=str(tmp_path), seed=s) for s in (0, 1, 2)]
    assert _stopped(KeyboardInterrupt(), runs) == (
        "training interrupted; seed 0 is recorded; seed 1 has a checkpoint: continue with --seeds 1 --resume; "
        "seed 2 has none yet: start again with --seeds 2"
    )


def test_outside_a_training_loop_a_signal_raises_at_once():
    with pytest.raises(Terminated):
        interrupts.ask(Terminated)
    assert not interrupts.asked()


def _signals_during_a_wait(signums, wait_s=0.3):
    """Inside ``deferred()`` under the commands' handlers: the signals come from another thread while the main
    thread waits on a future (a Condition's lock, as a sweep's driver does), and the wait runs to its end."""
    from concurrent.futures import Future, wait

    ends = []

    def send():
        for signum in signums:
            os.kill(os.getpid(), signum)

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with interrupts.handling_signals(), interrupts.deferred():
            threading.Timer(0.05, send).start()
            wait([Future()], timeout=wait_s)
            ends.append("the wait ended")
    finally:
        signal.signal(signal.SIGINT, inherited)
        assert ends == ["the wait ended"]  # nothing was raised inside the wait
        assert not interrupts.asked()  # the stop went with its exception


@pytest.mark.parametrize("signums, raised", [([signal.SIGTERM], Terminated), ([signal.SIGINT] * 2, KeyboardInterrupt)])
def test_a_signal_while_the_driver_waits_is_raised_when_the_wait_ends(signums, raised):
    # Raised inside the wait, between a Condition's release and re-acquiring of its lock, the interrupt became
    # "RuntimeError: release unlocked lock" and a SIGTERM'd sweep died without stopping its workers (seen in CI).
    # Deferred, the first signal's exception is raised after the wait; a second Ctrl-C does not cut in.
    with pytest.raises(raised) as e:
        _signals_during_a_wait(signums)
    assert type(e.value) is raised


def test_an_error_leaving_a_deferred_block_takes_the_stop_with_it():
    with pytest.raises(ValueError):
        with interrupts.deferred():
            interrupts.ask(Terminated)
            raise ValueError("the pool could not start")
    assert not interrupts.asked()
    with interrupts.deferred():  # nothing left over to raise at the next block's end
        pass


def test_a_signal_inside_an_import_is_raised_when_the_import_is_over(tmp_path, monkeypatch):
    # Raised inside an import, a SIGTERM once left numpy half initialised: the stop was swallowed there and the
    # sweep died later of a RecursionError in numpy. Inside an import it is noted, and the module imports whole.
    # With no loop to take it, it is raised once the import is over: it used to be dropped, and a Ctrl-C in the
    # seconds a command spends importing torch did nothing (`flowbench bench` ran on for minutes).
    for name in ("signalled_a", "signalled_b", "signalled_c"):  # the timer looks again while it sleeps
        (tmp_path / f"{name}.py").write_text(
            "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.3)\nwhole = 1\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    alarm = signal.getsignal(signal.SIGALRM)
    with interrupts.handling_signals():
        with pytest.raises(Terminated):
            import signalled_a  # noqa: F401

            time.sleep(10)
        assert sys.modules["signalled_a"].whole == 1 and not interrupts.asked()
        monkeypatch.setattr(interrupts, "RETRY_S", 60.0)
        import signalled_b

        assert signalled_b.whole and interrupts.asked()
        with pytest.raises(Terminated):  # a training loop that starts first takes it
            with interrupts.listening():
                pass
        assert not interrupts.asked()
        with pytest.raises(Terminated):  # outside an import: at once, as before
            os.kill(os.getpid(), signal.SIGTERM)
        import signalled_c

        assert signalled_c.whole and interrupts.asked()
    assert not interrupts.asked()  # the command ended first: it goes with it, not into the next one
    assert signal.getsignal(signal.SIGALRM) is alarm and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_ctrl_c_while_a_command_imports_stops_the_command(tmp_path, monkeypatch, capsys):
    # the command's module was imported before the handlers: Ctrl-C there gave a traceback
    from flowbench import cli

    (tmp_path / "slow_command.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "def configure(parser):\n    pass\n"
        "def main(args):\n    time.sleep(30)\n    print('ran to its end')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "bench", ("slow_command", "a command that takes long"))
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        t0 = time.perf_counter()
        assert cli.main(["bench"]) == 130
        assert time.perf_counter() - t0 < 20
    finally:
        signal.signal(signal.SIGINT, inherited)
    out, err = capsys.readouterr()
    assert err == "flowbench bench: interrupted\n" and out == ""


def _record(out, model="made", seed=0):
    return json.loads(record_path(out, "digits", model, seed).read_text())


@pytest.mark.parametrize("seeds", [None, "0-1"])
def test_ctrl_c_in_flowbench_run_keeps_the_epoch_in_progress(tmp_path, monkeypatch, capsys, seeds):
    # a real SIGINT through the command's handlers, mid epoch 2, with no checkpoint due (the default 30 s cadence)
    run = ["run", "--model", "made", "--hidden", "8", "--max-epochs", "3", "--quiet"]
    run += ["--seeds", seeds] if seeds else []
    assert main([*run, "--out", str(tmp_path / "ref")]) == 0
    advance = RunState.advance

    def advance_and_signal(self, end_of_epoch):
        advance(self, end_of_epoch)
        if self.step == 18 and not interrupts.asked():
            os.kill(os.getpid(), signal.SIGINT)

    out = str(tmp_path / "b")
    # as in a terminal: a test run in a shell's background job inherits SIGINT ignored, which flowbench keeps
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as m:
            m.setattr(RunState, "advance", advance_and_signal)
            capsys.readouterr()
            assert main([*run, "--out", out]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the command's handlers are gone
    finally:
        signal.signal(signal.SIGINT, inherited)
    err = capsys.readouterr().err
    whose = "each seed" if seeds else "the run"
    assert f"training stopped at step 18 (epoch 2, batch 3 of 15), where {whose}'s checkpoint was written" in err
    assert "--resume to continue" in err and "Traceback" not in err
    for seed in (0, 1) if seeds else (0,):
        assert torch.load(checkpoint_path(out, "digits", "made", seed), weights_only=True)["pos"] == 3
    assert main([*run, "--out", out]) == 2  # a forgotten --resume: refused, saying where the checkpoint stands
    assert "has a checkpoint in epoch 2, after step 18 at " in capsys.readouterr().err
    progress = report_markdown(out, samples=False)[0].split("## Runs in progress")[1]
    assert progress.count("| in epoch 2, after step 18 ") == (2 if seeds else 1)  # where --resume takes it up
    assert main([*run, "--out", out, "--resume"]) == 0
    for seed in (0, 1) if seeds else (0,):
        got, want = _record(out, seed=seed), _record(tmp_path / "ref", seed=seed)
        strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
        assert strip(got["history"]) == strip(want["history"]) and len(got["history"]) == 3
        assert (got["test_ll"], got["best_epoch"], got["steps"]) == (want["test_ll"], want["best_epoch"], 45)
        assert "resumed from the checkpoint in epoch 2, after step 18" in got["notes"]


def test_the_commands_handlers_leave_an_ignored_signal_ignored():
    # a shell's background job starts with Ctrl-C ignored: flowbench must not take it back
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.handling_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is interrupts._on_signal
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
