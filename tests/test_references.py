"""A model or dataset that lives outside flowbench, named by reference (``file.py:ATTR``, ``module:ATTR``):
through ``run`` (also ``--seeds``, ``--resume``, ``--match-params``), config files, sweeps on the process and
Ray executors, ``table``, ``report``, ``plot samples``, ``bench train``, ``sanity toy2d``; and every bad
reference ends in exit 2 with a message that says what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flowbench.cli import main
from flowbench.results import iter_records

REPO = Path(__file__).resolve().parents[1]

FLOW = """
import torch
from torch import nn
from flowbench.models import CompositeTransform, Flow, HParam, ModelSpec, StandardNormal, Transform


class Affine(Transform):
    def __init__(self, dim):
        super().__init__()
        self.m = nn.Parameter(0.1 * torch.randn(dim))
        self.s = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return (x - self.m) * torch.exp(-self.s), (-self.s).sum().expand(x.shape[0])

    def inverse(self, z):
        return z * torch.exp(self.s) + self.m, self.s.sum().expand(z.shape[0])


def build(dim, layers=1, width=4):
    # width only adds parameters (a knob for --match-params)
    flow = Flow(CompositeTransform([Affine(dim) for _ in range(layers)]), StandardNormal(dim), dim)
    flow.pad = nn.Parameter(torch.zeros(width))
    return flow


SPEC = ModelSpec(name="{name}", build=build, label="{label} ({{layers}})", paper="a user's flow", lr=1e-2,
                 hparams={{"layers": HParam(1, "affine layers", low=1), "width": HParam(4, "padding", low=1)}},
                 match_knob="width")


def make_spec():
    return SPEC
"""

DATA = """
import numpy as np
from flowbench.data import DatasetSpec, maf_split


def prepare(root):
    x = np.random.RandomState(3).randn(400, 2) @ np.array([[1.0, 0.5], [0.0, 1.0]])
    return maf_split(x)


SPEC = DatasetSpec(name="mytable", dim=2, sizes=(324, 36, 40), raw_files=(), source="generated in a test",
                   description="a user's correlated 2-D table", recipe_version=1, prepare=prepare)
