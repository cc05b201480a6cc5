"""Installed plugins: distributions whose entry points (groups ``flowbench.models``, ``flowbench.datasets``)
declare models and datasets. The fixtures in ``tests/plugins/`` are real distributions (package + dist-info
metadata, as pip leaves them); putting their folder on the path is all it takes for ``importlib.metadata``
to find them, as it finds any installed package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowbench.cli import main
from flowbench.results import iter_records

PLUGINS = Path(__file__).resolve().parent / "plugins"


def flowbench(args: list[str], *sites: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m flowbench ARGS`` in a fresh process with the plugin site folders ``sites`` installed."""
    path = os.pathsep.join([*(str(PLUGINS / s) for s in sites), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "flowbench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def good_plugin(monkeypatch):
    """The demo plugin installed in this process (its site folder on sys.path), registries re-read."""
    from flowbench.data import DATASETS
    from flowbench.models import MODELS

    monkeypatch.syspath_prepend(str(PLUGINS / "good"))
    MODELS.reset()
    DATASETS.reset()
    yield
    MODELS.reset()
    DATASETS.reset()


def test_entry_points_register_a_model_and_a_dataset(good_plugin, tmp_path, capsys):
    from flowbench.data import DATASETS, get_info
    from flowbench.models import MODELS, get_spec, model_origin

    assert "demo-affine" in MODELS and list(MODELS)[-1] == "demo-affine"  # after the built-ins
    assert get_spec("demo-affine").label == "Demo affine ({layers})"
    origin = model_origin("demo-affine")
    assert (origin.kind, origin.detail) == ("plugin", "flowbench-demo-plugin 0.1")
    assert get_info("demo_blobs").dim == 3 and DATASETS.origins["demo_blobs"].kind == "plugin"

    assert main(["models"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("demo-affine"))
    assert "plugin: flowbench-demo-plugin 0.1" in line and "layers=1" in line
    assert main(["datasets", "--root", str(tmp_path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("demo_blobs"))
    assert "built-in" in line and "plugin: flowbench-demo-plugin 0.1" in line  # status built-in: no raw files

    out = tmp_path / "res"
    assert (
        main(
            [
                "run",
                "--model",
                "demo-affine",
                "--dataset",
                "demo_blobs",
                "--layers",
                "2",
                "--max-epochs",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    (rec,) = iter_records(out)
    assert (rec.model, rec.dataset, rec.display_name) == ("demo-affine", "demo_blobs", "Demo affine (2)")
    assert rec.model_ref is None and rec.model_origin["kind"] == "plugin"


def test_without_the_plugin_its_names_are_unknown(capsys):
    assert main(["run", "--model", "demo-affine"]) == 2
    assert "unknown model 'demo-affine'" in capsys.readouterr().err


@pytest.mark.slow
def test_plugin_in_a_fresh_process_and_a_sweep_worker(tmp_path):
    (tmp_path / "sweep.toml").write_text(
        'datasets = ["demo_blobs"]\nmodels = ["demo-affine"]\n[grid]\nseed = [0, 1]\nmax-epochs = 2\n'
    )
    proc = flowbench(["sweep", "sweep.toml", "--workers", "2", "--out", "res"], "good", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    recs = sorted(iter_records(tmp_path / "res"), key=lambda r: r.seed)
    assert [(r.model, r.dataset, r.seed, r.status) for r in recs] == [
        ("demo-affine", "demo_blobs", s, "ok") for s in (0, 1)
    ]


@pytest.mark.slow  # fresh processes, each importing torch: seconds each
def test_a_broken_plugin_warns_once_and_fails_only_when_asked_for(tmp_path):
    proc = flowbench(
        ["run", "--model", "gaussian", "--max-epochs", "1", "--out", "res", "--quiet"], "broken", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    warning = [ln for ln in proc.stderr.splitlines() if "broken-flow" in ln]
    assert len(warning) == 1 and "flowbench-broken-plugin 0.2" in warning[0]
    assert "needs the package 'nonexistent-dependency'" in warning[0] and "Traceback" not in proc.stderr

    proc = flowbench(["run", "--model", "broken-flow", "--out", "res"], "broken", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "flowbench run: error: plugin 'broken-flow' (flowbench-broken-plugin 0.2" in proc.stderr
    assert "failed to load: ImportError" in proc.stderr


@pytest.mark.slow  # fresh processes, each importing torch: seconds each
def test_plugin_names_that_clash_are_errors(tmp_path):
    proc = flowbench(["models"], "good", "clash", cwd=tmp_path)
    assert proc.returncode == 0
    assert "reuses the name of the built-in model 'maf'" in proc.stderr
    assert "model 'demo-affine' is declared by two plugins" in proc.stderr
    # the built-in keeps its name; the twice-declared one is usable from neither plugin
    proc = flowbench(["run", "--model", "demo-affine", "--out", "res"], "good", "clash", cwd=tmp_path)
    assert proc.returncode == 2 and "declared by two plugins" in proc.stderr.splitlines()[-1]
    assert "flowbench-demo-plugin 0.1" in proc.stderr and "flowbench-clash-plugin 0.3" in proc.stderr
    proc = flowbench(
        ["run", "--model", "maf", "--hidden", "8", "--max-epochs", "1", "--out", "res", "--quiet"],
        "good",
        "clash",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (rec,) = iter_records(tmp_path / "res")
    assert rec.display_name == "MAF (5)" and rec.model_origin["kind"] == "built-in"


def test_a_plugin_row_names_its_distribution_and_outlives_it(good_plugin, tmp_path, capsys):
    from flowbench import tables
    from flowbench.models import MODELS

    out = tmp_path / "res"
    assert main(["run", "--model", "demo-affine", "--max-epochs", "1", "--out", str(out), "--quiet"]) == 0
    assert main(["table", "--results", str(out), "--published", "none"]) == 0
    table = capsys.readouterr().out
    assert "model 'demo-affine' from the plugin flowbench-demo-plugin 0.1 (flowbench_demo_plugin:MODEL)" in table
    assert "can no longer be imported" not in table
    # uninstalled: the row stays, with the reason
    import sys

    sys.path.remove(str(PLUGINS / "good"))
    MODELS.reset()
    tables._importable.cache_clear()
    assert main(["table", "--results", str(out), "--published", "none"]) == 0
    table = capsys.readouterr().out
    assert "Demo affine (1)" in table and "can no longer be imported (unknown model 'demo-affine'" in table
