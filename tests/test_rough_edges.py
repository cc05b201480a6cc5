"""The rough edges a new user hit (issue 23, item 5): each ends in a clear exit-2 message or correct behaviour.

Tests run as root, who may write anywhere, so an unwritable folder is made by a regular file in the way; the
permission case itself is checked only where the tests do not run as root.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_flows import tiny_flow

import flowbench.models as models
import flowbench.utils as utils
from flowbench.cli import main
from flowbench.data.base import Dataset
from flowbench.errors import ConfigError, DiskFullError, UsageError
from flowbench.models.spec import ModelSpec
from flowbench.results import RunRecord, checkpoint_path, lock_path, read_record, record_path, write_record
from flowbench.sweep import parse_sweep, run_sweep
from flowbench.training import run_experiment

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(autouse=True)
def _restore_threads():
    """`flowbench run` sets torch's thread count (process-wide); put it back for the other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny(monkeypatch):
    spec = ModelSpec(name="tiny", build=tiny_flow, hparams={}, label="TINY", paper="test", lr=1e-2)
    monkeypatch.setitem(models.MODELS, "tiny", spec)


def toy_data(n_train=300, n_val=100, n_test=100, seed=1) -> Dataset:
    x = np.random.RandomState(seed).normal(size=(n_train + n_val + n_test, 3)).astype(np.float32) * 2 + 1
    return Dataset("toy", x[:n_train], x[n_train : n_train + n_val], x[n_train + n_val :])


def opts(tmp_path, **kw) -> dict:
    return {
        "out": str(tmp_path),
        "model": "tiny",
        "batch_size": 100,
        "device": "cpu",
        "patience": 50,
        "checkpoint_every_s": 0,
        **kw,
    }


def write_example(results: Path, **kw) -> RunRecord:
    rec = RunRecord.example(**{"dataset": "digits", "config": {}, **kw})
    write_record(record_path(results, rec.dataset, rec.model, rec.seed, rec.tag), rec)
    return rec


def a_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("in the way\n")
    return path


