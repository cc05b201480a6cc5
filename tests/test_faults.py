"""Faults around a run (issue 12): forgotten --resume, two processes on one record, --out that cannot be
written, a full disk, damaged checkpoints, the disk use of finished runs, sweep retries of usage errors."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from toy_flows import tiny_flow

import flowbench.models as models
import flowbench.utils as utils
from flowbench.cli import main
from flowbench.data.base import Dataset
from flowbench.errors import ConfigError, DiskFullError, RunLocked, UsageError
from flowbench.models.spec import ModelSpec
from flowbench.results import checkpoint_path, lock_path, model_state_path, read_record, record_path
from flowbench.sweep import parse_sweep, run_sweep
from flowbench.training import run_experiment
from flowbench.training.evaluate import log_prob_batches
from flowbench.training.trainer import best_model_state, checkpoint_epoch
from flowbench.utils import LockHeld, atomic_torch_save, atomic_write_json, exclusive_lock

REPO_ROOT = Path(__file__).resolve().parents[1]


def gaussian_data(n_train, n_val, n_test, seed=1) -> Dataset:
    x = np.random.RandomState(seed).normal(size=(n_train + n_val + n_test, 3)).astype(np.float32) * 2 + 1
    return Dataset("toy", x[:n_train], x[n_train : n_train + n_val], x[n_train + n_val :])


class Kill(Exception):
    pass


@pytest.fixture
def tiny(monkeypatch):
    spec = ModelSpec(name="tiny", build=tiny_flow, hparams={}, label="TINY", paper="test", lr=1e-2)
    monkeypatch.setitem(models.MODELS, "tiny", spec)


def opts(tmp_path, **kw):
    # checkpoint after every epoch (the default cadence, at most every 30 s, would skip the kill points)
    return {
        "out": str(tmp_path),
        "model": "tiny",
        "batch_size": 100,
        "device": "cpu",
        "patience": 50,
        "checkpoint_every_s": 0,
        **kw,
    }


def kill_at(epoch):
    def cb(info):
        if info.epoch == epoch:
            raise Kill

    return cb


DATA = gaussian_data(300, 100, 100)


# -- item 2: a forgotten --resume ---------------------------------------------------------------------------
def test_forgotten_resume_is_refused_and_the_checkpoint_kept(tmp_path, tiny):
    with pytest.raises(Kill):
        run_experiment(opts(tmp_path, max_epochs=6), DATA, progress=False, callbacks=[kill_at(3)])
    ckpt = checkpoint_path(tmp_path, "toy", "tiny", 0)
    before = ckpt.read_bytes()
    assert checkpoint_epoch(ckpt) == 3
    with pytest.raises(UsageError, match=r"checkpoint after epoch 3 at .*seed0\.ckpt.*--resume.*--force"):
        run_experiment(opts(tmp_path, max_epochs=6), DATA, progress=False)
    assert ckpt.read_bytes() == before  # nothing was overwritten
    rec = run_experiment(opts(tmp_path, max_epochs=6, resume=True), DATA, progress=False)
    assert rec.epochs == 6 and any("resumed" in n and "epoch 3" in n for n in rec.notes)
    # --force starts again at epoch 1 over a checkpoint.
    with pytest.raises(Kill):
        run_experiment(opts(tmp_path, seed=1, max_epochs=6), DATA, progress=False, callbacks=[kill_at(2)])
    fresh = run_experiment(opts(tmp_path, seed=1, max_epochs=4, force=True), DATA, progress=False)
    assert fresh.epochs == 4 and not any("resumed" in n for n in fresh.notes)


# -- item 3: one process per run ----------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from flowbench.utils import exclusive_lock
    with exclusive_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def _start_holder(path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_on_the_same_run_is_refused_and_a_stale_lock_does_not_block(tmp_path, tiny):
    lock = lock_path(tmp_path, "toy", "tiny", 0)
    lock.parent.mkdir(parents=True)
    proc = _start_holder(lock)
    try:
        with pytest.raises(UsageError, match=rf"process {proc.pid} is already training this run.*seed0\.lock"):
            run_experiment(opts(tmp_path, max_epochs=1), DATA, progress=False)
        assert not record_path(tmp_path, "toy", "tiny", 0).exists()
        run_experiment(opts(tmp_path, seed=1, max_epochs=1), DATA, progress=False)  # other runs are free
    finally:
        proc.kill()  # SIGKILL: the lock file stays behind, as after a crash
        proc.wait()
    assert lock.exists()
    rec = run_experiment(opts(tmp_path, max_epochs=1), DATA, progress=False)
    assert rec.epochs == 1 and not lock.exists()  # the stale file did not block; released after the record


def test_lock_is_exclusive_between_processes_and_released(tmp_path):
    lock = tmp_path / "seed0.lock"
    proc = _start_holder(lock)
    try:
        with pytest.raises(LockHeld) as info:
            with exclusive_lock(lock):
                pass
        assert info.value.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()
    with exclusive_lock(lock):
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


def test_a_look_at_a_lock_does_not_turn_away_the_run_that_takes_it(tmp_path):
    # lock_holder holds a shared flock for an instant; a run taking the lock in that instant must wait it out,
    # not report the run as held by another process. A shared lock held for 3 ms stands in for the look.
    import fcntl
    import threading

    lock = tmp_path / "seed0.lock"
    fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    release = threading.Timer(0.003, os.close, (fd,))  # closing the fd drops its flock
    release.start()
    try:
        with exclusive_lock(lock):
            assert lock.read_text().strip() == str(os.getpid())
    finally:
        release.join()
    assert not lock.exists()


def test_cli_second_run_exits_2_while_the_lock_is_held(tmp_path):
    # A real `flowbench run` process against a lock this process holds (flock is per open file).
    lock = lock_path(tmp_path, "digits", "gaussian", 0)
    lock.parent.mkdir(parents=True)
    with exclusive_lock(lock):
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, "-m", "flowbench", "run", "--model", "gaussian", "--out", str(tmp_path), "--quiet"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert out.returncode == 2, out.stderr
    assert f"process {os.getpid()} is already training this run" in out.stderr and "Traceback" not in out.stderr


# -- item 4: --out, a full disk, damaged checkpoints --------------------------------------------------------
def test_out_that_is_a_file_or_under_a_file(tmp_path, tiny):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*afile is a file, not a folder"):
        run_experiment(opts(blocker, max_epochs=1), DATA, progress=False)
    with pytest.raises(ConfigError, match=r"cannot create .* because .*afile is a file"):
        run_experiment(opts(blocker / "sub", max_epochs=1), DATA, progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_that_cannot_be_created(tmp_path, tiny):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"--out .*ro/x: cannot create"):
        run_experiment(opts(ro / "x", max_epochs=1), DATA, progress=False)


def _full_disk_on(monkeypatch, suffix, after=0):
    """Make the fsync of files whose target ends with ``suffix`` fail with ENOSPC, after ``after`` good ones."""
    real = os.fsync
    seen = {"n": 0}

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if f"{suffix}." in target:
            seen["n"] += 1
            if seen["n"] > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(utils.os, "fsync", fsync)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_disk_full_while_checkpointing_names_the_file_and_keeps_the_previous(tmp_path, tiny, monkeypatch):
    _full_disk_on(monkeypatch, ".ckpt", after=2)  # epochs 1 and 2 are saved, epoch 3's save fails
    with pytest.raises(DiskFullError) as info:
        run_experiment(opts(tmp_path, max_epochs=5), DATA, progress=False)
    ckpt = checkpoint_path(tmp_path, "toy", "tiny", 0)
    msg = str(info.value)
    assert str(ckpt) in msg and "previous version is intact" in msg and "Errno" not in msg
    assert re.search(r"it needs [\d,]+ bytes; [\d,]+ bytes are free", msg)
    assert checkpoint_epoch(ckpt) == 2  # the previous checkpoint is whole and resumable
    assert not [p for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_disk_full_reports_the_exact_size_and_keeps_the_old_record(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"old": 1})
    monkeypatch.setattr(utils.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    obj = {"new": "x" * 100}
    import json

    want = len((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
    with pytest.raises(
        DiskFullError,
        match=rf"write {path} \(it needs {want:,} bytes; [\d,]+ bytes are free\); "
        r"the previous version is intact",
    ):
        atomic_write_json(path, obj)
    assert json.loads(path.read_text()) == {"old": 1}
    # Generic writes report what they had written; DiskFullError is an OSError for `except OSError` callers.
    with pytest.raises(OSError, match="no space left"):
        with utils.atomic_write(tmp_path / "t.md", "w") as f:
            f.write("abc")
    assert not (tmp_path / "t.md").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_cli_disk_full_exits_2(tmp_path, monkeypatch, capsys):
    _full_disk_on(monkeypatch, ".json")
    code = main(["run", "--model", "gaussian", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "no space left on the device to write" in err and "seed0.json" in err


@pytest.mark.parametrize("damage", ["truncated", "text", "foreign"])
def test_damaged_checkpoint_on_resume(tmp_path, tiny, damage):
    with pytest.raises(Kill):
        run_experiment(opts(tmp_path, max_epochs=4), DATA, progress=False, callbacks=[kill_at(2)])
    ckpt = checkpoint_path(tmp_path, "toy", "tiny", 0)
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: len(ckpt.read_bytes()) // 2])
    elif damage == "text":
        ckpt.write_text("not a checkpoint\n")
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    want = "not a flowbench training checkpoint" if damage == "foreign" else "truncated or not a flowbench file"
    with pytest.raises(ConfigError, match=rf"checkpoint .*seed0\.ckpt .*{want}.*--force"):
        run_experiment(opts(tmp_path, max_epochs=4, resume=True), DATA, progress=False)
    assert checkpoint_epoch(ckpt) is None
    # The refusal without --resume still names it; --force starts again.
    with pytest.raises(UsageError, match=r"checkpoint \(unreadable\)"):
        run_experiment(opts(tmp_path, max_epochs=4), DATA, progress=False)
    assert run_experiment(opts(tmp_path, max_epochs=2, force=True), DATA, progress=False).epochs == 2


# -- item 7: only the model state is kept after the record --------------------------------------------------
def test_finished_run_keeps_only_the_model_state(tmp_path):
    data = gaussian_data(300, 100, 200)
    o = dict(model="maf", layers=2, hidden=8, max_epochs=3, lr=3e-3)
    rec = run_experiment(opts(tmp_path / "a", **o), data, progress=False)
    ckpt = checkpoint_path(tmp_path / "a", "toy", "maf", 0)
    small = model_state_path(tmp_path / "a", "toy", "maf", 0)
    assert not ckpt.exists() and small.is_file() and not lock_path(tmp_path / "a", "toy", "maf", 0).exists()
    assert rec.model_state == small.name == read_record(record_path(tmp_path / "a", "toy", "maf", 0)).model_state
    kept = run_experiment(opts(tmp_path / "b", **o, keep_checkpoint=True), data, progress=False)
    full = checkpoint_path(tmp_path / "b", "toy", "maf", 0)
    assert full.is_file() and kept.model_state == small.name
    assert small.stat().st_size < full.stat().st_size / 2  # no optimizer moments, no RNG, no history
    # Both files (and the checkpoint path of a run that kept none) give the same, recorded model.
    a, b, c = best_model_state(small), best_model_state(full), best_model_state(ckpt)
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    flow = models.build_model("maf", 3, **rec.hparams)
    flow.load_state_dict(a)
    flow.eval()
    ll = log_prob_batches(flow, torch.as_tensor(data.test), 1000)
    assert abs(float(ll.mean()) - rec.test_ll) < 1e-5
    with pytest.raises(ConfigError, match="kept only its model state.*--keep-checkpoint"):
        run_experiment(opts(tmp_path / "a", **dict(o, max_epochs=4), resume=True, force=True), data, progress=False)
    longer = run_experiment(
        opts(tmp_path / "b", **dict(o, max_epochs=4), resume=True, force=True), data, progress=False
    )
    assert longer.epochs == 4


def test_best_model_state_refuses_foreign_files(tmp_path):
    p = tmp_path / "x.pt"
    atomic_torch_save(p, {"something": 1})
    with pytest.raises(ConfigError, match="neither a model state nor a training checkpoint"):
        best_model_state(p)
    with pytest.raises(ConfigError, match="no model state at"):
        best_model_state(tmp_path / "missing.ckpt")


# -- item 5: sweeps -----------------------------------------------------------------------------------------
def test_usage_error_inside_a_sweep_run_is_not_retried(tmp_path):
    sweep = parse_sweep({"datasets": ["digits"], "models": ["made"], "grid": {"hidden": [7, 8]}})
    calls: list[int] = []

    def run(options):
        calls.append(options.hparams["hidden"])
        if options.hparams["hidden"] == 7:
            raise UsageError("a record already exists")
        raise RuntimeError("crash")

    report = run_sweep(sweep, tmp_path, run_fn=run, retries=2, stream=None)
    states = {s.run.tag: s for s in report.failed}
    assert states["hidden=7"].attempts == 1 and "UsageError" in states["hidden=7"].error
    assert states["hidden=8"].attempts == 3  # a crash is still retried
    assert calls.count(7) == 1 and calls.count(8) == 3


@pytest.mark.parametrize(
    "flags",
    [
        ["--cpus-per-run", "0"],
        ["--cpus-per-run", "0", "--dry-run"],
        ["--gpus-per-run", "-1"],
        ["--workers", "0", "--dry-run"],
    ],
)
def test_sweep_resource_flags_are_checked_first(tmp_path, capsys, flags):
    good = REPO_ROOT / "configs" / "sweeps" / "tiny-digits.toml"
    assert main(["sweep", str(good), "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert flags[0] in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


# -- item 8: no torch.jit.script notice from the Jacobian tools ---------------------------------------------
def test_jacobian_does_not_print_torch_deprecation_notices():
    code = (
        "import torch; from flowbench.jacobian import jacobian_spectral_norm; "
        "print(jacobian_spectral_norm(lambda x: torch.sin(x) * 2, torch.randn(4, 3)).shape)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "jit" not in out.stderr


def test_lock_wait_time_is_short(tmp_path):
    # Refusal must be immediate (non-blocking flock), not a wait for the other run to end.
    lock = tmp_path / "l.lock"
    proc = _start_holder(lock)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockHeld):
            with exclusive_lock(lock):
                pass
        assert time.monotonic() - t0 < 1.0
    finally:
        proc.kill()
        proc.wait()


class DriverWritesBackend:
    """Like the Ray executor: the 'worker' trains elsewhere and the driver writes the record (``finish``)."""

    capacity = 1

    def __init__(self):
        self.pending: dict[int, object] = {}

    def submit(self, run, options, out):
        token = len(self.pending) + 100
        self.pending[token] = options
        return token

    def wait(self, tokens, timeout):
        from flowbench.results import RunRecord

        out = []
        for t in tokens:
            o = self.pending.pop(t)
            out.append(
                (
                    t,
                    {
                        "ok": True,
                        "record": RunRecord.example(dataset=o.dataset, model=o.model, tag=o.tag, seed=o.seed),
                        "seconds": 0.0,
                    },
                )
            )
        return out

    def finish(self, state, outcome, out):
        from flowbench.results import write_record

        write_record(state.run.record_path(out), outcome["record"])

    def shutdown(self, cancel=False):
        pass


def test_a_sweep_leaves_a_run_another_process_trains_alone_checkpoint_and_all(tmp_path):
    """A second sweep over runs a first one is training (the POWER study's twin sweeps) once retried them "from
    scratch" after the lock refused the resume, deleting the checkpoint the first process was training from."""
    sweep = parse_sweep(
        {
            "datasets": ["digits"],
            "models": ["made"],
            "grid": {"seed": [0, 1, 2], "hidden": 8, "max-epochs": 1, "device": "cpu"},
        }
    )
    r0 = next(r for r in sweep.runs if r.seed == 0)
    ckpt = r0.checkpoint_path(tmp_path)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"the other process's checkpoint")
    proc = _start_holder(lock_path(tmp_path, r0.dataset, r0.model, r0.seed, r0.tag))
    try:
        report = run_sweep(sweep, tmp_path, retries=2, stream=None)
    finally:
        proc.kill()
        proc.wait()
    assert ckpt.read_bytes() == b"the other process's checkpoint"
    # Set aside, not failed: its record comes from the process training it, so the sweep itself succeeded.
    assert report.ok and not report.failed and report.count("done") == 2
    (aside,) = [s for s in report.states if s.status == "elsewhere"]
    assert aside.run.seed == 0 and aside.attempts == 0
    assert f"process {proc.pid} is training this run" in aside.error
    saved = json.loads((tmp_path / "sweeps" / f"{sweep.name}.json").read_text())
    assert saved["counts"]["elsewhere"] == 1 and saved["counts"]["failed"] == 0
    # The other seeds did not wait for it: they trained as a stack of their own.
    recs = [read_record(r.record_path(tmp_path)) for r in sweep.runs if r.seed != 0]
    assert [rec.stack["seeds"] for rec in recs] == [[1, 2], [1, 2]]

    # The lock taken between the sweep's look and the run's own (a race): the run stops at it, once, and the
    # checkpoint it would have resumed from stays. Retrying it afresh would delete that checkpoint.
    calls, holders = [], []
    one = parse_sweep({"datasets": ["digits"], "models": ["gaussian"], "grid": {"device": "cpu"}})
    run = one.runs[0]

    def raced_run(options):
        calls.append(options.resume)
        holders.append(_start_holder(lock_path(tmp_path, run.dataset, run.model, run.seed, run.tag)))
        raise RunLocked(f"process {holders[-1].pid} is already training this run")

    ckpt = run.checkpoint_path(tmp_path)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"theirs")
    try:
        report = run_sweep(one, tmp_path, run_fn=raced_run, retries=0, stream=None)  # set aside, not failed
    finally:
        for h in holders:
            h.kill()
            h.wait()
    assert calls == [True] and ckpt.read_bytes() == b"theirs"
    assert report.ok and report.states[0].status == "elsewhere" and report.states[0].attempts == 1


