"""`flowbench sanity …` end to end with --quick: exit status, JSON and PNG files."""

from __future__ import annotations

import json
import re

import pytest

from flowbench.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


@pytest.mark.slow
def test_jacnet_quick(tmp_path, capsys):
    assert main(["sanity", "jacnet", "--quick", "--task", "exp", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err  # a line as each model finishes training, before its evaluation
    assert "exp jacnet: 3 iterations" in err and "exp unconstrained: 3 iterations" in err
    assert main(["sanity", "jacnet", "--quick", "--task", "abs", "--out", str(tmp_path)]) == 0
    assert main(["sanity", "jacnet", "--iters", "2", "--task", "path", "--out", str(tmp_path)]) == 0
    exp = json.loads((tmp_path / "jacnet_exp.json").read_text())
    m = exp["models"]["jacnet"]
    for key in (
        "train_error",
        "test_error",
        "inverse_roundtrip_error",
        "min_derivative",
        "max_abs_derivative",
        "mean_nfe_per_iteration",
        "final_tolerance",
        "tolerance_schedule",
    ):
        assert key in m
    assert m["min_derivative"] > 0 and exp["models"]["unconstrained"]["inverse_roundtrip_error"] is None
    ab = json.loads((tmp_path / "jacnet_abs.json").read_text())["models"]["jacnet"]
    assert ab["lipschitz_certified"] and ab["certified_max_abs_derivative"] <= 1.0
    path = json.loads((tmp_path / "jacnet_path.json").read_text())
    assert path["path_gap_rotation_field"] > 100 * path["path_gap_conservative_field"]
    assert _png(tmp_path / "jacnet_exp.png") and _png(tmp_path / "jacnet_abs.png")


def test_pseudo_inverse_quick(tmp_path):
    assert main(["sanity", "pseudo-inverse", "--quick", "--activation", "silu", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "pseudo_inverse.json").read_text())["runs"]
    assert [r["lambda"] for r in runs] == [0.0, 1.0]
    assert "| silu | unconstrained |" in (tmp_path / "pseudo_inverse.md").read_text()
    assert _png(tmp_path / "pseudo_inverse_silu.png")


@pytest.mark.slow
def test_invertibility_quick(tmp_path, capsys):
    assert main(["sanity", "invertibility", "--quick", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert all(m in err for m in ("JacNet (invertible): trained", "pair (λ=μ=1): trained", "layers): trained"))
    table = (tmp_path / "invertibility.md").read_text()
    assert "JacNet" in table and "pseudo-invertible" in table and "relgrad" in table
    rows = [r for r in table.splitlines() if r.startswith("|")]
    assert len(rows) == 5 and all(len(re.split(r"(?<!\\)\|", r)) == 8 for r in rows)  # 6 cells: |W_k| escaped
    assert r"min \|W_k\|" in table
    res = json.loads((tmp_path / "invertibility.json").read_text())
    assert len(res["models"]) == 3 and _png(tmp_path / "invertibility.png")


def test_toy2d_quick(tmp_path, capsys):
    assert main(["sanity", "toy2d", "--quick", "--data", "moons", "--model", "relgrad", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err  # the trainer's own epoch lines, then the grid evaluation
    assert "epoch    1" in err and "epoch    2" in err and "evaluating the density on a 60×60 grid" in err
    res = json.loads((tmp_path / "toy2d_moons_relgrad.json").read_text())
    assert res["test_ll"] == pytest.approx(
        res["test_ll_plotted_model"], abs=1e-3
    )  # the plotted model is the recorded one
    assert _png(tmp_path / "toy2d_moons_relgrad.png")


def test_bad_model_is_a_clean_error(tmp_path, capsys):
    assert main(["sanity", "toy2d", "--quick", "--model", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
