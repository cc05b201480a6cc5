"""Bad command lines (issue 12): every row must exit with status 2 and a message that names the problem,
never a traceback. In-process through ``flowbench.cli.main``; no row trains a model.

``{t}`` in a row's arguments is the test's temporary folder; a row's setup prepares files there (and may hold
a lock or make the disk "full" for the duration of the call).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

import pytest
import torch

import flowbench.utils as utils
from flowbench.cli import main
from flowbench.results import RunRecord
from flowbench.utils import exclusive_lock

CKPT_KEYS = ("epoch", "finished", "model", "optimizer", "early_stopping", "rng", "result")


# -- setups: (tmp folder, monkeypatch) -> optional context manager held during the call ----------------------
def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _record(t: Path, model: str = "gaussian", **changes) -> Path:
    path = t / "res" / "runs" / "digits" / model / "seed0.json"
    data = RunRecord.example(dataset="digits", model=model).to_json()
    data.update(changes)
    _write(path, json.dumps(data))
    return path


def _ckpt(t, model="made"):
    return t / "res" / "runs" / "digits" / model / "seed0.ckpt"


def files(**contents):
    """Setup writing ``{t}/<name>`` files (``__`` in a name becomes ``/``)."""

    def setup(t, mp):
        for name, data in contents.items():
            _write(t / name.replace("__", "/"), data)

    return setup


def sweep_file(grid: str):
    return files(**{"s.toml": f'datasets = ["digits"]\nmodels = ["made"]\n[grid]\n{grid}\n'})


def interrupted_run(t, mp):  # a checkpoint after epoch 3 of `run --model made` (what a kill leaves)
    _ckpt(t).parent.mkdir(parents=True)
    torch.save({**dict.fromkeys(CKPT_KEYS, 0), "epoch": 3}, _ckpt(t))


def truncated_ckpt(t, mp):
    interrupted_run(t, mp)
    data = _ckpt(t).read_bytes()
    _ckpt(t).write_bytes(data[: len(data) // 2])


def foreign_ckpt(t, mp):
    _ckpt(t).parent.mkdir(parents=True)
    torch.save({"weights": torch.zeros(3)}, _ckpt(t))


def finished_run(t, mp):  # the record was written and only the model state kept
    _write(_ckpt(t).with_suffix(".model.pt"), b"")


def existing_record(t, mp):
    _record(t)


def held_lock(t, mp):
    lock = t / "res" / "runs" / "digits" / "gaussian" / "seed0.lock"
    lock.parent.mkdir(parents=True)
    return exclusive_lock(lock)


def full_disk(t, mp):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(utils.os, "fsync", fsync)


def bad_number_record(t, mp):
    _record(t, test_ll="high")


def non_utf8_record(t, mp):
    _write(t / "res" / "runs" / "digits" / "maf" / "seed0.json", b'{"dataset": "\xff"}')


def a_file(t, mp):
    _write(t / "afile", "x")


def a_folder(t, mp):
    (t / "adir").mkdir()
    _record(t)


RUN = ["run", "--out", "{t}/res", "--quiet"]
ROWS = [
    # run: option values (declarations)
    ("lr-nan", [*RUN, "--lr", "nan"], None, ["--lr", "finite"]),
    ("lr-inf", [*RUN, "--lr", "inf"], None, ["--lr", "finite"]),
    ("weight-decay-nan", [*RUN, "--weight-decay", "nan"], None, ["--weight-decay", "finite"]),
    ("seed-negative", [*RUN, "--seed", "-1"], None, ["--seed", "≥ 0", "-1"]),
    ("threads-0", [*RUN, "--threads", "0"], None, ["--threads", "positive"]),
    ("unknown-model", [*RUN, "--model", "nosuch"], None, ["nosuch"]),
    ("match-params-negative", [*RUN, "--match-params", "-5"], None, ["--match-params", "positive whole"]),
    ("match-params-fraction", [*RUN, "--match-params", "1.5"], None, ["--match-params", "positive whole"]),
    ("match-params-huge", [*RUN, "--match-params", "1e9"], None, ["--match-params", "100,000,000"]),
    (
        "match-params-gaussian",
        [*RUN, "--model", "gaussian", "--match-params", "5000"],
        None,
        ["--match-params", "gaussian", "no size knob"],
    ),
    # run: config files
    ("config-missing", [*RUN, "--config", "{t}/nope.toml"], None, ["nope.toml", "does not exist"]),
    ("config-not-utf8", [*RUN, "--config", "{t}/c.toml"], files(**{"c.toml": b'lr = "\xff"\n'}), ["c.toml", "UTF-8"]),
    (
        "config-nested",
        [*RUN, "--config", "{t}/c.toml"],
        files(**{"c.toml": "[train]\nlr = 1e-3\n"}),
        ["c.toml", "flat keys"],
    ),
    (
        "config-names-config",
        [*RUN, "--config", "{t}/c.toml"],
        files(**{"c.toml": 'config = "x.toml"\n'}),
        ["c.toml", "cannot name another"],
    ),
    (
        "config-unknown-key",
        [*RUN, "--config", "{t}/c.toml"],
        files(**{"c.toml": "learning-rate = 1\n"}),
        ["learning-rate", "valid keys"],
    ),
    # run: what is on disk (items 2, 3, 4)
    ("record-exists", [*RUN, "--model", "gaussian"], existing_record, ["already exists", "--force"]),
    (
        "forgotten-resume",
        [*RUN, "--model", "made"],
        interrupted_run,
        ["checkpoint after epoch 3", "seed0.ckpt", "--resume", "--force"],
    ),
    ("resume-no-checkpoint", [*RUN, "--model", "made", "--resume"], None, ["--resume", "no checkpoint"]),
    (
        "resume-finished-run",
        [*RUN, "--model", "made", "--resume"],
        finished_run,
        ["kept only its model state", "--keep-checkpoint"],
    ),
    (
        "resume-truncated-checkpoint",
        [*RUN, "--model", "made", "--resume"],
        truncated_ckpt,
        ["seed0.ckpt", "truncated", "--force"],
    ),
    (
        "resume-foreign-checkpoint",
        [*RUN, "--model", "made", "--resume"],
        foreign_ckpt,
        ["seed0.ckpt", "not a flowbench training checkpoint"],
    ),
    ("run-locked", [*RUN, "--model", "gaussian"], held_lock, ["already training this run", "seed0.lock"]),
    ("out-is-a-file", ["run", "--out", "{t}/afile", "--quiet"], a_file, ["--out", "afile is a file"]),
    ("out-under-a-file", ["run", "--out", "{t}/afile/res", "--quiet"], a_file, ["cannot create", "afile is a file"]),
    ("disk-full", [*RUN, "--model", "gaussian"], full_disk, ["no space left", "seed0", "bytes", "free some space"]),
    (
        "data-root-is-a-file",
        [*RUN, "--dataset", "power", "--data-root", "{t}/afile"],
        a_file,
        ["data root", "is a file"],
    ),
    (
        "dataset-not-downloaded",
        [*RUN, "--dataset", "power", "--data-root", "{t}"],
        None,
        ["power", "flowbench download --dataset power"],
    ),
    # table
    ("table-no-results-folder", ["table", "--results", "{t}/res"], None, ["--results", "no such folder"]),
    ("report-no-results-folder", ["report", "--results", "{t}/res"], None, ["--results", "no such folder"]),
    ("table-no-records", ["table", "--results", "{t}"], None, ["no run records"]),
    ("table-results-is-a-file", ["table", "--results", "{t}/afile"], a_file, ["--results", "is a file"]),
    (
        "table-record-not-a-number",
        ["table", "--results", "{t}/res"],
        bad_number_record,
        ["seed0.json", "test_ll", "not a number"],
    ),
    ("table-record-not-utf8", ["table", "--results", "{t}/res"], non_utf8_record, ["seed0.json", "UTF-8"]),
    (
        "table-out-is-a-directory",
        ["table", "--results", "{t}/res", "--out", "{t}/adir"],
        a_folder,
        ["--out", "is a directory"],
    ),
    (
        "table-out-under-a-file",
        ["table", "--results", "{t}/res", "--out", "{t}/afile/t.md"],
        a_file,
        ["--out", "afile is a file"],
    ),
    # sweep (item 5)
    ("sweep-missing-file", ["sweep", "{t}/nope.toml", "--dry-run"], None, ["nope.toml"]),
    (
        "sweep-seed-negative",
        ["sweep", "{t}/s.toml", "--dry-run", "--out", "{t}/res"],
        sweep_file("seed = [-1]"),
        ["seed", "≥ 0"],
    ),
    (
        "sweep-match-params-negative",
        ["sweep", "{t}/s.toml", "--dry-run", "--out", "{t}/res"],
        sweep_file("match-params = [-5]"),
        ["match-params", "positive whole"],
    ),
    (
        "sweep-bad-value",
        ["sweep", "{t}/s.toml", "--dry-run", "--out", "{t}/res"],
        sweep_file('activation = ["gelu"]'),
        ["gelu"],
    ),
    (
        "sweep-unknown-key",
        ["sweep", "{t}/s.toml", "--dry-run", "--out", "{t}/res"],
        sweep_file("lrate = [1]"),
        ["lrate"],
    ),
    (
        "sweep-cpus-per-run-0",
        ["sweep", "{t}/s.toml", "--cpus-per-run", "0", "--out", "{t}/res"],
        sweep_file("hidden = [8]"),
        ["--cpus-per-run", "positive"],
    ),
    (
        "sweep-workers-0",
        ["sweep", "{t}/s.toml", "--workers", "0", "--out", "{t}/res"],
        sweep_file("hidden = [8]"),
        ["--workers"],
    ),
    # download / datasets (done by others; kept here so they stay done)
    (
        "download-unknown-dataset",
        ["download", "--dataset", "nosuch", "--root", "{t}/dl"],
        None,
        ["unknown dataset 'nosuch'"],
    ),
    ("download-root-is-a-file", ["download", "--root", "{t}/afile"], a_file, ["data root", "is a file"]),
    ("download-bad-sha256", ["download", "--sha256", "zz", "--root", "{t}/dl"], None, ["--sha256", "64 hex"]),
    (
        "download-missing-archive",
        ["download", "--from-archive", "{t}/nope.tar.gz", "--root", "{t}/dl"],
        None,
        ["--from-archive", "no such file"],
    ),
    (
        "download-url-and-archive",
        ["download", "--from-archive", "{t}/a.tgz", "--url", "http://x", "--root", "{t}/dl"],
        None,
        ["--url and --from-archive exclude each other"],
    ),
    ("datasets-root-is-a-file", ["datasets", "--root", "{t}/afile"], a_file, ["data root", "is a file"]),
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("argv, setup, expected", [pytest.param(*row[1:], id=row[0]) for row in ROWS])
def test_bad_command_line_exits_2_with_a_message(tmp_path, monkeypatch, capsys, argv, setup, expected):
    with contextlib.ExitStack() as stack:
        held = setup(tmp_path, monkeypatch) if setup else None
        if held is not None:
            stack.enter_context(held)
        code = main([a.replace("{t}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith(f"flowbench {argv[0]}: error: "), err
    for text in expected:
        assert text in err, f"{text!r} not in: {err}"


def test_bad_input_rows_have_unique_names():
    names = [row[0] for row in ROWS]
    assert len(names) == len(set(names))


def test_warnings_not_errors(tmp_path, capsys, recwarn):
    """What is only worth a warning stays one: quiet/threads as config keys, a config's dataset overridden."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "power"\nquiet = true\nthreads = 1\nmax-epochs = 1\n')
    code = main(
        ["run", "--config", str(cfg), "--dataset", "digits", "--model", "gaussian", "--out", str(tmp_path / "res")]
    )
    assert code == 0, capsys.readouterr().err
    assert any("--dataset digits wins" in str(w.message) for w in recwarn)
    assert os.path.isfile(tmp_path / "res" / "runs" / "digits" / "gaussian" / "seed0.json")