def test_driver_written_sweep_runs_hold_the_run_lock(tmp_path):
    sweep = parse_sweep({"datasets": ["digits"], "models": ["made"], "grid": {"hidden": [7, 8]}})
    r7 = next(r for r in sweep.runs if r.tag == "hidden=7")
    lock = lock_path(tmp_path, r7.dataset, r7.model, r7.seed, r7.tag)
    lock.parent.mkdir(parents=True)
    proc = _start_holder(lock)
    try:
        report = run_sweep(sweep, tmp_path, backend=DriverWritesBackend(), retries=2, stream=None)
    finally:
        proc.kill()
        proc.wait()
    aside = {s.run.tag: s for s in report.states if s.status == "elsewhere"}
    assert set(aside) == {"hidden=7"} and aside["hidden=7"].attempts == 0 and not report.failed
    assert f"process {proc.pid} is training this run" in aside["hidden=7"].error
    assert report.count("done") == 1 and not r7.record_path(tmp_path).exists()
    other = next(r for r in sweep.runs if r.tag == "hidden=8")
    assert not lock_path(tmp_path, other.dataset, other.model, other.seed, other.tag).exists()  # released
    again = run_sweep(sweep, tmp_path, backend=DriverWritesBackend(), stream=None)  # stale lock: no block
    assert again.ok and again.count("done") == 1


