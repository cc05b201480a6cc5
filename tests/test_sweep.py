"""Sweeps without real training: grid expansion, tags, skipping, retries, selection, progress, --dry-run.

A fake run function (injected into ``run_sweep``) writes records the way the trainer does, so everything
but the training itself is exercised; tests/test_sweep_e2e.py runs the real trainer, locally and on Ray.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from flowbench import interrupts
from flowbench.errors import ConfigError
from flowbench.sweep import Progress, load_sweep, make_tag, parse_sweep, plan, run_sweep, summary
from flowbench.sweep.runner import preflight

CALLS: list[str] = []
ATTEMPTS: dict[str, int] = {}


def fake_val_ll(options: dict) -> float:
    """A known validation score: best at 2 hidden layers and lr 1e-3 (so the selection has one answer)."""
    hl = options.hparams.get("hidden_layers") or 1
    return -10.0 - abs(hl - 2) - 1000 * abs(options.lr - 1e-3) + 0.01 * options.seed


def fake_run(options):
    """Stands in for run_experiment: fails for hidden=13 always, for hidden=7 on the first attempt only."""
    from flowbench.models import display_name
    from flowbench.results import RunRecord, record_path, write_record

    label = f"{options.model}/{options.tag}/seed{options.seed}"
    CALLS.append(label)
    ATTEMPTS[label] = ATTEMPTS.get(label, 0) + 1
    if options.hparams.get("hidden") == 13:
        raise RuntimeError("boom: this configuration always crashes")
    if options.hparams.get("hidden") == 7 and ATTEMPTS[label] == 1:
        raise RuntimeError("transient failure")
    val = fake_val_ll(options)
    diverged = options.hparams.get("hidden") == 5  # trained, recorded, but not finite (a too-high lr)
    record = RunRecord.example(
        dataset=options.dataset,
        model=options.model,
        display_name=display_name(options.model, **options.hparams),
        tag=options.tag,
        seed=options.seed,
        config=options.to_dict(),
        params=1,
        epochs=1,
        best_epoch=1,
        best_val_ll=val,
        test_ll=val - 1.0,
        test_ll_2se=0.1,
        n_test=100,
        status="nonfinite" if diverged else "ok",
        failure="non-finite training loss (nan) at epoch 1, batch 2 (step 2) (lower --lr)" if diverged else None,
    )
    write_record(record_path(options.out, options.dataset, options.model, options.seed, options.tag), record)
    return record


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    ATTEMPTS.clear()


def small(**grid) -> dict:
    return {"datasets": ["digits"], "models": ["gaussian", "made"], "grid": {"seed": [0, 1], **grid}}


# ------------------------------------------------------------------------------------------- expansion
def test_grid_expansion_product_tags_and_inapplicable_options():
    sweep = parse_sweep(
        {
            "datasets": ["digits"],
            "models": ["gaussian", "made", "maf"],
            "grid": {"seed": [0, 1, 2], "hidden-layers": [1, 2], "max_epochs": 3},
            "override": {"maf": {"layers": [5, 10]}, "digits/made": {"lr": [1e-3, 1e-4]}},
        }
    )
    by_model: dict[str, list] = {}
    for r in sweep.runs:
        by_model.setdefault(r.model, []).append(r)
    # gaussian takes no hidden-layers: 1 configuration x 3 seeds; made: 2 x 2 lrs; maf: 2 x 2 layers.
    assert len(by_model["gaussian"]) == 3
    assert len(by_model["made"]) == 2 * 2 * 3
    assert len(by_model["maf"]) == 2 * 2 * 3
    assert len(sweep.runs) == 3 + 12 + 12
    assert {r.tag for r in by_model["gaussian"]} == {"default"}  # nothing of the grid applies to it
    assert {r.tag for r in by_model["maf"]} == {
        f"hidden-layers={h},layers={k},max-epochs=3" for h in (1, 2) for k in (5, 10)
    }
    assert "made/hidden-layers=2,lr=0.0001,max-epochs=3/seed2" in {
        f"{r.model}/{r.tag}/seed{r.seed}" for r in sweep.runs
    }
    assert sweep.ignored == {"gaussian": ["hidden-layers", "max-epochs"]}
    # The seeds of one configuration share a tag, and every (model, tag, seed) is unique.
    assert len({(r.model, r.tag, r.seed) for r in sweep.runs}) == len(sweep.runs)
    # Resolved options carry the tag and the grid values (explicit values beat configs and defaults).
    run = next(r for r in by_model["maf"] if r.tag.startswith("hidden-layers=2,layers=10") and r.seed == 1)
    opts = run.options("res")
    assert (opts.hparams["hidden_layers"], opts.hparams["layers"], opts.max_epochs, opts.seed) == (2, 10, 3, 1)
    assert (opts.tag, opts.out, opts.dataset, opts.model) == (run.tag, "res", "digits", "maf")
    assert run.record_path("res") == Path("res/runs/digits/maf") / run.tag / "seed1.json"


def test_match_params_applies_to_models_with_a_size_knob_but_not_to_the_target_itself():
    sweep = parse_sweep(
        {
            "datasets": ["power"],
            "models": ["relgrad", "gaussian", "maf"],
            "grid": {"match-params": "relgrad", "hidden-layers": [1, 2]},
        }
    )
    tags = {(r.model, r.tag) for r in sweep.runs}
    assert tags == {
        ("relgrad", "default"),
        ("gaussian", "default"),
        ("maf", "hidden-layers=1,match-params=relgrad"),
        ("maf", "hidden-layers=2,match-params=relgrad"),
    }
    # Explicitly per model, any target works, e.g. relgrad matched to a number of parameters.
    sweep = parse_sweep({"datasets": ["power"], "models": ["relgrad"], "override": {"relgrad": {"match-params": 500}}})
    assert [r.tag for r in sweep.runs] == ["match-params=500"]


def test_tags_are_stable_when_the_grid_grows():
    a = parse_sweep(small(**{"hidden-layers": [1]}))
    b = parse_sweep(small(**{"hidden-layers": [1, 2], "lr": 1e-4}))
    c = parse_sweep(small(**{"hidden-layers": [1, 2]}))
    tags_a = {r.tag for r in a.runs if r.model == "made"}
    assert tags_a == {"hidden-layers=1"}
    assert tags_a < {r.tag for r in c.runs if r.model == "made"}  # adding a value keeps the old tags
    assert not tags_a & {r.tag for r in b.runs}  # a new fixed setting is a new configuration


def test_make_tag_format():
    assert make_tag([]) == "default"
    assert make_tag([("seed", 3), ("device", "cpu")]) == "default"
    assert make_tag([("lr", 1e-05), ("batch_norm", False), ("activation", "tanh")]) == (
        "activation=tanh,batch-norm=false,lr=1e-05"
    )
    assert make_tag([("match_params", "relgrad"), ("lr", 0.0001)]) == "lr=0.0001,match-params=relgrad"
    long = make_tag([(f"k{i}", "x" * 20) for i in range(10)])
    assert len(long) <= 120 and "+" in long
    assert long == make_tag([(f"k{i}", "x" * 20) for i in range(10)])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (small(**{"hiden-layers": [1]}), "hiden-layers"),  # typo: the error names the key
        (small(lr=["fast"]), "lr"),
        (small(tag="x"), "set by the sweep"),
        (small(model=["maf"]), "datasets`/`models"),
        (small(seed=[]), "non-empty"),
        ({**small(), "models": ["maff"]}, "maff"),
        ({**small(), "datasets": ["powre"]}, "powre"),
        ({**small(), "datasets": "digits"}, "non-empty list"),
        ({**small(), "grids": {}}, "grids"),
        ({**small(), "override": {"nvp": {"lr": 1e-3}}}, "override.nvp"),
        ({**small(), "override": {"gaussian": {"hidden-layers": 2}}}, "does not take"),
        ({"models": ["maf"]}, "datasets"),
    ],
)
def test_bad_sweep_files_raise_config_errors(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_sweep(raw)


def test_shipped_sweep_files_parse(repo_root):
    files = sorted((repo_root / "configs" / "sweeps").glob("*.toml"))
    assert {f.stem for f in files} >= {"tiny-digits", "maf-table1", "relgrad-table1"}
    counts = {f.stem: load_sweep(f) for f in files}
    maf = counts["maf-table1"]
    assert set(maf.datasets) == {"power", "gas", "hepmass", "miniboone", "bsds300"}
    assert set(maf.models) == {"gaussian", "made", "made-mog", "realnvp", "maf", "maf-mog"}
    # Every row on every dataset with 1 and 2 hidden layers; flows with 5 and 10 layers; paper learning rates.
    seen: dict[tuple, set] = {}
    for r in maf.runs:
        v = dict(r.values)
        seen.setdefault((r.dataset, r.model), set()).add((v.get("hidden_layers"), v.get("layers"), v.get("lr")))
    for ds in maf.datasets:
        assert seen[(ds, "gaussian")] == {(None, None, None)}
        assert {h for h, _, _ in seen[(ds, "made")]} == {1, 2}
        assert seen[(ds, "maf")] >= {(h, k, 1e-4) for h in (1, 2) for k in (5, 10)}
        assert {k for _, k, _ in seen[(ds, "realnvp")]} == {5, 10}
        assert {(k, lr) for _, k, lr in seen[(ds, "maf-mog")]} == {(5, 1e-4)}
        assert {lr for _, _, lr in seen[(ds, "made-mog")]} == {1e-3}
    gas = {dict(r.values).get("activation") for r in maf.runs if r.dataset == "gas" and r.model == "maf"}
    assert gas == {"tanh"}
    for sweep in counts.values():  # every run's options resolve and its model accepts them
        preflight(plan(sweep.runs, "unused-results-dir"), "unused-results-dir")
    rel = counts["relgrad-table1"]
    baselines = [r for r in rel.runs if r.model not in ("relgrad", "gaussian")]
    assert baselines and all("match-params=relgrad" in r.tag for r in baselines)
    assert all("match-params" not in r.tag for r in rel.runs if r.model == "relgrad")


# ------------------------------------------------------------------------------ running (fake trainer)
def test_skips_recorded_runs_and_resumes(tmp_path):
    sweep = parse_sweep(small(**{"hidden-layers": [1, 2]}))
    assert len(sweep.runs) == 2 + 4
    first = sweep.runs[:3]
    for run in first:  # as if an earlier, interrupted sweep had recorded these
        fake_run(run.options(tmp_path))
    CALLS.clear()
    assert [s.status for s in plan(sweep.runs, tmp_path)] == ["skipped"] * 3 + ["pending"] * 3
    report = run_sweep(sweep, tmp_path, run_fn=fake_run, stream=None)
    assert report.ok and report.count("skipped") == 3 and report.count("done") == 3
    assert sorted(CALLS) == sorted(f"{r.model}/{r.tag}/seed{r.seed}" for r in sweep.runs[3:])
    CALLS.clear()
    again = run_sweep(sweep, tmp_path, run_fn=fake_run, stream=None)
    assert CALLS == [] and again.count("skipped") == 6


def test_an_error_that_stops_the_sweep_is_in_its_report(tmp_path, monkeypatch):
    # e.g. a worker pool that cannot be replaced after a worker died: the report says what stopped the sweep
    from flowbench.errors import UsageError
    from flowbench.sweep.executors import SequentialExecutor

    wait, calls = SequentialExecutor.wait, []

    def wait_then_fail(self, tokens, timeout):
        calls.append(1)
        if len(calls) == 2:
            raise UsageError("the sweep's worker processes could not start (planted)")
        return wait(self, tokens, timeout)

    monkeypatch.setattr(SequentialExecutor, "wait", wait_then_fail)
    sweep = parse_sweep(small())
    with pytest.raises(UsageError):
        run_sweep(sweep, tmp_path, run_fn=fake_run, stream=None)
    saved = json.loads((tmp_path / "sweeps" / f"{sweep.name}.json").read_text())
    assert saved["interrupted"] is True
    assert saved["error"] == "the sweep's worker processes could not start (planted)"
    assert saved["counts"]["done"] == 1 and saved["counts"]["pending"] == len(sweep.runs) - 1


def test_a_sweep_stopped_while_its_workers_start_writes_its_report(tmp_path, monkeypatch):
    import flowbench.sweep.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the worker pool spawns its processes (seconds: each imports torch)

    monkeypatch.setattr(runner, "make_backend", interrupted)
    sweep = parse_sweep(small())
    report = run_sweep(sweep, tmp_path, run_fn=fake_run, stream=None)
    saved = json.loads((tmp_path / "sweeps" / f"{sweep.name}.json").read_text())
    assert report.interrupted and saved["interrupted"] is True and "error" not in saved
    assert saved["counts"]["pending"] == len(sweep.runs)


def test_failing_run_is_retried_then_reported_and_the_sweep_goes_on(tmp_path):
    raw = small()
    raw["models"] = ["made"]
    raw["grid"]["hidden"] = [13, 7, 20]  # 13 always fails, 7 fails once, 20 works
    sweep = parse_sweep(raw)
    out = io.StringIO()
    report = run_sweep(sweep, tmp_path, run_fn=fake_run, retries=2, stream=out, live=False)
    assert not report.ok
    failed = {s.run.tag: s for s in report.failed}
    assert set(failed) == {"hidden=13"} and report.count("done") == 4
    for s in failed.values():
        assert s.attempts == 3 and "boom" in s.error
    assert ATTEMPTS["made/hidden=13/seed0"] == 3  # 1 + 2 retries, then given up
    assert ATTEMPTS["made/hidden=7/seed0"] == 2  # transient: retried once, then recorded
    assert ATTEMPTS["made/hidden=20/seed1"] == 1
    text = out.getvalue()
    assert "retry  digits/made/hidden=7/seed0: attempt 1/3 failed: RuntimeError: transient failure" in text
    assert "FAILED digits/made/hidden=13/seed1 after 3 attempt(s)" in text
    assert "sweep: 4 done, 0 running, 2 failed, 0 left" in text
    saved = json.loads((tmp_path / "sweeps" / "sweep.json").read_text())
    assert saved["counts"] == {"done": 4, "skipped": 0, "failed": 2, "elsewhere": 0, "pending": 0, "nonfinite": 0}
    assert {r["tag"] for r in saved["runs"] if r["status"] == "failed"} == {"hidden=13"}
    assert {r["display_name"] for r in saved["runs"]} == {"MADE"}  # the label a record would have
    from flowbench.plots._records import failed_runs

    assert sorted(f.label for f in failed_runs(tmp_path)[0]) == ["MADE [hidden=13]"] * 2  # the report's rows
    assert "FAILED digits/made/hidden=13/seed0 after 3 attempt(s): RuntimeError: boom" in summary(
        report, sweep, tmp_path
    )
    # No retries at all: the first failure is final.
    ATTEMPTS.clear()
    report = run_sweep(sweep, tmp_path, run_fn=fake_run, retries=0, stream=None)
    assert report.count("failed") == 2 and report.count("skipped") == 4 and ATTEMPTS["made/hidden=13/seed0"] == 1


def test_a_run_recorded_non_finite_is_not_a_success_of_the_sweep(tmp_path):
    # `flowbench run` exits non-zero for a diverged run; the same run in a sweep read "1 done, 0 failed", exit 0.
    raw = small()
    raw["models"] = ["made"]
    raw["grid"]["hidden"] = [5, 20]  # 5 diverges
    sweep = parse_sweep(raw)
    report = run_sweep(sweep, tmp_path, run_fn=fake_run, stream=None)
    assert not report.ok and not report.failed and report.count("done") == 4
    assert {s.run.tag for s in report.nonfinite} == {"hidden=5"} and len(report.nonfinite) == 2
    text = summary(report, sweep, tmp_path)
    assert "4 done (2 of them non-finite), 0 skipped" in text
    assert "NONFINITE digits/made/hidden=5/seed0: non-finite training loss (nan)" in text
    saved = json.loads((tmp_path / "sweeps" / "sweep.json").read_text())
    assert saved["counts"]["nonfinite"] == 2 and saved["counts"]["failed"] == 0
    # the next sweep reruns them (their records are replaceable) and leaves the finite ones
    CALLS.clear()
    run_sweep(sweep, tmp_path, run_fn=fake_run, stream=None)
    assert sorted(CALLS) == ["made/hidden=5/seed0", "made/hidden=5/seed1"]


def test_best_validation_selection_in_the_table(tmp_path):
    from flowbench.results import iter_records
    from flowbench.tables import build_table

    sweep = parse_sweep(small(**{"hidden-layers": [1, 2], "lr": [1e-3, 2e-3]}))
    assert run_sweep(sweep, tmp_path, run_fn=fake_run, stream=None).ok
    records = list(iter_records(tmp_path))
    assert len(records) == 2 + 8
    made = [r for r in records if r.model == "made"]
    best_tag = max({r.tag for r in made}, key=lambda t: sum(r.best_val_ll for r in made if r.tag == t))
    assert best_tag == "hidden-layers=2,lr=0.001"  # by construction of fake_val_ll
    table = build_table(records, sources=[], select="best-val")
    assert f"best of 4 configurations by mean validation LL: tag {best_tag}" in table
    # The cell is the mean test LL of the chosen configuration's two seeds, (-11 + -10.99) / 2; the other
    # configurations score -12 and below.
    made_row = next(line for line in table.splitlines() if line.startswith("| MADE ") and "ours" in line)
    assert "-11.00 ± 0.10" in made_row
    assert "range -11.00 to -10.99" in table


def test_progress_line_counts():
    buf = io.StringIO()
    p = Progress(total=5, skipped=1, stream=buf, live=False)
    p.update(0, 1, 0, 3)
    p.update(0, 1, 0, 3)  # unchanged: no new line off a terminal
    p.event("done   x")
    p.update(1, 1, 0, 2)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("sweep: 0 done, 1 running, 0 failed, 3 left (of 5; 1 already recorded)")
    assert lines[1] == "done   x" and lines[2].startswith("sweep: 1 done, 1 running") and len(lines) == 3
    live = io.StringIO()
    p = Progress(total=2, skipped=0, stream=live, live=True)
    p.update(0, 1, 0, 1)
    p.update(1, 1, 0, 0)
    p.close()
    assert live.getvalue().count("\r\033[K") == 2 and live.getvalue().endswith("\n")


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_dry_run_lists_runs_and_skips(tmp_path, repo_root, capsys):
    from flowbench.cli import main

    path = repo_root / "configs" / "sweeps" / "tiny-digits.toml"
    sweep = load_sweep(path)
    recorded = sweep.runs[0]
    fake_run(recorded.options(tmp_path))
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    n = len(sweep.runs)
    assert f"{n} runs" in text and f"1 already recorded in {tmp_path}/runs (skip), {n - 1} to run" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["run"], ["skip"])]
    assert len(rows) == n
    assert rows[0][:4] == ["skip", "digits", recorded.model, recorded.tag]
    assert {tuple(r[2:5]) for r in rows} == {(r.model, r.tag, str(r.seed)) for r in sweep.runs}
    assert not (tmp_path / "sweeps").exists()  # a dry run writes nothing


def test_cli_bad_key_and_missing_ray(tmp_path, monkeypatch, capsys):
    import sys

    from flowbench.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text('datasets = ["digits"]\nmodels = ["made"]\n[grid]\nmax-epoch = [1]\n')
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert "max-epoch" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text('datasets = ["digits"]\nmodels = ["gaussian"]\n')
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    assert main(["sweep", str(good), "--executor", "ray", "--out", str(tmp_path)]) == 2
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err


def test_checkpoint_resumes_and_a_failed_resume_restarts(tmp_path):
    sweep = parse_sweep({"datasets": ["digits"], "models": ["made"], "grid": {"hidden": [7, 20]}})
    seen: list[tuple[int, bool]] = []

    def run(options):
        seen.append((options.hparams["hidden"], options.resume))
        return fake_run(options)

    for r in sweep.runs:  # as if a killed sweep had left checkpoints behind
        r.checkpoint_path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        r.checkpoint_path(tmp_path).write_bytes(b"")
    assert run_sweep(sweep, tmp_path, run_fn=run, stream=None).ok
    # hidden=20 resumed; hidden=7 failed when resumed (fake: first attempt fails), so its retry started afresh.
    assert sorted(seen) == [(7, False), (7, True), (20, True)]


def test_ctrl_c_stops_the_sweep_and_reports(tmp_path):
    sweep = parse_sweep({"datasets": ["digits"], "models": ["made"], "grid": {"hidden": [20, 21, 22]}})

    def run(options):
        if options.hparams["hidden"] == 21:
            raise KeyboardInterrupt
        return fake_run(options)

    report = run_sweep(sweep, tmp_path, run_fn=run, stream=None)
    assert report.interrupted and not report.ok
    assert [s.status for s in report.states] == ["done", "pending", "pending"]
    assert "run the same command again to continue" in summary(report, sweep, tmp_path)
    saved = json.loads((tmp_path / "sweeps" / "sweep.json").read_text())
    assert saved["interrupted"] and saved["counts"]["pending"] == 2


def test_bad_value_stops_the_sweep_before_any_run(tmp_path):
    sweep = parse_sweep({"datasets": ["digits"], "models": ["made"], "grid": {"activation": ["relu", "gelu"]}})
    with pytest.raises(ConfigError, match=r"run digits/made/activation=gelu/seed0: .*gelu"):
        run_sweep(sweep, tmp_path, run_fn=fake_run, stream=None)
    assert CALLS == []


class ReturningBackend:
    """Executor stand-in with 2 slots that completes runs out of order and, like the Ray executor, gets
    records back from the 'worker' (written to a scratch folder there) and writes them on the driver."""

    capacity = 2

    def __init__(self, scratch: Path):
        self.scratch, self.pending, self.max_inflight, self.submitted = scratch, {}, 0, 0

    def submit(self, run, options, out):
        token = self.submitted = self.submitted + 1
        self.pending[token] = options.replace(out=str(self.scratch))
        self.max_inflight = max(self.max_inflight, len(self.pending))
        return token

    def wait(self, tokens, timeout):
        token = max(tokens)  # the latest submitted finishes first
        options = self.pending.pop(token)
        from flowbench.sweep.worker import execute_run

        return [(token, execute_run(options, fake_run))]

    def finish(self, state, outcome, out):
        from flowbench.results import write_record

        outcome["record"].config["out"] = out
        write_record(state.run.record_path(out), outcome["record"])

    def shutdown(self, cancel=False):
        pass


def test_scheduler_with_parallel_slots_and_records_written_by_the_driver(tmp_path):
    sweep = parse_sweep(small(**{"hidden-layers": [1, 2]}))
    backend = ReturningBackend(tmp_path / "scratch")
    buf = io.StringIO()
    report = run_sweep(sweep, tmp_path / "res", backend=backend, stream=buf, live=False)
    assert report.ok and report.count("done") == 6 and backend.max_inflight == 2
    assert "2 running" in buf.getvalue()
    for run in sweep.runs:  # every record is in the driver's folder, describing it
        rec = json.loads(run.record_path(tmp_path / "res").read_text())
        assert rec["config"]["out"] == str(tmp_path / "res") and rec["tag"] == run.tag


def test_a_driver_of_workers_stops_between_two_ticks_with_the_record_in_hand_written(tmp_path):
    # A SIGTERM landing while the driver writes a worker's record (Ray) or waits in a lock (a process pool) was
    # raised right there; the driver now finishes the tick (the record written whole) and stops before the next.
    from flowbench.errors import Terminated

    class SignalledWhileWriting(ReturningBackend):
        def finish(self, state, outcome, out):
            interrupts.ask(Terminated)  # what the command's SIGTERM handler does
            super().finish(state, outcome, out)

    sweep = parse_sweep(small())
    report = run_sweep(sweep, tmp_path / "res", backend=SignalledWhileWriting(tmp_path / "scratch"), stream=None)
    assert report.interrupted and report.terminated and not interrupts.asked()
    assert [s.status for s in report.states].count("done") == 1  # written whole; nothing submitted after
    assert [s.status for s in report.states].count("pending") == 3
    done = next(s for s in report.states if s.status == "done")
    assert json.loads(done.run.record_path(tmp_path / "res").read_text())["tag"] == done.run.tag


# ------------------------------------------------------------------- non-finite records are made again
def test_dry_run_says_which_runs_resume_and_which_another_process_is_training(tmp_path):
    """A long study's plan: a run with a checkpoint resumes from it (its epoch named); a run whose lock another
    process holds is left to it. The look at the lock creates and removes nothing."""
    from test_faults import _start_holder

    from flowbench.results import lock_path
    from flowbench.sweep.runner import dry_run_text
    from flowbench.training import run_experiment

    grid = {"seed": [0, 1, 2], "hidden": 8, "max-epochs": 2, "device": "cpu"}
    sweep = parse_sweep({"datasets": ["digits"], "models": ["made"], "grid": grid})
    r0, r1 = sweep.runs[0], sweep.runs[1]
    run_experiment(r0.options(tmp_path).replace(keep_checkpoint=True, quiet=True), progress=False)
    r0.record_path(tmp_path).unlink()  # as if killed after its second epoch's checkpoint
    lock = lock_path(tmp_path, r1.dataset, r1.model, r1.seed, r1.tag)
    proc = _start_holder(lock)
    stale = lock.with_name("seed2.lock")  # left by a killed process: held by nobody, and a look must leave it
    stale.write_text("999999\n")
    try:
        before = sorted(p.name for p in lock.parent.iterdir())
        text = dry_run_text(sweep, tmp_path)
        assert sorted(p.name for p in lock.parent.iterdir()) == before  # nothing created or removed
    finally:
        proc.kill()
        proc.wait()
    assert "3 to run, of which 1 resume from a checkpoint, 1 being trained by another process (elsewhere)" in text
    actions = {ln.split()[-1]: ln.rsplit("digits", 1)[0].strip() for ln in text.splitlines() if "digits " in ln}
    assert actions == {"0": "resume (after epoch 2)", "1": f"elsewhere (process {proc.pid} is training it)", "2": "run"}


def mark_nonfinite(path: Path) -> None:
    """Make the record at ``path`` one whose run ended non-finite (as a diverged run leaves it)."""
    rec = json.loads(path.read_text())
    rec.update(status="nonfinite", failure="training loss is not finite")
    path.write_text(json.dumps(rec))


def test_a_non_finite_record_is_rerun_and_an_ok_record_skipped(tmp_path):
    from flowbench.sweep.runner import dry_run_text

    sweep = parse_sweep({"datasets": ["digits"], "models": ["made"], "grid": {"seed": [0, 1, 2]}})
    for run in sweep.runs[:2]:
        fake_run(run.options(tmp_path))
    mark_nonfinite(sweep.runs[0].record_path(tmp_path))
    text = dry_run_text(sweep, tmp_path)
    assert f"1 already recorded in {tmp_path}/runs (skip), 2 to run, of which 1 rerun (non-finite record)" in text
    actions = {
        line.split()[-1]: line.rsplit("digits", 1)[0].strip()
        for line in text.splitlines()
        if line.split()[:1] in (["run"], ["skip"], ["rerun"])
    }
    assert actions == {"0": "rerun (non-finite record)", "1": "skip", "2": "run"}
    assert [s.replaces for s in plan(sweep.runs, tmp_path)] == [True, False, False]
    CALLS.clear()
    buf = io.StringIO()
    report = run_sweep(sweep, tmp_path, run_fn=fake_run, stream=buf, live=False)
    assert report.ok and report.count("skipped") == 1 and report.count("done") == 2
    assert sorted(CALLS) == ["made/default/seed0", "made/default/seed2"]
    assert json.loads(sweep.runs[0].record_path(tmp_path).read_text())["status"] == "ok"
    assert "done   digits/made/default/seed0: " in buf.getvalue() and "replaced the non-finite record" in buf.getvalue()
    CALLS.clear()
    assert run_sweep(sweep, tmp_path, run_fn=fake_run, stream=None).count("skipped") == 3 and CALLS == []


def test_a_rerun_continues_a_checkpoint_newer_than_the_non_finite_record_only(tmp_path):
    import os

    sweep = parse_sweep({"datasets": ["digits"], "models": ["made"], "grid": {"hidden": [20, 21]}})
    seen: list[tuple[int, bool]] = []

    def run(options):
        seen.append((options.hparams["hidden"], options.resume))
        return fake_run(options)

    kept, interrupted = sweep.runs
    for r in sweep.runs:
        fake_run(r.options(tmp_path))
        mark_nonfinite(r.record_path(tmp_path))
        r.checkpoint_path(tmp_path).write_bytes(b"")
        t = r.record_path(tmp_path).stat().st_mtime_ns
        # hidden=20: the checkpoint its run kept (--keep-checkpoint), written before its record; hidden=21: a rerun's
        # checkpoint, written after the record and then interrupted.
        when = t - 10**9 if r is kept else t + 10**9
        os.utime(r.checkpoint_path(tmp_path), ns=(when, when))
    assert run_sweep(sweep, tmp_path, run_fn=run, stream=None).ok
    assert sorted(seen) == [(20, False), (21, True)]
    assert not kept.checkpoint_path(tmp_path).exists()


def test_a_rerun_of_the_real_trainer_notes_the_replaced_record_locally_and_on_ray(tmp_path):
    import torch

    from flowbench.errors import UsageError
    from flowbench.results import read_record
    from flowbench.sweep.artifacts import ARTIFACTS, land_run, replaced_record
    from flowbench.sweep.worker import DEFAULT_RUN_FN, ray_execute

    sweep = parse_sweep({"datasets": ["digits"], "models": ["gaussian"]})  # closed form: fast
    (run,) = sweep.runs
    path = run.record_path(tmp_path)
    assert run_sweep(sweep, tmp_path, stream=None).ok
    mark_nonfinite(path)
    report = run_sweep(sweep, tmp_path, stream=None)
    assert report.count("done") == 1
    local = read_record(path)
    assert local.status == "ok" and local.notes[-1].startswith("replaced the non-finite record of an earlier run")
    # On Ray: the non-finite record goes to the node, so the run notes it there, as locally (this calls the
    # task's body in this process; tests/test_sweep_e2e.py runs real Ray tasks).
    mark_nonfinite(path)
    outcome = ray_execute(
        run.options(tmp_path), DEFAULT_RUN_FN, torch.get_num_threads(), replaced_record(run, str(tmp_path))
    )
    assert outcome["ok"]
    land_run(run, outcome["record"], outcome[ARTIFACTS], str(tmp_path))
    landed = read_record(path)
    assert landed.status == "ok" and landed.notes == local.notes
    # An ok record is not replaced: refused before any of the run's files is written.
    state = path.with_name("seed0.model.pt")
    before = state.stat().st_mtime_ns
    with pytest.raises(UsageError, match="a record already exists"):
        land_run(run, outcome["record"], outcome[ARTIFACTS], str(tmp_path))
    assert state.stat().st_mtime_ns == before


# -------------------------------------------------------- Ray's end of a run: packed on the node, landed here
#: What legitimately differs between two makings of one run: the command line and the clocks (and which stack).
CLOCKS = {"command", "timestamp", "wall_time_s", "train_time_s"}


def take_files(out: Path, run) -> dict:
    """The run's model state and per-point bytes and its record (without the clocks), removed from ``out``."""
    from flowbench.results import model_state_path, per_point_path

    key = (run.dataset, run.model, run.seed, run.tag)
    paths = {"state": model_state_path(out, *key), "points": per_point_path(out, *key), "record": run.record_path(out)}
    files = {k: p.read_bytes() for k, p in paths.items()}
    for p in paths.values():
        p.unlink()
    rec = json.loads(files["record"])
    files["record_keys"] = list(rec)
    files["record"] = {k: v for k, v in rec.items() if k not in CLOCKS}
    files["record"]["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in rec["history"]]
    if rec.get("stack"):
        files["record"]["stack"] = {**rec["stack"], "id": None}  # each stack's own
    return files


@pytest.mark.parametrize("stacked", [False, True], ids=["single", "stack"])
def test_a_landed_ray_run_has_the_files_of_a_local_run(tmp_path, stacked):
    import torch

    from flowbench.sweep.artifacts import ARTIFACTS, land_run
    from flowbench.sweep.worker import DEFAULT_RUN_FN, execute_run, execute_stack, ray_execute, ray_execute_stack

    sweep = parse_sweep(
        {
            "datasets": ["digits"],
            "models": ["made"],
            "grid": {"seed": [0, 1], "max-epochs": 2, "hidden": 16, "device": "cpu"},
        }
    )
    runs = sweep.runs if stacked else sweep.runs[:1]
    options = [r.options(tmp_path) for r in runs]
    threads = torch.get_num_threads()
    local = execute_stack(options, None, progress=False) if stacked else execute_run(options[0], progress=False)
    assert local["ok"]
    expected = [take_files(tmp_path, r) for r in runs]
    # The body of a Ray task, here in this process: train in a scratch folder, pack; then land as the driver does.
    if stacked:
        outcome = ray_execute_stack(options, threads)
        records, packed = outcome["records"], outcome[ARTIFACTS]
    else:
        outcome = ray_execute(options[0], DEFAULT_RUN_FN, threads)
        records, packed = [outcome["record"]], [outcome[ARTIFACTS]]
    assert outcome["ok"] and outcome["node"] and "epoch    2 " in outcome["log"]  # the epoch lines travel
    for run, record, files in zip(runs, records, packed):
        assert land_run(run, record, files, str(tmp_path)) == run.record_path(tmp_path)
    for run, want in zip(runs, expected):
        got = take_files(tmp_path, run)
        assert got["state"] == want["state"] and got["points"] == want["points"]  # byte for byte
        assert got["record"] == want["record"] and got["record_keys"] == want["record_keys"]
    assert not list((tmp_path / "runs").rglob("*.tmp"))  # atomic writes leave no temporaries


def test_a_worker_log_keeps_every_attempt_of_its_run(tmp_path):
    # a resumed or retried run's log was opened anew: the lines of its earlier attempts (epochs, a traceback) went
    from flowbench.sweep.worker import execute_run

    def attempt(options, progress):
        print(f"epoch line of seed {options.seed}, progress {progress}")
        raise RuntimeError("out of memory")

    options = parse_sweep({"datasets": ["digits"], "models": ["made"]}).runs[0].options(tmp_path)
    log = tmp_path / "logs" / "seed0.log"
    for _ in range(2):
        assert not execute_run(options, attempt, str(log), progress=True)["ok"]
    text = log.read_text()
    assert text.count("epoch line of seed 0, progress True") == 2 and text.count("RuntimeError: out of memory") == 2
    assert len(re.findall(r"^# \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: started in process \d+$", text, re.M)) == 2
    # a Ray task's log, which the driver writes from what the node sends back, keeps the earlier attempts too
    from types import SimpleNamespace

    from flowbench.sweep.ray_backend import RayExecutor

    state = SimpleNamespace(run=parse_sweep({"datasets": ["digits"], "models": ["made"]}).runs[0])
    for attempt in ("first", "second"):
        RayExecutor.save_log(state, {"log": f"{attempt} attempt's epochs\n", "node": "n1"}, str(tmp_path / "r"))
    assert state.run.log_path(tmp_path / "r").read_text() == (
        "# ray node: n1\nfirst attempt's epochs\n# ray node: n1\nsecond attempt's epochs\n"
    )


def test_a_stack_adds_its_lines_to_every_run_s_log_and_keeps_their_earlier_ones(tmp_path):
    # the stack's log was copied over the other runs' logs: a run that had trained alone, or in another stack,
    # lost its earlier lines, and a stopped stack left the other logs without its lines
    from flowbench.sweep.worker import execute_stack

    def stack(options, progress):
        print(f"epochs of seeds {[o.seed for o in options]}")
        return [None] * len(options)

    def stopped(options, progress):
        print("stopped in epoch 3")
        raise KeyboardInterrupt

    runs = parse_sweep({"datasets": ["digits"], "models": ["made"], "grid": {"seed": [0, 1, 2]}}).runs
    options = [r.options(tmp_path) for r in runs]
    logs = [r.log_path(tmp_path) for r in runs]
    logs[1].parent.mkdir(parents=True)
    logs[1].write_text("seed 1 trained alone before\n")
    assert execute_stack(options, [str(p) for p in logs], stack_fn=stack)["ok"]
    with pytest.raises(KeyboardInterrupt):
        execute_stack(options[1:], [str(p) for p in logs[1:]], stack_fn=stopped)
    texts = [p.read_text() for p in logs]
    assert texts[1].startswith("seed 1 trained alone before\n# ")
    assert [t.count("epochs of seeds [0, 1, 2]") for t in texts] == [1, 1, 1]
    assert [t.count("stopped in epoch 3") for t in texts] == [0, 1, 1]
    assert texts[0].count("one log for all") == 1 and texts[1].count("one log for all") == 2
    assert texts[1].endswith(texts[2]) and texts[2].startswith("# ")  # seed 2's log: the two stacks' lines


def test_the_manual_shows_the_shipped_example_sweep_verbatim(repo_root):
    shipped = (repo_root / "configs" / "sweeps" / "tiny-digits.toml").read_text()
    page = (repo_root / "docs" / "manual" / "sweeps.md").read_text()
    assert f"```toml\n{shipped}```" in page