"""


def write_flow(folder: Path, name: str = "userflow", label: str = "User flow", file: str = "myflow.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file
    path.write_text(textwrap.dedent(FLOW.format(name=name, label=label)))
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def records(out: Path) -> list:
    return sorted(iter_records(out), key=lambda r: (r.model, r.tag or "", r.seed))


def test_file_reference_through_run_table_report_and_samples(tmp_path, capsys, monkeypatch):
    path = write_flow(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "res"
    assert (
        main(
            [
                "run",
                "--model",
                "mine/myflow.py:SPEC",
                "--layers",
                "2",
                "--max-epochs",
                "3",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    (rec,) = records(out)
    assert rec.model == "userflow" and rec.display_name == "User flow (2)" and rec.hparams == {"layers": 2, "width": 4}
    assert rec.model_ref == f"{path}:SPEC"  # absolute: the same file from any folder or worker
    assert rec.model_origin["kind"] == "file" and len(rec.model_origin["sha256"]) == 64
    assert Path(rec.path) == out / "runs" / "digits" / "userflow" / "seed0.json"

    assert main(["table", "--results", str(out), "--published", "none"]) == 0
    table = capsys.readouterr().out
    assert "User flow (2)" in table
    assert f"model 'userflow' plugged in from {path}:SPEC" in table
    assert "can no longer be imported" not in table

    assert (
        main(
            [
                "plot",
                "samples",
                "--results",
                str(out),
                "--dataset",
                "digits",
                "--model",
                "userflow",
                "--out",
                str(tmp_path / "s.png"),
                "-n",
                "16",
            ]
        )
        == 0
    )
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert main(["report", "--results", str(out), "--out", str(tmp_path / "report.html")]) == 0
    assert "User flow (2)" in (tmp_path / "report.html").read_text()

    # The model's file is gone: the row stays (its numbers are in the record), with a note saying why.
    path.rename(path.with_suffix(".bak"))
    from flowbench import tables

    tables._importable.cache_clear()
    from flowbench.models import MODELS

    MODELS.reset()
    assert main(["table", "--results", str(out), "--published", "none"]) == 0
    table = capsys.readouterr().out
    assert "User flow (2)" in table and "can no longer be imported" in table and "no such file" in table


def test_module_reference_seeds_resume_and_match_params(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "mypkg"
    write_flow(pkg, name="modflow", label="Module flow", file="flows.py")
    (pkg / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)  # module references search the working directory last, like `python -m`
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "res"
    assert (
        main(
            [
                "run",
                "--model",
                "mypkg.flows:make_spec",
                "--seeds",
                "0-1",
                "--max-epochs",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    recs = records(out)
    assert [r.seed for r in recs] == [0, 1]
    assert all(r.stack == {"seeds": [0, 1], "size": 2, "id": recs[0].stack["id"]} for r in recs)
    assert recs[0].model_ref == "mypkg.flows:make_spec" and recs[0].model_origin["kind"] == "module"

    # a stacked seed equals the same seed trained alone
    alone = tmp_path / "alone"
    assert (
        main(
            [
                "run",
                "--model",
                "mypkg.flows:make_spec",
                "--seed",
                "1",
                "--max-epochs",
                "2",
                "--out",
                str(alone),
                "--quiet",
            ]
        )
        == 0
    )
    assert records(alone)[0].test_ll == pytest.approx(recs[1].test_ll, rel=1e-5)

    # --resume continues a kept checkpoint to more epochs with the same model
    assert (
        main(
            [
                "run",
                "--model",
                "mypkg.flows:make_spec",
                "--max-epochs",
                "2",
                "--keep-checkpoint",
                "--out",
                str(tmp_path / "r"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "run",
                "--model",
                "mypkg.flows:make_spec",
                "--max-epochs",
                "4",
                "--resume",
                "--force",
                "--out",
                str(tmp_path / "r"),
                "--quiet",
            ]
        )
        == 0
    )
    (rec,) = records(tmp_path / "r")
    assert rec.epochs == 4 and any("resumed" in n for n in rec.notes) and rec.model == "modflow"

    # --match-params through the spec's knob, and through a knob named on the command line
    assert (
        main(
            [
                "run",
                "--model",
                "mypkg.flows:SPEC",
                "--match-params",
                "300",
                "--max-epochs",
                "1",
                "--out",
                str(tmp_path / "m"),
                "--quiet",
            ]
        )
        == 0
    )
    (rec,) = records(tmp_path / "m")
    assert rec.match_target["knob"] == "width" and rec.params == 300  # 64·2 affine + 172 padding
    assert (
        main(
            [
                "run",
                "--model",
                "mypkg.flows:SPEC",
                "--match-params",
                "800",
                "--match-knob",
                "layers",
                "--max-epochs",
                "1",
                "--out",
                str(tmp_path / "m2"),
                "--quiet",
            ]
        )
        == 0
    )
    (rec,) = records(tmp_path / "m2")
    assert rec.match_target["knob"] == "layers" and rec.hparams["layers"] == 6  # 6·128 + 4 = 772, the closest


def test_config_file_reference_is_relative_to_the_config(tmp_path, monkeypatch):
    write_flow(tmp_path / "proj")
    (tmp_path / "proj" / "run.toml").write_text('model = "myflow.py:SPEC"\nlayers = 3\nmax-epochs = 1\n')
    monkeypatch.chdir(tmp_path)  # not the config's folder
    out = tmp_path / "res"
    assert main(["run", "--config", "proj/run.toml", "--width", "7", "--out", str(out), "--quiet"]) == 0
    (rec,) = records(out)
    assert rec.hparams == {"layers": 3, "width": 7} and rec.model_ref == f"{tmp_path / 'proj' / 'myflow.py'}:SPEC"


def test_dataset_reference(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(DATA)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "res"
    assert (
        main(
            [
                "run",
                "--dataset",
                "mydata.py:SPEC",
                "--model",
                "maf",
                "--hidden",
                "8",
                "--max-epochs",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    (rec,) = records(out)
    assert rec.dataset == "mytable" and rec.dataset_ref == f"{tmp_path / 'mydata.py'}:SPEC" and rec.n_test == 40


def sweep_file(folder: Path) -> Path:
    write_flow(folder)
    path = folder / "sweep.toml"
    path.write_text(
        textwrap.dedent("""
        datasets = ["digits"]
        models = ["myflow.py:SPEC", "gaussian"]
        [grid]
        seed = [0, 1]
        max-epochs = 2
        [override.userflow]
        layers = [1, 2]
    """)
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["processes", "ray"])
def test_sweep_with_a_file_reference_runs_in_workers(tmp_path, executor):
    """Workers (local processes, Ray) never see the driver's imports: they resolve the reference themselves."""
    if executor == "ray":
        pytest.importorskip("ray")
    path = sweep_file(tmp_path / "proj")
    out = tmp_path / "res"
    args = ["--workers", "2"] if executor == "processes" else ["--executor", "ray", "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "flowbench", "sweep", str(path), "--out", str(out), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    recs = records(out)
    mine = [r for r in recs if r.model == "userflow"]
    assert len(mine) == 4 and {r.tag for r in mine} == {"layers=1,max-epochs=2", "layers=2,max-epochs=2"}
    assert all(r.status == "ok" and r.model_ref == f"{tmp_path / 'proj' / 'myflow.py'}:SPEC" for r in mine)
    assert len([r for r in recs if r.model == "gaussian"]) == 2


def test_bench_train_and_toy2d_take_references(tmp_path, monkeypatch):
    write_flow(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "bench",
                "train",
                "--dataset",
                "digits",
                "--model",
                "myflow.py:SPEC",
                "--steps",
                "5",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "b" / "bench" / "train-digits-userflow.json").read_text())
    assert (
        res["model"] == "userflow" and res["model_ref"] == f"{tmp_path / 'myflow.py'}:SPEC"
    )  # absolute, as in run records
    assert (
        main(
            [
                "sanity",
                "toy2d",
                "--data",
                "moons",
                "--model",
                "myflow.py:SPEC",
                "--quick",
                "--quiet",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "t" / "toy2d_moons_userflow.json").read_text())
    assert result["model"] == "userflow" and result["epochs"] == 2


BAD_SPEC = """
from flowbench.models import ModelSpec, HParam
SPEC = ModelSpec(name="Bad Name", build=lambda dim: None, hparams={}, label="x", paper="", lr=1e-3)
LR = ModelSpec(name="badlr", build=lambda dim: None, hparams={}, label="x", paper="", lr=-1.0)
OPT = ModelSpec(name="opt", build=lambda dim: None, hparams={"lr": HParam(1.0, "clashes")}, label="x", paper="",
                lr=1e-3)
CLASH = ModelSpec(name="maf", build=lambda dim: None, hparams={}, label="x", paper="", lr=1e-3)
NUMBER = 3
def needs_args(a, b):
    return None
def returns_wrong():
    return 42
def raises():
    raise RuntimeError("boom")
"""


@pytest.mark.parametrize(
    "ref, expect",
    [
        ("nosuchmodule_xyz:SPEC", "no module named 'nosuchmodule_xyz'"),
        ("missing.py:SPEC", "no such file"),
        ("bad.py:NOPE", "has no attribute 'NOPE'"),
        ("bad.py:SPEC", "name 'Bad Name' must be lower-case"),
        ("bad.py:LR", "lr must be a positive number"),
        ("bad.py:OPT", "have the names of run options"),
        ("bad.py:CLASH", "which is the built-in model's name"),
        ("bad.py:NUMBER", "is a int, not a model"),
        ("bad.py:returns_wrong", "returned a int, not a ModelSpec"),
        ("bad.py:raises", "RuntimeError: boom"),
        ("syntax.py:SPEC", "SyntaxError"),
        ("bad.py:", "is not a reference"),
        ("bad.py:1x", "is not an attribute name"),
    ],
)
def test_bad_model_references_exit_2_with_what_to_do(tmp_path, monkeypatch, capsys, ref, expect):
    (tmp_path / "bad.py").write_text(BAD_SPEC)
    (tmp_path / "syntax.py").write_text("def broken(:\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--model", ref, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_two_references_with_one_name_are_refused(tmp_path, monkeypatch, capsys):
    write_flow(tmp_path, file="a.py")
    write_flow(tmp_path, file="b.py")
    path = tmp_path / "sweep.toml"
    path.write_text('datasets = ["digits"]\nmodels = ["a.py:SPEC", "b.py:SPEC"]\n')
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert "both declare the model 'userflow'" in capsys.readouterr().err


def test_bad_dataset_reference(tmp_path, monkeypatch, capsys):
    (tmp_path / "d.py").write_text("X = 1\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--dataset", "d.py:X", "--model", "gaussian", "--out", str(tmp_path / "r")]) == 2
    assert "is a int, not a dataset" in capsys.readouterr().err


def test_zuko_and_nflows_flows_train_under_the_maf_protocol_into_table_rows(tmp_path, capsys):
    pytest.importorskip("zuko")
    pytest.importorskip("nflows")
    out = tmp_path / "res"
    assert (
        main(
            [
                "run",
                "--model",
                "zuko.flows:MAF",
                "--transforms",
                "2",
                "--hidden-features",
                "[16, 16]",
                "--max-epochs",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert "zuko 1." in capsys.readouterr().out  # the summary says whose architecture it is
    assert (
        main(
            [
                "run",
                "--model",
                "nflows.flows:MaskedAutoregressiveFlow",
                "--hidden-features",
                "16",
                "--num-layers",
                "2",
                "--num-blocks-per-layer",
                "1",
                "--max-epochs",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    zuko, nfl = sorted(iter_records(out), key=lambda r: r.model, reverse=True)
    assert (zuko.model, zuko.display_name, zuko.hparams["hidden_features"]) == ("zuko-maf", "zuko MAF (2)", [16, 16])
    assert zuko.config["hidden_features"] == [16, 16]  # the text "[16, 16]" as the spec reads it
    assert (nfl.display_name, nfl.hparams["hidden_features"], nfl.hparams["num_layers"]) == (
        "nflows MaskedAutoregressiveFlow (2)",
        16,
        2,
    )
    assert zuko.config["lr"] == nfl.config["lr"] == 1e-4 and zuko.config["batch_size"] == 100  # MAF protocol
    assert main(["table", "--results", str(out)]) == 0
    table = capsys.readouterr().out
    assert "zuko MAF (2)" in table and "nflows MaskedAutoregressiveFlow (2)" in table and "MAF (5)" in table
    assert "plugged in from zuko.flows:MAF" in table

    # a required hyperparameter left out: exit 2, naming what to give
    assert main(["run", "--model", "nflows.flows:MaskedAutoregressiveFlow", "--out", str(out)]) == 2
    assert "needs --hidden-features, --num-layers, --num-blocks-per-layer" in capsys.readouterr().err


def test_a_sweep_grid_of_list_values(tmp_path):
    pytest.importorskip("zuko")
    from flowbench.sweep import parse_sweep

    sweep = parse_sweep(
        {
            "datasets": ["digits"],
            "models": ["zuko.flows:MAF"],
            "grid": {"hidden-features": [[32, 32], [64]], "seed": [0, 1]},
        }
    )
    assert sorted({r.tag for r in sweep.runs}) == ["hidden-features=32x32", "hidden-features=64"]
    one = parse_sweep({"datasets": ["digits"], "models": ["zuko.flows:MAF"], "grid": {"hidden-features": [8, 8]}})
    assert [r.tag for r in one.runs] == ["hidden-features=8x8"]  # a flat list is one value of a list knob
    opts = one.runs[0].options(tmp_path)
    assert opts.hparams == {"hidden_features": (8, 8)} and opts.model_ref == "zuko.flows:MAF"


def test_sweep_keeps_model_and_dataset_references_apart_and_mixed_types_as_axes(tmp_path):
    from flowbench.sweep import parse_sweep

    (tmp_path / "m.py").write_text(
        textwrap.dedent("""
        import dataclasses
        from flowbench.models import HParam, MODELS

        def build(dim, hidden=(8, 8)):
            return MODELS["gaussian"].build(dim)

        power = dataclasses.replace(MODELS["gaussian"], name="power", build=build, label="Power model",
                                    hparams={"hidden": HParam((8, 8), "widths")})
    """)
    )
    ref = f"{tmp_path / 'm.py'}:power"
    sweep = parse_sweep(
        {
            "datasets": ["digits"],
            "models": [ref, "maf"],
            "grid": {"hidden": [64, 128]},
            "override": {"power": {"hidden": [[8, 8]]}},
        },
        path=tmp_path / "s.toml",
    )
    runs = sorted((r.model, r.tag, r.model_ref, r.dataset_ref) for r in sweep.runs)
    assert runs == [
        ("maf", "hidden=128", None, None),
        ("maf", "hidden=64", None, None),
        ("power", "hidden=8x8", ref, None),
    ]
    # a model named like a dataset is not taken for that dataset
    sweep = parse_sweep({"datasets": ["power"], "models": [ref]}, path=tmp_path / "s.toml")
    assert [(r.dataset, r.dataset_ref, r.model_ref) for r in sweep.runs] == [("power", None, ref)]


def test_a_model_to_match_in_a_config_file_is_relative_to_the_config(tmp_path, monkeypatch):
    from flowbench.config import load_config

    write_flow(tmp_path / "proj")
    (tmp_path / "proj" / "run.toml").write_text('model = "maf"\nmatch-params = "myflow.py:SPEC"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config("proj/run.toml")["match_params"] == f"{tmp_path / 'proj' / 'myflow.py'}:SPEC"


def test_a_plugged_in_run_in_progress_gets_the_row_label_its_record_will_have(tmp_path, monkeypatch):
    """The report's curves of runs in progress label them as their records will: the spec is found through the
    checkpoint's model reference (a fresh process has not registered the plugged-in name), its hyperparameters
    are those the checkpoint set."""
    from flowbench.models import MODELS
    from flowbench.plots._records import read_progress
    from flowbench.results import runs_without_record

    write_flow(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "res"
    argv = ["run", "--model", "mine/myflow.py:SPEC", "--layers", "2", "--max-epochs", "1", "--out", str(out)]
    assert main([*argv, "--keep-checkpoint", "--quiet"]) == 0
    (rec,) = records(out)
    Path(rec.path).unlink()  # the checkpoint stays: a run whose record is not written yet
    MODELS.reset()
    (run,), problems = read_progress(runs_without_record(out))
    assert not problems and run.model == "userflow"
    assert run.record()["display_name"] == rec.display_name == "User flow (2)"