def crashing_run(options):
    """A sweep's run function (imported by the pool's workers): seed 0's worker dies (SIGKILL) on its first
    attempt once seed 1's holds its lock; seed 1's worker, terminated by the broken pool, takes a second to die
    (as a worker saving a checkpoint would). Second attempts write their record."""
    import signal

    from flowbench.models import display_name
    from flowbench.results import RunRecord, write_record

    out = Path(options.out)
    first = out / f"attempted{options.seed}"
    lock = lock_path(out, options.dataset, options.model, options.seed, options.tag)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(lock):
        if not first.exists():
            first.write_text("")
            if options.seed == 1:
                signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.0), os._exit(1)))
                (out / "seed1-holds-its-lock").write_text("")
                time.sleep(60)
            while not (out / "seed1-holds-its-lock").exists():
                time.sleep(0.01)
            os.kill(os.getpid(), 9)
        record = RunRecord.example(
            dataset=options.dataset,
            model=options.model,
            display_name=display_name(options.model, **options.hparams),
            seed=options.seed,
            config=options.to_dict(),
            test_ll=-1.0,
        )
        write_record(record_path(out, options.dataset, options.model, options.seed, options.tag), record)
    return record


@pytest.mark.slow  # fresh processes, each importing torch: seconds each
def test_a_worker_that_dies_is_retried_and_its_pool_mates_are_not_set_aside(tmp_path):
    """A worker killed (out of memory, kill -9) breaks the process pool: every run in it fails, and the pool
    terminates the other workers. Those were looked at while they still held their runs' locks and set aside
    as trained 'elsewhere' by processes about to die: the sweep then ended with 0 failed and exit 0, the runs
    not trained. Both runs must be retried and trained."""
    sweep = parse_sweep({"datasets": ["digits"], "models": ["gaussian"], "grid": {"seed": [0, 1], "device": "cpu"}})
    report = run_sweep(sweep, tmp_path, workers=2, retries=1, run_fn="test_faults:crashing_run", stream=None)
    assert [s.status for s in report.states] == ["done", "done"], [(s.status, s.error) for s in report.states]
    assert [s.attempts for s in report.states] == [2, 2]
    assert all(r.record_path(tmp_path).is_file() for r in sweep.runs)


