"""End to end through the CLI on the bundled digits data: `flowbench run` then `flowbench table`."""

from __future__ import annotations

import pytest
import torch

from flowbench.cli import main
from flowbench.results import read_record

pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def _restore_threads():
    """`flowbench run` sets torch's thread count (process-wide); put it back for the other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_run_then_table_on_digits(tmp_path, capsys):
    out, data = tmp_path / "results", tmp_path / "data"
    argv = ["run", "--max-epochs", "2", "--out", str(out), "--data-root", str(data), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    path = out / "runs" / "digits" / "relgrad" / "seed0.json"
    rec = read_record(path)
    assert (rec.dataset, rec.model, rec.display_name, rec.status) == ("digits", "relgrad", "Relgrad dense flow", "ok")
    assert rec.epochs == 2 and len(rec.history) == 2 and rec.config["max_epochs"] == 2
    assert rec.config["config"].endswith("configs/digits/relgrad.toml")  # the bundled default config
    assert rec.n_test > 100 and rec.test_ll_2se > 0
    assert 0 < rec.bits_per_pixel < 5 and rec.test_ll_pixel > rec.test_ll  # image data: pixel space too
    assert rec.params == 2 * (64 * 64 + 64)
    assert "record:" in capsys.readouterr().out

    # a second run with the same key refuses to overwrite
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err

    assert main(["table", "--results", str(out)]) == 0
    table = capsys.readouterr().out
    ours = next(ln for ln in table.splitlines() if ln.startswith("| Relgrad dense flow") and "| ours" in ln)
    assert f"{rec.test_ll:.2f}" in ours and "DIGITS" in table
    assert "published: MAF paper" in table and "published: relgrad paper" in table
    target = tmp_path / "table.md"
    assert main(["table", "--results", str(out), "--out", str(target), "--published", "none"]) == 0
    assert "published" not in target.read_text() and "Relgrad dense flow" in target.read_text()


def test_cli_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "relgrad"\nlearning-rate = 0.1\n')
    assert main(["run", "--config", str(bad), "--out", str(tmp_path)]) == 2
    assert "'learning-rate'" in capsys.readouterr().err
    assert main(["run", "--hidden", "10", "--out", str(tmp_path), "--data-root", str(tmp_path)]) == 2
    assert "--hidden does not apply to model 'relgrad'" in capsys.readouterr().err
    assert main(["run", "--dataset", "nonexistent", "--out", str(tmp_path)]) == 2
    assert main(["run", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads must be a positive integer" in capsys.readouterr().err
    assert main(["table", "--results", str(tmp_path / "none")]) == 2
    assert f"--results {tmp_path / 'none'}: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["table", "--results", str(tmp_path / "empty")]) == 2  # a folder, but nothing trained into it
    assert "no run records" in capsys.readouterr().err