def clean_exit_2(capsys, argv: list[str], *phrases: str) -> str:
    """``flowbench argv`` ends with status 2 and one message naming ``phrases``, without a traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    return err


# -- an unwritable results folder ------------------------------------------------------------------------------
def test_plot_and_report_into_an_unwritable_folder_say_so_before_drawing(tmp_path, capsys, monkeypatch):
    from flowbench.plots import curves, report

    results = tmp_path / "results"
    write_example(results)
    drawn: list = []
    monkeypatch.setattr(curves, "plot_curves", lambda *a, **k: drawn.append(1))  # nothing may be drawn
    monkeypatch.setattr(report, "report_markdown", lambda *a, **k: drawn.append(1))
    a_file(results / "figures")  # where `plot curves` writes by default
    clean_exit_2(
        capsys,
        ["plot", "curves", "--results", str(results)],
        "cannot write the figure curves.png",
        "figures is a file, not a folder",
        "--out",
    )
    blocker = a_file(tmp_path / "afile")
    clean_exit_2(
        capsys,
        ["report", "--results", str(results), "--out", str(blocker / "r.html")],
        "cannot write the report r.html",
        "afile is a file",
    )
    a_file(results / "r_files")  # a Markdown report's figures folder
    clean_exit_2(
        capsys,
        ["report", "--results", str(results), "--out", str(results / "r.md"), "--no-samples"],
        "cannot write the report's figures",
        "r_files is a file",
    )
    assert not drawn


def test_figures_are_png_whatever_the_name(tmp_path, capsys):
    results = tmp_path / "results"
    write_example(results)
    clean_exit_2(
        capsys,
        ["plot", "curves", "--results", str(results), "--out", str(tmp_path / "x.txt")],
        "--out",
        "x.txt",
        "written as .png, not .txt",
    )
    assert not (tmp_path / "x.txt").exists()
    clean_exit_2(
        capsys,
        [
            "plot",
            "samples",
            "--results",
            str(results),
            "--dataset",
            "digits",
            "--model",
            "maf",
            "--out",
            str(tmp_path / "s"),
        ],
        "written as .png, not a name without a suffix",
    )


@pytest.mark.skipif(ROOT, reason="root writes into a read-only folder: only a file in the way (above) can show it")
def test_plot_curves_into_a_read_only_folder(tmp_path, capsys):
    results = tmp_path / "results"
    write_example(results)
    (results / "figures").mkdir()
    (results / "figures").chmod(0o555)
    try:
        clean_exit_2(capsys, ["plot", "curves", "--results", str(results)], "is not writable")
    finally:
        (results / "figures").chmod(0o755)


def test_sweep_into_an_unwritable_folder_stops_before_any_run(tmp_path):
    sweep = parse_sweep({"datasets": ["digits"], "models": ["made"], "grid": {"seed": [0, 1]}})
    calls: list = []
    blocker = a_file(tmp_path / "afile")
    with pytest.raises(ConfigError, match=r"cannot write the runs' records to .*afile is a file.*--out DIR"):
        run_sweep(sweep, blocker / "results", run_fn=calls.append, stream=None)
    out = tmp_path / "results"
    a_file(out / "sweeps")  # the records could be written, the report not: found out before, not after, the runs
    with pytest.raises(ConfigError, match=r"cannot write the sweep report to .*sweeps is a file"):
        run_sweep(sweep, out, run_fn=calls.append, stream=None)
    assert not calls


# -- --seeds ---------------------------------------------------------------------------------------------------
def test_seeds_bounded_conflicting_and_negative(tmp_path, capsys, monkeypatch):
    from flowbench.config import MAX_SEEDS, parse_seeds, resolve_options
    from flowbench.training import stacked

    monkeypatch.setattr(stacked, "run_stacked", lambda *a, **k: pytest.fail("no run may start"))
    out = ["--out", str(tmp_path), "--quiet"]
    clean_exit_2(
        capsys,
        ["run", "--seeds", "0-1000", *out],
        "names 1,001 seeds",
        f"at most {MAX_SEEDS}",
        "in one process",
        "sweep",
    )
    with pytest.raises(ConfigError, match="names 1,000,000,000,001 seeds"):  # refused before a list is built
        parse_seeds("0-1000000000000")
    assert len(parse_seeds(f"0-{MAX_SEEDS - 1}")) == MAX_SEEDS
    clean_exit_2(capsys, ["run", "--seeds", "0-1", "--seed", "3", *out], "--seed 3 and --seeds 0-1 are both given")
    clean_exit_2(capsys, ["run", "--seeds", "-1-2", *out], "--seeds '-1-2': seeds are non-negative integers")
    clean_exit_2(capsys, ["run", "--seeds=-1-2", *out], "seeds are non-negative integers")
    cfg = tmp_path / "c.toml"
    cfg.write_text('seeds = "0-2"\n')
    with pytest.raises(ConfigError, match=r"--seed 3 and --seeds 0-2 \(from config file .*c.toml\)"):
        resolve_options({"config": str(cfg), "seed": 3})
    assert resolve_options({"config": str(cfg)}).seeds == "0-2"


def stack_opts(out, **kw) -> dict:
    return {
        "out": str(out),
        "model": "maf",
        "layers": 1,
        "hidden": 8,
        "batch_norm": False,
        "batch_size": 100,
        "patience": 50,
        "max_epochs": 3,
        "lr": 1e-2,
        "device": "cpu",
        "checkpoint_every_s": 0,
        **kw,
    }


class Kill(Exception):
    pass


def test_a_stack_resumed_in_part_names_the_seeds_left(tmp_path):
    from flowbench.training.stacked import run_stacked

    data = toy_data()

    def kill(info):
        if info.epoch == 2:
            raise Kill

    with pytest.raises(Kill):
        run_stacked([stack_opts(tmp_path, seed=s) for s in range(4)], data, progress=False, callbacks=[kill])
    run_experiment(stack_opts(tmp_path, seed=1, resume=True), data, progress=False)  # seed 1 resumed alone
    with pytest.raises(UsageError) as info:
        run_stacked([stack_opts(tmp_path, seed=s, resume=True) for s in range(4)], data, progress=False)
    msg = str(info.value)
    assert "seed 1 has a record" in msg and "run the same command with --seeds 0,2,3 --resume" in msg
    assert "pass --force" not in msg
    # The command given without --resume: the seeds left have checkpoints, so the hint needs --resume (it
    # said "--seeds 0,2,3", which the checkpoints then refused).
    with pytest.raises(UsageError, match=r"run the same command with --seeds 0,2,3 --resume \("):
        run_stacked([stack_opts(tmp_path, seed=s) for s in range(4)], data, progress=False)
    ckpt3 = checkpoint_path(tmp_path, "toy", "maf", 3)
    saved = ckpt3.read_bytes()
    ckpt3.unlink()  # seed 3 has none: it starts, the others go on
    with pytest.raises(UsageError, match="with --seeds 0,2 --resume, and --seeds 3 without --resume"):
        run_stacked([stack_opts(tmp_path, seed=s) for s in range(4)], data, progress=False)
    ckpt3.write_bytes(saved)
    recs = run_stacked([stack_opts(tmp_path, seed=s, resume=True) for s in (0, 2, 3)], data, progress=False)
    assert all(any("resumed from the checkpoint after epoch" in n for n in r.notes) for r in recs)


def test_a_stack_with_checkpoints_for_some_seeds_only(tmp_path):
    from flowbench.training.stacked import run_stacked

    data = toy_data()
    with pytest.raises(Kill):
        run_experiment(
            stack_opts(tmp_path, seed=0), data, progress=False, callbacks=[lambda i: (_ for _ in ()).throw(Kill())]
        )
    with pytest.raises(
        UsageError,
        match=r"seed 1 has no checkpoint .* seed 0 has one: run --seeds 0 --resume, "
        r"and --seeds 1 without --resume",
    ):
        run_stacked([stack_opts(tmp_path, seed=s, resume=True) for s in (0, 1)], data, progress=False)


def test_an_interrupted_stack_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from flowbench.training import stacked

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stacked, "run_stacked", interrupted)
    assert main(["run", "--seeds", "0-3", "--out", str(tmp_path), "--quiet"]) == 130
    err = capsys.readouterr().err
    # interrupted before any checkpoint: nothing to resume (it used to say --resume, which then failed)
    assert "before the seeds' first checkpoints: run the same command again to start afresh" in err
    assert "--resume" not in err and "Traceback" not in err


# -- a full disk, a foreign checkpoint ---------------------------------------------------------------------------
def test_a_disk_full_to_the_last_byte_stops_at_the_lock_with_a_message(tmp_path, tiny, monkeypatch, capsys):
    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.os, "pwrite", no_space)
    with pytest.raises(
        DiskFullError,
        match=r"no space left on the device to write the lock file .*seed0\.lock "
        r"\([\d,]+ bytes are free\); nothing was trained",
    ):
        run_experiment(opts(tmp_path, max_epochs=2), toy_data(), progress=False)
    assert not lock_path(tmp_path, "toy", "tiny", 0).exists()
    clean_exit_2(
        capsys,
        ["run", "--model", "gaussian", "--out", str(tmp_path), "--quiet"],
        "no space left on the device to write the lock file",
    )


def test_a_foreign_checkpoint_is_never_advised_to_be_unpickled(tmp_path, tiny):
    import argparse

    with pytest.raises(Kill):
        run_experiment(
            opts(tmp_path, max_epochs=3),
            toy_data(),
            progress=False,
            callbacks=[lambda i: (_ for _ in ()).throw(Kill())],
        )
    ckpt = checkpoint_path(tmp_path, "toy", "tiny", 0)
    torch.save({"epoch": 1, "payload": argparse.Namespace(x=1)}, ckpt)  # a pickled object: weights_only refuses it
    with pytest.raises(ConfigError) as info:
        run_experiment(opts(tmp_path, max_epochs=3, resume=True), toy_data(), progress=False)
    msg = str(info.value)
    assert "truncated or not a flowbench file" in msg and "was not unpickled" in msg
    assert "weights_only" not in msg and "can still be loaded" not in msg and "\x1b" not in msg


# -- a finite but divergent setting ------------------------------------------------------------------------------
def test_a_divergent_lr_exits_2_and_a_rerun_replaces_its_record(tmp_path, capsys):
    pytest.importorskip("sklearn")
    argv = [
        "run",
        "--model",
        "made",
        "--hidden",
        "8",
        "--max-epochs",
        "1",
        "--out",
        str(tmp_path),
        "--quiet",
        "--device",
        "cpu",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's, on the non-finite test values
        clean_exit_2(
            capsys,
            [*argv, "--lr", "1e10"],
            "training did not stay finite: non-finite training loss",
            "lower --lr",
            "this run's --lr was 1e+10 (made's default: 0.001)",
            "replaces it without --force",
        )
    path = record_path(tmp_path, "digits", "made", 0)
    assert read_record(path).status == "nonfinite"
    assert main(argv) == 0  # the same command at the default lr: no --force needed over a non-finite record
    rec = read_record(path)
    assert rec.status == "ok" and any("replaced the non-finite record" in n for n in rec.notes)
    assert main(argv) == 2  # an ok record still needs --force
    assert "already exists" in capsys.readouterr().err


# -- step-budget runs in the curves and the report; a stack's wall time --------------------------------------------
def test_step_budget_runs_are_lines_against_steps_with_their_own_status(tmp_path, tiny):
    from flowbench import status as S
    from flowbench.plots import _records as R
    from flowbench.plots._mpl import pyplot
    from flowbench.plots.curves import plot_curves

    data = toy_data()  # 3 steps an epoch: evaluations every 7 steps fall in epochs 3, 5, 7 (gaps between)
    recs = [run_experiment(opts(tmp_path, seed=s, max_steps=21, eval_every=7), data, progress=False) for s in (0, 1)]
    assert [h["epoch"] for h in recs[0].history] == [3, 5, 7]
    status = S.run_status(recs[0])
    assert status.kind == "budget" and status.text.startswith("step budget spent: --max-steps 21 (best at step ")
    fig = plot_curves(recs)
    val, loss = fig.axes[:2]
    (line,) = [a for a in val.get_children() if a.get_gid() == "val-mean"]
    np.testing.assert_array_equal(line.get_xdata(), [7, 14, 21])
    assert np.isfinite(line.get_ydata()).all()  # a line through every evaluation, not points between gaps
    np.testing.assert_allclose(line.get_ydata(), np.mean([[h["val_ll"] for h in r.history] for r in recs], 0))
    assert val.get_xlabel() == loss.get_xlabel() == "optimiser step"
    stars = [a for a in val.get_children() if a.get_gid() == "best-epoch"][0]
    assert sorted(stars.get_xdata()) == sorted(R.best_step(r) for r in recs)
    pyplot().close(fig)


def test_the_report_counts_a_stacks_wall_time_once(tmp_path):
    from flowbench.plots.report import report_markdown, total_wall_time

    results = tmp_path / "results"
    stack = {"seeds": [0, 1, 2], "size": 3, "id": "abc"}
    recs = [write_example(results, seed=s, wall_time_s=100.0 + s, stack=stack) for s in (0, 1, 2)]
    recs.append(write_example(results, seed=3, wall_time_s=50.0))
    assert total_wall_time(recs) == 102.0 + 50.0
    text, _ = report_markdown(results, samples=False)
    assert "Total wall time of the recorded runs: 2 min 32 s" in text and "1 min 40 s (stack of 3)" in text
    old = [RunRecord.example(seed=s, wall_time_s=60.0, stack={"seeds": [0, 1], "size": 2}) for s in (0, 1)]
    assert total_wall_time(old) == 60.0  # written before stacks had an id: grouped by dataset, model, tag, seeds


# -- plot samples ----------------------------------------------------------------------------------------------
def test_plot_samples_names_the_missing_model_file_and_refuses_what_does_not_apply(tmp_path, capsys):
    pytest.importorskip("sklearn")
    results = tmp_path / "results"
    write_example(results, hparams={"layers": 1, "hidden": 4}, model_state="seed0.model.pt")
    argv = [
        "plot",
        "samples",
        "--results",
        str(results),
        "--dataset",
        "digits",
        "--model",
        "maf",
        "--data-root",
        str(tmp_path / "data"),
    ]
    err = clean_exit_2(capsys, argv, "the trained model's file", "seed0.model.pt is missing", "--seed")
    assert ".ckpt" not in err
    # the record's model file present (never read: each refusal below comes before the model is rebuilt)
    (results / "runs" / "digits" / "maf" / "seed0.model.pt").write_bytes(b"")
    clean_exit_2(capsys, [*argv, "-n", "5000"], "-n 5000", "unreadable", "-n 256 or fewer")
    clean_exit_2(capsys, [*argv, "--dims", "0,1"], "--dims applies to tabular data", "digits is an image dataset")
    toy = write_example(results, dataset="toy2d-moons", model="relgrad", model_state="seed0.model.pt")
    (record_path(results, toy.dataset, toy.model, 0).with_suffix(".model.pt")).write_bytes(b"")
    clean_exit_2(
        capsys,
        [
            "plot",
            "samples",
            "--results",
            str(results),
            "--dataset",
            "toy2d-moons",
            "--model",
            "relgrad",
            "-n",
            "10",
            "--dims",
            "0,1",
        ],
        "-n and --dims do not apply to a 2-D toy record",
    )


# -- progress and labels ---------------------------------------------------------------------------------------
def test_bench_gradients_says_what_it_times_before_timing(monkeypatch):
    import flowbench.bench.gradients as G

    lines: list[str] = []
    seen: list[list[str]] = []  # what had been said by each timed call

    def timed(fn, device):
        seen.append(list(lines))
        return 2.0  # a slow method: seconds a call

    monkeypatch.setattr(G, "_timed", timed)
    G.run_gradients([4, 8], methods=("mlp",), repeats=1, warmup=1, budget_s=1.0, log=lines.append)
    assert seen[0] == ["D=     4: timing mlp ..."]  # said before the first call, not after the row
    at_8 = seen[len(seen) // 2]  # the first call at D=8
    assert at_8[-1].startswith("D=     8       mlp: about 8 s a call (from D=4): one warm-up call")


def test_a_stack_of_configurations_names_each_run_in_its_epoch_lines(tmp_path, capsys):
    from flowbench.training.stacked import run_stacked

    runs = [stack_opts(tmp_path, seed=0, max_epochs=1, lr=lr, tag=f"lr={lr:g}") for lr in (1e-2, 3e-3)]
    run_stacked(runs, toy_data(), progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if " epoch    1 " in ln]
    assert [ln.split(" epoch")[0] for ln in lines] == ["[lr=0.01] seed 0", "[lr=0.003] seed 0"]
    run_stacked([stack_opts(tmp_path / "b", seed=s, max_epochs=1) for s in (0, 1)], toy_data(), progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if " epoch    1 " in ln]
    assert [ln.split(" epoch")[0] for ln in lines] == ["seed 0", "seed 1"]  # one configuration: the seed says it


@pytest.mark.parametrize("command", ["table", "report", "plot curves"])
def test_a_selection_of_datasets_reads_the_same_in_every_command(command):
    # `table --datasets power,mnist` copied to `report` was "unrecognized arguments", and `report --dataset
    # power,mnist` looked for a dataset named "power,mnist": each spelling now means the same list everywhere.
    from flowbench.cli import build_parser

    parser = build_parser(command.split()[0])
    dest = "datasets" if command == "table" else "dataset"
    spellings = [
        ["--datasets", "power,mnist"],
        ["--dataset", "power", "mnist"],
        ["--dataset", "power", "--datasets", "mnist"],
        ["--datasets", "power,", "mnist"],
    ]
    for flags in spellings:
        args = parser.parse_args([*command.split(), *flags])
        assert getattr(args, dest) == ["power", "mnist"], flags
    if command != "table":
        args = parser.parse_args([*command.split(), "--models", "maf,made", "--model", "relgrad"])
        assert args.model == ["maf", "made", "relgrad"]


def test_a_torch_built_for_numpy_1_beside_numpy_2_is_named_before_any_work(monkeypatch, capsys):
    # torch 2.1.2 with numpy 2 (what `pip install -e .` after an old torch gives) trained a whole run, then failed
    # at its first evaluation with "RuntimeError: Numpy is not available", a traceback
    import importlib.metadata as md

    from flowbench import cli

    real = md.version
    versions = {"torch": "2.1.2+cu121", "numpy": "2.4.6"}
    monkeypatch.setattr(md, "version", lambda name: versions.get(name) or real(name))
    assert cli.main(["run", "--max-epochs", "1"]) == 2
    assert capsys.readouterr().err == (
        "flowbench run: error: torch 2.1.2+cu121 was built for numpy 1 and cannot work with the numpy 2.4.6 "
        'installed here: install numpy 1 (pip install "numpy<2") or torch 2.3 or newer\n'
    )
    for torch_v, numpy_v in [("2.3.0", "2.4.6"), ("2.1.2", "1.26.4"), ("2.13.0+cpu", "2.0.0"), ("2.2", "1.26")]:
        versions.update(torch=torch_v, numpy=numpy_v)
        assert cli.installed_problem() is None, (torch_v, numpy_v)
    versions.update(torch="2.2.2", numpy="2.0.0rc1")
    assert "torch 2.2.2 was built for numpy 1" in cli.installed_problem()
