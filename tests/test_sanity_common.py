"""What the sanity tasks share: progress display, option checks, output folder, Markdown tables, the shared
plotting helpers and the citations in their help (issues 10 and 12)."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from flowbench.cli import main
from flowbench.errors import ConfigError


class _Terminal(io.StringIO):
    """A stream tqdm takes for a terminal, so that the bar is drawn (it is off when stderr is a file)."""

    def isatty(self) -> bool:
        return True


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table row, split at unescaped pipes only."""
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


# -- progress ----------------------------------------------------------------------------------------------


def test_pair_training_draws_a_bar_on_a_terminal():
    from flowbench.sanity.common import Progress
    from flowbench.sanity.pseudo_inverse import spline_data, train_pair

    x, y = spline_data(50)
    tty = _Terminal()
    train_pair(x, y, 1.0, steps=3, progress=Progress(file=tty, mininterval=0), desc="my pair")
    text = tty.getvalue()
    assert "my pair" in text and "3/3" in text and "loss=" in text
    quiet = _Terminal()
    train_pair(x, y, 1.0, steps=3, progress=Progress(enabled=False, file=quiet))
    assert quiet.getvalue() == ""


def test_jacnet_training_draws_a_bar_with_loss_and_tolerance():
    from flowbench.sanity.common import Progress
    from flowbench.sanity.jacnet import JacNet, train_jacnet

    torch.manual_seed(0)
    model = JacNet(1, 1).double()
    x = torch.linspace(-1, 1, 5, dtype=torch.float64).unsqueeze(1)
    tty = _Terminal()
    hist = train_jacnet(model, x, torch.exp(x), iters=2, progress=Progress(file=tty, mininterval=0), desc="exp jacnet")
    text = tty.getvalue()
    assert len(hist["loss"]) == 2 and "exp jacnet" in text and "2/2" in text and "tol=" in text


def test_each_part_reports_when_it_ends(tmp_path, capsys):
    assert main(["sanity", "pseudo-inverse", "--quick", "--activation", "silu", "--out", str(tmp_path)]) == 0
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert any(line.startswith("silu, unconstrained: loss") for line in lines)
    assert any(line.startswith("silu, λ = μ = 1: loss") for line in lines)
    assert "| silu | unconstrained |" in cap.out  # the results stay on stdout


@pytest.mark.parametrize(
    "task, module, fn",
    [
        ("jacnet", "jacnet_tasks", "run_jacnet_tasks"),
        ("pseudo-inverse", "pseudo_inverse", "run_pseudo_inverse"),
        ("toy2d", "toy2d", "run_toy2d_all"),
        ("invertibility", "invertibility", "run_invertibility"),
    ],
)
def test_quiet_turns_the_progress_display_off(tmp_path, monkeypatch, task, module, fn):
    import importlib

    seen = []

    def fake(*args, progress, **kwargs):
        seen.append(progress.enabled)
        return {"table": ""}

    monkeypatch.setattr(importlib.import_module(f"flowbench.sanity.{module}"), fn, fake)
    assert main(["sanity", task, "--out", str(tmp_path)]) == 0
    assert main(["sanity", task, "--quiet", "--out", str(tmp_path)]) == 0
    assert seen == [True, False]


