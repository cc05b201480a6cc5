"""`flowbench bench`: the harness end to end at tiny sizes (correctness, never timing)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import FUSED_CPU_ADAM

from flowbench.bench import gradients as G
from flowbench.cli import main as cli_main
from flowbench.errors import ConfigError, FlowbenchError


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # --threads sets torch's global thread count; keep other tests unaffected
    yield
    torch.set_num_threads(n)


def test_bench_gradients_cli_end_to_end(tmp_path, capsys):
    rc = cli_main(
        [
            "bench",
            "gradients",
            "--dims",
            "4,8",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = tmp_path / "bench"
    rec = json.loads((out / "gradients.json").read_text())
    assert max(rec["agreement"].values()) < 1e-8
    cells = rec["cells"]
    assert {(c["method"], c["dim"]) for c in cells} == {(m, d) for m in G.METHODS for d in (4, 8)}
    assert all(c["status"] == "ok" and c["median_s"] > 0 and len(c["times_s"]) == 2 for c in cells)
    assert all(c["memory_method"] == "predicted" and c["memory_bytes"] == c["predicted_bytes"] for c in cells)
    assert [r["D"] for r in rec["summary"]] == [4, 8] and "speedup_vs_autodiff" in rec["summary"][0]
    rows = list(csv.DictReader((out / "gradients.csv").open()))
    assert len(rows) == 8
    assert (out / "gradients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "relative" in capsys.readouterr().out


def test_oversized_and_too_slow_methods_are_skipped_with_prediction():
    dim, batch = 8, 100
    limit = (G.predicted_bytes("ordinary", dim, batch, 2) + G.predicted_bytes("autodiff", dim, batch, 2)) // 2
    cells = G.run_gradients([dim], batch=batch, repeats=1, warmup=1, memory_limit=limit, log=lambda s: None)
    by = {c.method: c for c in cells}
    assert by["autodiff"].status == "skipped-memory" and by["autodiff"].median_s is None
    assert "predicted" in by["autodiff"].note and "GiB" in by["autodiff"].note
    assert all(by[m].status == "ok" for m in ("relative", "ordinary", "mlp"))
    # a method whose extrapolated time per call exceeds the cap is not run at the larger D
    cells = G.run_gradients(
        [4, 64], methods=("relative", "autodiff"), repeats=1, warmup=1, max_call_s=1e-9, log=lambda s: None
    )
    big = {c.method: c for c in cells if c.dim == 64}
    assert big["autodiff"].status == "skipped-time" and big["relative"].status == "skipped-time"
    assert all(c.status == "ok" for c in cells if c.dim == 4)


def test_agreement_check_catches_a_wrong_gradient(monkeypatch):
    from flowbench.models.relgrad import RelgradFlow

    assert max(G.check_agreement().values()) < 1e-10

    real = RelgradFlow.train_log_prob

    def broken(self, x):  # a relative gradient 1 % too large
        out = real(self, x)
        return out * 1.01 if self.relative else out

    monkeypatch.setattr(RelgradFlow, "train_log_prob", broken)
    with pytest.raises(G.AgreementError, match="disagree"):
        G.check_agreement()


@pytest.mark.slow  # spawns a fresh interpreter that imports torch
def test_rss_memory_is_measured_in_a_subprocess():
    cells = G.run_gradients([16], methods=("relative",), repeats=1, warmup=1, cpu_memory="rss", log=lambda s: None)
    c = cells[0]
    assert c.status == "ok" and "RSS" in c.memory_method
    assert c.memory_bytes is not None and 0 <= c.memory_bytes < 2**30


def test_bench_optim_shared_inits(tmp_path):
    rc = cli_main(["bench", "optim", "--points", "64", "--inits", "2", "--epochs", "5", "--out", str(tmp_path)])
    assert rc == 0
    rec = json.loads((tmp_path / "bench" / "optim.json").read_text())
    for i in range(2):  # same initialisation → same starting loss; then the directions differ
        r, o = rec["curves"]["relative"][i], rec["curves"]["ordinary"][i]
        assert len(r) == len(o) == 5 and r[0] == pytest.approx(o[0], abs=1e-12) and r[1] != o[1]
    assert (tmp_path / "bench" / "optim.png").exists()


def test_bench_train_synthetic_shape_and_errors(tmp_path):
    from flowbench.bench.train import run_train

    res = run_train(
        "power", "relgrad", steps=4, warmup=1, rounds=2, batch_size=16, data_root=tmp_path, log=lambda s: None
    )
    assert res["synthetic_data"] and res["dim"] == 6 and res["n_train"] > 1_000_000
    assert res["samples_per_s"]["flowbench"] > 0
    assert res["epoch_s"]["flowbench"] == pytest.approx(res["n_train"] / res["samples_per_s"]["flowbench"])
    with pytest.raises(ConfigError, match="maf and nsf-ar only"):
        run_train("power", "relgrad", steps=1, compare_zuko=True, data_root=tmp_path)
    with pytest.raises(ConfigError):
        run_train("nosuchdata", "relgrad", steps=1, data_root=tmp_path)
    with pytest.raises(ConfigError, match="nothing to train"):
        run_train("power", "gaussian", steps=1, data_root=tmp_path)
    rc = cli_main(
        [
            "bench",
            "train",
            "--dataset",
            "power",
            "--model",
            "relgrad",
            "--steps",
            "2",
            "--no-bias",  # the model's hyperparameters are spelled as `flowbench run` spells them
            "--data-root",
            str(tmp_path),
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    rec = json.loads((tmp_path / "bench" / "train-power-relgrad.json").read_text())
    assert rec["hparams"]["bias"] is False  # --no-bias over the run config's hyperparameters


def test_bench_train_times_the_trainers_adam_and_refuses_a_fused_one_torch_lacks(tmp_path, monkeypatch, capsys):
    # `--adam fused`, the default, failed with torch's traceback where torch has no fused Adam on the device
    # (the CPU before torch 2.4), where the trainer itself falls back to the default loop
    from flowbench.bench.train import resolve_adam, run_train
    from flowbench.training.trainer import make_adam

    cpu = torch.device("cpu")
    assert resolve_adam(None, cpu) == ("fused" if FUSED_CPU_ADAM else "default")
    assert resolve_adam("foreach", cpu) == "foreach"
    real = torch.optim.Adam

    def adam_without_fused(params, *args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", adam_without_fused)
    assert not make_adam([torch.zeros(1, requires_grad=True)], 1e-3, 0.0).defaults.get("fused")  # the trainer's
    assert resolve_adam(None, cpu) == "default" and resolve_adam("foreach", cpu) == "foreach"
    with pytest.raises(ConfigError, match=r"--adam fused: torch \S+ has no fused Adam on cpu .*use --adam default"):
        resolve_adam("fused", cpu)
    res = run_train("power", "relgrad", steps=2, warmup=0, rounds=1, batch_size=8, data_root=tmp_path, log=print)
    assert res["adam"] == "default"
    argv = ["bench", "train", *POWER, "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    assert cli_main([*argv, "--adam", "fused"]) == 2
    assert "error: --adam fused: torch" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert cli_main(argv) == 0  # the trainer's own Adam: the file name has no -adam-<impl>, the record says which
    assert json.loads((tmp_path / "out" / "bench" / "train-power-relgrad.json").read_text())["adam"] == "default"
    assert cli_main([*argv, "--adam", "foreach"]) == 0
    assert (tmp_path / "out" / "bench" / "train-power-relgrad-adam-foreach.json").is_file()


def test_bench_train_settings_come_from_the_run_config():
    from flowbench.bench.train import run_settings

    batch, lr, hparams, line = run_settings("mnist", "relgrad")
    assert (batch, lr) == (10, 1e-4) and hparams["layers"] == 2  # configs/mnist/relgrad.toml, not batch 100
    assert "configs/mnist/relgrad.toml" in line and "given here: none" in line
    batch, lr, hparams, _ = run_settings("mnist", "relgrad", batch_size=50, lr=3e-4, hparams={"layers": 3})
    assert (batch, lr, hparams["layers"]) == (50, 3e-4, 3)
    assert run_settings("digits", "maf")[:2] == (100, 1e-4)
    with pytest.raises(ConfigError):
        run_settings("mnist", "relgrad", hparams={"nonsense": 1})


def test_bench_train_zuko_side_by_side(tmp_path):
    pytest.importorskip("zuko")
    from flowbench.bench.train import run_train

    res = run_train(
        "power",
        "maf",
        steps=2,
        warmup=1,
        rounds=1,
        batch_size=8,
        data_root=tmp_path,
        hparams={"hidden": 16, "hidden_layers": 2, "layers": 2},
        compare_zuko=True,
        log=lambda s: None,
    )
    ours, theirs = res["params"]["flowbench"], res["params"]["zuko"]
    assert abs(theirs - ours) / ours < 0.1  # matched parameter counts
    assert res["throughput_ratio_flowbench_over_zuko"] > 0


def test_cli_rejects_bad_input(tmp_path, capsys):
    assert cli_main(["bench", "gradients", "--dims", "4", "--methods", "relative,magic", "--out", str(tmp_path)]) == 2
    assert "magic" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "gradients", "--dims", "four"])


# -- options refused up front (issue 12) -------------------------------------------------------------------

POWER = ["--dataset", "power", "--model", "relgrad", "--steps", "2", "--device", "cpu"]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["train", *POWER, "--lr", "-1"], "--lr"),
        (["train", *POWER, "--lr", "nan"], "--lr"),
        (["train", *POWER, "--lr", "inf"], "--lr"),
        (["train", *POWER, "--lr", "0"], "--lr"),
        (["optim", "--lr", "nan"], "--lr"),
        (["optim", "--epochs", "0"], "--epochs"),
        (["optim", "--seed", "-1"], "--seed"),
        (["gradients", "--dims", "4", "--budget-s", "nan"], "--budget-s"),
        (["gradients", "--dims", "4", "--budget-s", "inf"], "--budget-s"),
        (["gradients", "--dims", "4", "--memory-limit-gb", "-1"], "--memory-limit-gb"),
        (["gradients", "--dims", "4", "--max-call-s", "nan"], "--max-call-s"),
        (["gradients", "--dims", "4", "--warmup", "-1"], "--warmup"),
        # flags the stack bench would ignore (it times flowbench's own trainers, fused Adam)
        (["train", *POWER, "--stack", "2", "--compare-zuko"], "--compare-zuko would be ignored"),
        (["train", *POWER, "--stack", "2", "--compile-zuko"], "--compile-zuko would be ignored"),
        (["train", *POWER, "--stack", "2", "--adam", "foreach"], "--adam foreach would be ignored"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, argv, flag):
    data = ["--data-root", str(tmp_path / "data")] if argv[0] == "train" else []
    assert cli_main(["bench", *argv, *data, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowbench bench: error:") and flag in err
    assert not (tmp_path / "out").exists()  # refused before the output folder was made


def test_bad_out_folder_is_a_clean_error(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli_main(["bench", "optim", "--points", "8", "--inits", "1", "--epochs", "1", "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and str(afile) in err
    assert (
        cli_main(["bench", "optim", "--points", "8", "--inits", "1", "--epochs", "1", "--out", str(afile / "sub")]) == 2
    )
    assert "cannot create the folder" in capsys.readouterr().err
    assert afile.read_text() == "x"


# -- gradients.png: skipped methods are marked, an empty plot is refused (issue 12) -------------------------


def _ok(method: str, dim: int, t: float) -> G.Cell:
    return G.Cell(method, dim, median_s=t, times_s=[t])


def _cells():
    ok = _ok
    return [
        ok("relative", 4, 1e-3),
        ok("relative", 8, 2e-3),
        ok("autodiff", 4, 3e-3),
        G.Cell("autodiff", 8, status="skipped-memory", note="predicted 9 GiB > limit 1 GiB"),
        G.Cell("autodiff", 16, status="skipped-memory", note="predicted 99 GiB > limit 1 GiB"),
        G.Cell("ordinary", 8, status="skipped-time", note="predicted 99 s per call > --max-call-s 1"),
    ]


def test_gradients_plot_marks_skipped_methods():
    from flowbench.plotting import pyplot

    fig, ax = pyplot().subplots()
    labels = G.draw(ax, _cells())
    assert "relative" in labels and "autodiff" in labels
    assert "autodiff skipped (memory): D = 8, 16" in labels
    assert "ordinary skipped (time): D = 8" in labels  # a method with no measured point still shows
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == labels
    marks = {c.get_label(): c.get_offsets()[:, 0].tolist() for c in ax.collections}
    assert marks["autodiff skipped (memory): D = 8, 16"] == [8, 16]
    pyplot().close(fig)


def test_gradients_plot_refuses_an_empty_plot(tmp_path, capsys):
    skipped = [c for c in _cells() if c.status != "ok"]
    with pytest.raises(FlowbenchError, match="nothing to plot"):
        G.plot(skipped, tmp_path / "g.png", "t")
    assert not (tmp_path / "g.png").exists()
    # end to end: every method predicted too big for a 1-byte limit; JSON and CSV still say why
    rc = cli_main(
        [
            "bench",
            "gradients",
            "--dims",
            "4",
            "--no-check",
            "--memory-limit-gb",
            "1e-9",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "nothing to plot" in err and "--memory-limit-gb" in err and "gradients.json" in err
    cells = json.loads((tmp_path / "bench" / "gradients.json").read_text())["cells"]
    assert {c["status"] for c in cells} == {"skipped-memory"}
    assert not (tmp_path / "bench" / "gradients.png").exists()


def _power_column():
    """tests/benchmarks/power_column.py as a module (a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / "benchmarks" / "power_column.py"
    spec = importlib.util.spec_from_file_location("power_column", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_power_column_estimates_from_the_step_budget_and_the_measured_epochs(tmp_path, capsys):
    """The cost-of-the-column benchmark on a 20-row POWER file: relgrad's epochs are its config's step budget over
    MAF's steps per epoch, the others' come from EPOCHS or --epochs, and every hour figure is epochs x s/epoch plus
    the test evaluation (recomputed here from the row's own timings)."""
    import math
    import shutil
    from pathlib import Path

    from flowbench.config import resolve_options

    pc = _power_column()
    (tmp_path / "power").mkdir()
    shutil.copy(Path(__file__).parent / "fixtures" / "raw" / "power" / "data.npy", tmp_path / "power" / "data.npy")
    out = tmp_path / "pc.json"
    common = ["--data-root", str(tmp_path), "--steps", "2", "--rounds", "1", "--seeds", "2", "--out", str(out)]
    assert pc.main([*common, "--only", "made-mog,relgrad"]) == 0
    rows = {(r["model"], r["hidden_layers"]): r for r in json.loads(out.read_text())["rows"]}
    budget = resolve_options({"dataset": "power", "model": "relgrad"}).max_steps
    steps_epoch = math.ceil(1_659_917 / 100)
    assert rows[("relgrad", None)]["epochs_assumed"] == math.ceil(budget / steps_epoch)
    assert rows[("made-mog", 1)]["epochs_assumed"] == rows[("made-mog", 2)]["epochs_assumed"] == pc.EPOCHS["made-mog"]
    for r in rows.values():
        assert r["steps_per_epoch"] == steps_epoch
        one = (r["epochs_assumed"] * r["s_epoch_single"] + r["eval_s_single"]) / 3600
        assert r["h_one_run"] == pytest.approx(one) and r["h_seeds_sequential"] == pytest.approx(2 * one)
        stacked = (r["epochs_assumed"] * r["s_epoch_stack"] + r["eval_s_stack"]) / 3600
        assert r["h_seeds_stacked"] == pytest.approx(stacked)
    # --epochs wins over the budget and over EPOCHS, by model and by family
    assert pc.main([*common, "--only", "made-mog,relgrad", "--epochs", "relgrad=7", "--epochs", "made-mog=3"]) == 0
    epochs = {r["model"]: r["epochs_assumed"] for r in json.loads(out.read_text())["rows"]}
    assert epochs == {"made-mog": 3, "relgrad": 7}
    assert pc.assumed_epochs("realnvp", None, steps_epoch, {"maf": 11}) == 11  # Real NVP is timed as MAF's family
    assert pc.assumed_epochs("maf", None, steps_epoch, {}) == pc.EPOCHS["maf"]


def test_power_column_without_power_exits_2_saying_how_to_get_it(tmp_path, capsys):
    pc = _power_column()
    with pytest.raises(SystemExit) as e:
        pc.main(["--data-root", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no POWER under the data root" in err and "flowbench download --dataset power" in err


def test_a_mistyped_dataset_is_refused_before_any_settings_are_printed(tmp_path, capsys):
    # It printed "settings of `flowbench run --dataset minibone …` from the defaults" and the machine line first.
    assert cli_main(["bench", "train", "--dataset", "minibone", "--model", "maf", "--out", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "unknown dataset 'minibone'" in err and "Traceback" not in err
