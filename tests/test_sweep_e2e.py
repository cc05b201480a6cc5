"""Real sweeps of configs/sweeps/tiny-digits.toml with the real trainer: in this process, in 2 worker
processes, and on a local Ray instance with 2 CPUs. Same seeds must give the same records and table."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flowbench.results import iter_records, model_state_path, per_point_path, read_per_point
from flowbench.sweep import load_sweep, run_sweep
from flowbench.tables import build_table

#: Record fields that legitimately differ between executors (clocks, process, machine, command line).
NONDETERMINISTIC = {"command", "timestamp", "wall_time_s", "train_time_s", "threads", "git_commit", "platform", "_path"}


def comparable(results: Path) -> dict[str, dict]:
    """Records by run label, without the fields that may differ, and without the results folder itself."""
    out = {}
    for r in iter_records(results):
        rec = {k: v for k, v in r.to_json().items() if k not in NONDETERMINISTIC}
        rec["config"] = {k: v for k, v in rec["config"].items() if k != "out"}
        rec["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in rec["history"]]  # wall time
        out[f"{r.dataset}/{r.model}/{r.tag}/seed{r.seed}"] = rec
    return out


def seed0(sweep):
    """The seed-0 half of the sweep (5 runs): enough to compare executors, half the time."""
    return replace(sweep, runs=[r for r in sweep.runs if r.seed == 0])


@pytest.fixture(scope="module")
def sweep(repo_root_module):
    return load_sweep(repo_root_module / "configs" / "sweeps" / "tiny-digits.toml")


@pytest.fixture(scope="module")
def repo_root_module() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_results(sweep, tmp_path_factory) -> Path:
    """The sweep run sequentially in this process, with 1 torch thread like the workers."""
    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run_sweep(sweep, out, executor="local", stream=None, max_stack=1)  # the unstacked reference
    finally:
        torch.set_num_threads(threads)
    assert report.ok and report.count("done") == len(sweep.runs)
    return out


def test_local_sweep_writes_one_record_per_run_where_expected(sweep, local_results):
    records = comparable(local_results)
    assert set(records) == {r.label for r in sweep.runs}
    for run in sweep.runs:
        assert run.record_path(local_results).is_file()
        rec = records[run.label]
        assert rec["status"] == "ok" and rec["config"]["tag"] == run.tag
        for key, value in run.values:  # the grid's values reached the trainer
            assert rec["config"][key] == value
        if run.model != "gaussian":
            assert rec["epochs"] == 2  # max-epochs = 2 from the sweep file beat configs/digits/*.toml
    # Distinct configurations are distinct results.
    relgrad = {records[r.label]["test_ll"] for r in sweep.runs if r.model == "relgrad"}
    assert len(relgrad) == 4


@pytest.mark.slow  # fresh processes, each importing torch: seconds each
def test_worker_processes_reproduce_the_sequential_sweep(sweep, local_results, tmp_path):
    half = seed0(sweep)
    report = run_sweep(half, tmp_path, executor="local", workers=2, stream=None, max_stack=1)
    assert report.ok and report.count("done") == len(half.runs) == 5
    expected = {k: v for k, v in comparable(local_results).items() if k.endswith("/seed0")}
    assert comparable(tmp_path) == expected
    # Parallel runs write their output to per-run logs instead of the terminal.
    assert all(
        (tmp_path / "sweeps" / "logs" / r.dataset / r.model / r.tag / f"seed{r.seed}.log").is_file() for r in half.runs
    )


@pytest.mark.slow  # fresh processes, each importing torch: seconds each
def test_ray_sweep_matches_local(sweep, local_results, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'); CI installs it")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # offline sandbox: no usage reporting attempts
    assert not ray.is_initialized()
    report = run_sweep(sweep, tmp_path, executor="ray", workers=2, stream=None, max_stack=1)
    assert not ray.is_initialized()  # the instance started for the sweep was shut down
    assert report.ok and report.count("done") == len(sweep.runs)
    # Records were returned to the driver and written under its results folder, exactly as locally.
    ray_records, local_records = comparable(tmp_path), comparable(local_results)
    assert ray_records == local_records
    for rec in iter_records(tmp_path):
        assert rec.config["out"] == str(tmp_path) and "default_worker" not in (rec.command or "")
        assert (Path(rec.path).parent / rec.model_state).is_file()  # the model state came back with it
        assert read_per_point(rec)[1] is None  # and the per-point test LLs (the table's paired t-test)
    for run in sweep.runs:  # both files as the local run wrote them, byte for byte
        key = (run.dataset, run.model, run.seed, run.tag)
        for path in (model_state_path, per_point_path):
            assert path(tmp_path, *key).read_bytes() == path(local_results, *key).read_bytes(), (run.label, path)
    table = build_table(list(iter_records(tmp_path)), sources=["maf"], select="best-val")
    assert table == build_table(list(iter_records(local_results)), sources=["maf"], select="best-val")
    assert "best of 2 configurations" in table
    # A second invocation finds everything recorded and starts nothing (not even Ray).
    again = run_sweep(sweep, tmp_path, executor="ray", workers=2, stream=None)
    assert again.count("skipped") == len(sweep.runs) and not ray.is_initialized()


@pytest.mark.slow  # fresh processes, each importing torch: seconds each
def test_a_workers_warning_reaches_the_runs_log_as_the_cli_says_it(tmp_path):
    """A run in a worker process writes flowbench's warnings (here: patience shorter than the cosine budget) into
    its log as `flowbench sweep: warning: ...`, not as a Python source line."""
    spec = tmp_path / "s.toml"
    spec.write_text(
        'datasets = ["digits"]\nmodels = ["relgrad"]\n\n[grid]\nseed = [0]\nlr-schedule = ["cosine"]\n'
        "max-steps = [200]\nmax-epochs = [1]\npatience = [2]\nlayers = [1]\n"
    )
    sw = load_sweep(spec)
    report = run_sweep(sw, tmp_path / "out", executor="local", workers=2, stream=None, max_stack=1)
    assert report.ok and report.count("done") == len(sw.runs) == 1
    for run in sw.runs:
        log = run.log_path(tmp_path / "out").read_text()
        assert "flowbench sweep: warning: --patience 2 epochs is shorter than the cosine schedule's" in log, log
        assert "UserWarning" not in log
