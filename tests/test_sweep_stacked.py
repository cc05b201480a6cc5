"""Sweeps stack runs of one shape (issue 11): grouping rules, and real stacked sweeps of
configs/sweeps/tiny-digits.toml against the unstacked sweep (same records up to float32 rounding, same table)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flowbench.errors import ConfigError
from flowbench.results import iter_records, read_per_point
from flowbench.sweep import load_sweep, parse_sweep, run_sweep
from flowbench.tables import build_table

REPO = Path(__file__).resolve().parents[1]
#: Fields that differ between any two sweeps (clocks, process), as in test_sweep_e2e.py, plus `stack`: how
#: the run was executed.
EXECUTION = {
    "command",
    "timestamp",
    "wall_time_s",
    "train_time_s",
    "threads",
    "git_commit",
    "platform",
    "_path",
    "stack",
}


def comparable(results: Path) -> dict[str, dict]:
    out = {}
    for r in iter_records(results):
        rec = {k: v for k, v in r.to_json().items() if k not in EXECUTION}
        rec["config"] = {k: v for k, v in rec["config"].items() if k != "out"}
        rec["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in rec["history"]]  # wall time
        rec["notes"] = [n for n in rec["notes"] if not n.startswith("trained in a stack of")]
        out[f"{r.dataset}/{r.model}/{r.tag}/seed{r.seed}"] = rec
    return out


def assert_close(a, b, where=""):
    """Equal, but floats within float32 rounding of a stacked computation (abs 1e-4 or rel 1e-5)."""
    if isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-4), where
    elif isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ------------------------------------------------------------------------ grouping (no real training)
class GroupingBackend:
    """Records which runs were submitted together; 'trains' them with fake records (test_sweep's fake)."""

    def __init__(self, capacity: int):
        self.capacity, self.units, self.pending, self.n = capacity, [], {}, 0

    def _token(self, options):
        self.n += 1
        self.pending[self.n] = options
        return self.n

    def submit(self, run, options, out):
        self.units.append([run.label])
        return self._token([options])

    def submit_stack(self, runs, options, out):
        self.units.append([r.label for r in runs])
        return self._token(options)

    def wait(self, tokens, timeout):
        from test_sweep import fake_run

        token = min(tokens)
        opts = self.pending.pop(token)
        records = [fake_run(o) for o in opts]
        return [(token, {"ok": True, "records": records} if len(opts) > 1 else {"ok": True, "record": records[0]})]

    def shutdown(self, cancel=False):
        pass


def sweep_of(**grid):
    return parse_sweep({"datasets": ["digits"], "models": ["gaussian", "made"], "grid": {"seed": [0, 1, 2], **grid}})


def test_runs_differing_in_per_run_options_share_a_stack_others_do_not(tmp_path):
    sweep = sweep_of(lr=[1e-3, 2e-3], **{"hidden-layers": [1, 2]})
    backend = GroupingBackend(1)
    report = run_sweep(sweep, tmp_path, backend=backend, stream=None)
    assert report.ok and report.count("done") == 3 + 12
    sizes = sorted(len(u) for u in backend.units)
    assert sizes == [1, 1, 1, 6, 6]  # 3 Gaussians alone (closed form); per hidden-layers: 2 lrs x 3 seeds
    for unit in backend.units:
        assert len({label.split("hidden-layers=")[-1][0] for label in unit}) == 1  # never across shapes
    for state in report.states:  # every run has its own record and state
        assert state.status == "done" and state.run.record_path(tmp_path).is_file()


def test_max_stack_caps_and_free_slots_split_groups(tmp_path):
    backend = GroupingBackend(1)
    assert run_sweep(sweep_of(lr=[1e-3, 2e-3]), tmp_path / "a", backend=backend, stream=None, max_stack=4).ok
    assert sorted(len(u) for u in backend.units) == [1, 1, 1, 2, 4]
    backend = GroupingBackend(1)
    assert run_sweep(sweep_of(), tmp_path / "b", backend=backend, stream=None, max_stack=1).ok
    assert max(len(u) for u in backend.units) == 1
    # 2 slots and one group of 6 made runs behind the Gaussians: split in two stacks rather than one idle slot
    backend = GroupingBackend(2)
    raw = {"datasets": ["digits"], "models": ["made"], "grid": {"seed": [0, 1, 2], "lr": [1e-3, 2e-3]}}
    assert run_sweep(parse_sweep(raw), tmp_path / "c", backend=backend, stream=None).ok
    assert sorted(len(u) for u in backend.units) == [3, 3]
    with pytest.raises(ConfigError, match="--max-stack"):
        run_sweep(sweep_of(), tmp_path / "d", backend=GroupingBackend(1), stream=None, max_stack=0)


def test_a_failed_stack_retries_each_run(tmp_path):
    class Failing(GroupingBackend):
        def wait(self, tokens, timeout):
            token = min(tokens)
            if len(self.pending[token]) > 1 and len(self.units) < 2:
                self.pending.pop(token)
                return [(token, {"ok": False, "error": "RuntimeError: worker lost"})]
            return super().wait(tokens, timeout)

    raw = {"datasets": ["digits"], "models": ["made"], "grid": {"seed": [0, 1, 2]}}
    backend = Failing(1)
    report = run_sweep(parse_sweep(raw), tmp_path, backend=backend, stream=None, retries=1)
    assert report.ok and [s.attempts for s in report.states] == [2, 2, 2]
    assert [len(u) for u in backend.units] == [3, 3]


def test_a_stack_stopped_by_a_stack_mates_lock_sets_that_run_aside_and_goes_on_without_it(tmp_path):
    """Another process took seed 1 between the sweep's look at the locks and the stack's own (a race): the stack
    fails on seed 1's lock. Seed 1 is set aside; seeds 0 and 2 go again as a stack, seed 0 still from its
    checkpoint (not afresh, which would delete it): their attempt said nothing about them."""
    from test_faults import _start_holder

    from flowbench.results import lock_path

    sweep = parse_sweep({"datasets": ["digits"], "models": ["made"], "grid": {"seed": [0, 1, 2]}})
    r0, r1 = sweep.runs[0], sweep.runs[1]
    ckpt = r0.checkpoint_path(tmp_path)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"seed 0 so far")
    holders, resumes = [], []

    class Raced(GroupingBackend):
        def submit_stack(self, runs, options, out):
            resumes.append({r.seed: o.resume for r, o in zip(runs, options)})
            return super().submit_stack(runs, options, out)

        def wait(self, tokens, timeout):
            token = min(tokens)
            if not holders:
                holders.append(_start_holder(lock_path(tmp_path, r1.dataset, r1.model, r1.seed, r1.tag)))
                self.pending.pop(token)
                error = f"RunLocked: process {holders[0].pid} is already training this run"
                return [(token, {"ok": False, "error": error, "retry": False, "locked": True})]
            return super().wait(tokens, timeout)

    backend = Raced(1)
    try:
        report = run_sweep(sweep, tmp_path, backend=backend, stream=None, retries=0)  # not charged an attempt
    finally:
        holders[0].kill()
        holders[0].wait()
    assert [len(u) for u in backend.units] == [3, 2]
    assert resumes == [{0: True, 1: False, 2: False}, {0: True, 2: False}]
    assert {s.run.seed: (s.status, s.attempts) for s in report.states} == {
        0: ("done", 1),
        1: ("elsewhere", 1),
        2: ("done", 1),
    }
    assert report.ok and ckpt.read_bytes() == b"seed 0 so far"