# -- options and the output folder -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["jacnet", "--task", "exp", "--eps", "nan"], "--eps"),
        (["jacnet", "--task", "abs", "--k", "-1"], "--k"),
        (["jacnet", "--task", "abs", "--k", "inf"], "--k"),
        (["pseudo-inverse", "--seed", "-1"], "--seed"),
        (["invertibility", "--seed", "-3"], "--seed"),
        (["toy2d", "--data", "moons", "--lr", "nan"], "--lr"),
        (["toy2d", "--data", "moons", "--lr", "-0.1"], "--lr"),
        (["toy2d", "--data", "moons", "--seed", "-1"], "--seed"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, argv, flag):
    assert main(["sanity", *argv, "--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowbench sanity: error:") and flag in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task", ["jacnet", "pseudo-inverse", "toy2d", "invertibility"])
def test_out_that_is_a_file_is_a_clean_error(tmp_path, capsys, task):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(["sanity", task, "--quick", "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "--out" in err
    assert main(["sanity", task, "--quick", "--out", str(afile / "below")]) == 2
    assert "cannot create the folder" in capsys.readouterr().err
    assert afile.read_text() == "keep me"


def test_output_dir_refuses_an_unwritable_folder(tmp_path):
    import os

    from flowbench.utils import output_dir

    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            output_dir(ro)
        with pytest.raises(ConfigError, match="cannot create"):
            output_dir(ro / "sub")
    finally:
        ro.chmod(0o700)
    assert output_dir(tmp_path / "a" / "b").is_dir()


# -- Markdown and figures ----------------------------------------------------------------------------------


def test_markdown_cells_with_pipes_are_escaped():
    from flowbench.sanity.markdown import markdown_table

    table = markdown_table(
        ["model", "x", "guarantee"], [["flow", 0.5, "yes while every W_k ≠ 0 (min |W_k| = 0.3)"], ["pair", None, "no"]]
    )
    rows = table.splitlines()
    assert all(len(_cells(r)) == 3 for r in rows)
    assert _cells(rows[2])[2].strip() == r"yes while every W_k ≠ 0 (min \|W_k\| = 0.3)"
    assert _cells(rows[3])[1].strip() == "—"


def _toy_density_with_nonfinite_points():
    """Toy data, a Gaussian log-density on a 20×20 grid with NaN, −inf and +inf in its first row, and the
    result dict a toy2d figure is drawn from."""
    from flowbench.sanity.toy2d import make_toy

    data = make_toy("moons", n_train=200, n_val=10, n_test=10)
    gx, gy = np.meshgrid(np.linspace(-2, 2, 20), np.linspace(-2, 2, 20))
    logp = -0.5 * (gx**2 + gy**2)
    logp[0, :3] = [np.nan, -np.inf, np.inf]
    result = {
        "display_name": "test",
        "model": "relgrad",
        "test_ll": -1.0,
        "epochs": 1,
        "gaussian_test_ll": -2.0,
        "nonfinite_grid_points": 3,
    }
    return data, gx, gy, logp, result


def test_toy2d_figure_masks_nonfinite_density_without_deprecation_warning(tmp_path):
    from flowbench.plotting import colormap
    from flowbench.sanity.toy2d import _figure

    data, gx, gy, logp, result = _toy_density_with_nonfinite_points()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # set_bad's PendingDeprecationWarning would fail here
        _figure(data, gx, gy, logp, result, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    import matplotlib
    from matplotlib.colors import to_rgba

    assert tuple(colormap("magma", bad="cyan").get_bad()) == to_rgba("cyan")
    assert tuple(matplotlib.colormaps["magma"].get_bad()) != to_rgba("cyan")  # the registered one is untouched


def test_toy2d_draws_every_non_finite_point_cyan():
    from flowbench.plots._mpl import pyplot
    from flowbench.sanity.toy2d import _draw

    data, gx, gy, logp, result = _toy_density_with_nonfinite_points()
    fig, (a, b) = pyplot().subplots(1, 2)
    _draw(fig, a, b, data, gx, gy, logp, result)
    (image,) = b.get_images()
    mask = np.ma.getmaskarray(image.get_array())
    assert mask[0, :3].all() and mask.sum() == 3  # the three the title counts, and no other
    assert "cyan: 3 grid points" in b.get_title()
    assert image.get_cmap().get_bad()[:3] == pytest.approx((0.0, 1.0, 1.0))
    pyplot().close(fig)


def test_figure_writes_only_when_the_drawing_succeeds(tmp_path):
    from flowbench.plotting import figure, pyplot

    before = len(pyplot().get_fignums())
    with figure(tmp_path / "ok.png", 1, 2) as (_fig, (a, _b)):
        a.plot([0, 1], [1, 0])
    assert (tmp_path / "ok.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(RuntimeError), figure(tmp_path / "bad.png"):
        raise RuntimeError("drawing failed")
    assert not (tmp_path / "bad.png").exists() and len(pyplot().get_fignums()) == before


# -- citations ---------------------------------------------------------------------------------------------


def test_no_citation_of_a_file_the_repository_does_not_have(capsys):
    root = Path(__file__).resolve().parents[1] / "flowbench"
    area = [
        *root.glob("sanity/*.py"),
        *root.glob("bench/*.py"),
        root / "commands" / "sanity.py",
        root / "commands" / "bench.py",
        root / "plotting.py",
    ]
    assert [p.name for p in area if "maf-protocol.md" in p.read_text()] == []
    for task in ("jacnet", "pseudo-inverse", "toy2d", "invertibility"):
        with pytest.raises(SystemExit):
            main(["sanity", task, "--help"])
        assert "maf-protocol" not in capsys.readouterr().out