def _training(logs: Path, runs: int) -> Callable[[], bool]:
    """Whether ``runs`` sweep logs under ``logs`` (a worker's run or stack each) show a finished epoch."""
    return lambda: sum("epoch    1 " in p.read_text() for p in logs.rglob("seed*.log")) >= runs


def _terminate_after(
    cmd: list[str], marker: str, ready: Callable[[], bool] | None = None
) -> subprocess.CompletedProcess:
    """Start a flowbench process, send it SIGTERM once ``marker`` appeared on its stderr (and ``ready()`` holds,
    polled: workers take seconds to import torch and load data, more on a busy machine), and wait."""
    import signal

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowbench", *cmd], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            deadline = time.monotonic() + 120
            while ready is not None and not ready():
                if time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail("the sweep's workers logged no finished epoch in 120 s (their logs hold epoch lines)")
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(seen) + err)


@pytest.mark.slow  # fresh processes, each importing torch: seconds each
def test_sigterm_stops_a_run_and_a_sweep_as_ctrl_c_does(tmp_path):
    # A cluster's time limit sends SIGTERM: the run died without a word, and a sweep without its report. Both now
    # take the interrupt's path (the resume hint; the sweep JSON, marked interrupted) and exit 143, and each
    # training run's checkpoint is written where it stopped: with no checkpoint ever due, there is one.
    run = ["run", "--model", "made", "--hidden", "8", "--max-epochs", "500", "--checkpoint-every-s", "100000"]
    done = _terminate_after([*run, "--out", str(tmp_path / "a")], "epoch    2 ")
    assert done.returncode == 143, done.stderr
    assert "training stopped at step " in done.stderr and "--resume to continue" in done.stderr
    assert "flowbench run: terminated (SIGTERM)" in done.stderr and "Traceback" not in done.stderr
    ckpt = checkpoint_path(tmp_path / "a", "digits", "made", 0)
    assert checkpoint_epoch(ckpt) >= 2  # written at the stop; an interrupted atomic write leaves nothing behind
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["seed0.ckpt"]
    sweep_file = tmp_path / "s.toml"
    sweep_file.write_text(
        'datasets = ["digits"]\nmodels = ["made"]\n[grid]\nseed = [0, 1]\nhidden = [8, 9]\nmax-epochs = 5000\n'
        "patience = 5000\ncheckpoint-every-s = 100000\n"
    )
    for workers in ("1", "2"):  # in this process, and in worker processes (which must stop too, not train on)
        out = tmp_path / f"b{workers}"
        cmd = ["sweep", str(sweep_file), "--out", str(out), "--workers", workers]
        # a worker's epoch lines go to its stack's log: stop once both stacks train (fixed 8 s was too short in CI)
        if workers == "1":
            done = _terminate_after(cmd, "epoch    2 ")
        else:
            done = _terminate_after(cmd, "4 running", ready=_training(out / "sweeps" / "logs", 2))
        assert done.returncode == 143, done.stderr
        saved = json.loads((out / "sweeps" / "s.json").read_text())
        assert saved["interrupted"] is True and "run the same command again to continue" in done.stdout
        assert not list(out.rglob("seed*.json")), "a run trained on to its record after the sweep was stopped"
        # the stacks that were training (one in this process; one per worker) wrote their seeds' checkpoints
        assert len(list(out.rglob("seed*.ckpt"))) == 2 * int(workers), done.stderr


@pytest.mark.slow  # spawned workers, each importing torch
def test_a_stopped_sweep_with_an_idle_worker_exits(tmp_path):
    # An idle worker killed by the pool's terminate() may die holding the task queue's lock: a worker that went
    # back to the queue after its graceful stop blocked on it for ever, and the sweep with it (found by a QA pass).
    sweep_file = tmp_path / "s.toml"
    sweep_file.write_text(
        'datasets = ["digits"]\nmodels = ["gaussian", "made"]\n[grid]\nhidden = [8]\nmax-epochs = 5000\n'
        "patience = 5000\n"
    )
    out = tmp_path / "a"
    cmd = ["sweep", str(sweep_file), "--out", str(out), "--workers", "2"]
    # once gaussian is done its worker waits for a task, idle, while made's trains
    done = _terminate_after(cmd, "digits/gaussian/default/seed0: val LL", ready=_training(out, 1))
    assert done.returncode == 143, done.stderr
    assert json.loads((out / "sweeps" / "s.json").read_text())["interrupted"] is True
    assert len(list(out.rglob("seed0.ckpt"))) == 1  # made's, written where it stopped