def test_memory_cap_rule():
    from flowbench.config import resolve_options
    from flowbench.training.stacked import MAX_STACK, run_memory, stack_cap

    opts = resolve_options({"dataset": "digits", "model": "maf"})
    per_run = run_memory(opts)
    params = sum(
        p.numel()
        for p in __import__("flowbench.models", fromlist=["x"]).build_model("maf", 64, **opts.hparams).parameters()
    )
    assert per_run > 6 * 4 * params  # activations on top of the parameter copies
    assert stack_cap(opts, budget=3 * per_run + 1) == 3
    assert stack_cap(opts, budget=1) == 1 and stack_cap(opts, budget=10**15) == MAX_STACK
    bigger = resolve_options({"dataset": "digits", "model": "maf", "batch_size": 400})
    assert run_memory(bigger) > per_run  # activations grow with the batch


def test_unstackable_runs_train_alone_and_run_seeds_refuses_them(tmp_path):
    from flowbench.config import resolve_options
    from flowbench.training.stacked import run_stacked, unstackable

    assert unstackable(resolve_options({"dataset": "digits", "model": "maf"})) is None
    assert "adam-epoch-step" in unstackable(
        resolve_options({"dataset": "digits", "model": "relgrad", "adam_epoch_step": True})
    )
    backend = GroupingBackend(1)
    assert run_sweep(sweep_of(**{"adam-epoch-step": True}), tmp_path, backend=backend, stream=None).ok
    assert max(len(u) for u in backend.units) == 1
    with pytest.raises(ConfigError, match="adam-epoch-step"):
        run_stacked(
            [
                resolve_options(
                    {"dataset": "digits", "model": "relgrad", "adam_epoch_step": True, "seed": s, "out": str(tmp_path)}
                )
                for s in (0, 1)
            ]
        )


# ------------------------------------------------------------------------ real stacked sweeps
@pytest.fixture(scope="module")
def tiny():
    return load_sweep(REPO / "configs" / "sweeps" / "tiny-digits.toml")


@pytest.fixture(scope="module")
def unstacked(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("unstacked")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_sweep(tiny, out, stream=None, max_stack=1).ok
    finally:
        torch.set_num_threads(threads)
    return out


def _check_same(stacked: Path, unstacked: Path, tiny, report) -> None:
    for state in report.states:  # each run's state holds its own record (the report is per run)
        assert (state.record.seed, state.record.tag, state.status) == (state.run.seed, state.run.tag, "done")
    a, b = comparable(stacked), comparable(unstacked)
    assert set(a) == set(b) == {r.label for r in tiny.runs}
    for label in a:
        assert a[label]["epochs"] == b[label]["epochs"]
        assert_close(a[label], b[label], label)
    recs = {f"{r.dataset}/{r.model}/{r.tag}/seed{r.seed}": r for r in iter_records(stacked)}
    for run in tiny.runs:
        stack = recs[run.label].stack
        assert (stack is None) == (run.model == "gaussian")
        if stack is not None:
            assert {**stack, "id": None} == {"seeds": [0, 1], "size": 2, "id": None}  # each configuration's two seeds
    for select in ("best-val", None):
        kw = {"select": select} if select else {}
        assert build_table(list(iter_records(stacked)), sources=["maf"], **kw) == build_table(
            list(iter_records(unstacked)), sources=["maf"], **kw
        )


def test_sequential_stacked_sweep_equals_the_unstacked_one(tiny, unstacked, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run_sweep(tiny, tmp_path, stream=None)
    finally:
        torch.set_num_threads(threads)
    assert report.ok and report.count("done") == len(tiny.runs)
    _check_same(tmp_path, unstacked, tiny, report)


@pytest.mark.slow  # fresh processes, each importing torch: seconds each
def test_process_and_ray_stacked_sweeps_equal_the_unstacked_one(tiny, unstacked, tmp_path, monkeypatch):
    report = run_sweep(tiny, tmp_path / "proc", executor="local", workers=2, stream=None)
    assert report.ok
    _check_same(tmp_path / "proc", unstacked, tiny, report)
    for run in tiny.runs:  # every run of a stack keeps its own log
        assert run.log_path(tmp_path / "proc").is_file()
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    report = run_sweep(tiny, tmp_path / "ray", executor="ray", workers=2, stream=None)
    assert report.ok and not ray.is_initialized()
    _check_same(tmp_path / "ray", unstacked, tiny, report)
    assert all(read_per_point(r)[1] is None for r in iter_records(tmp_path / "ray"))  # came back with the records
