"""MAF Table 2's run side: how a run ended is a record field, a conditional model's test figures, and the memory
check before a run the device cannot hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

import flowbench.status as S
from flowbench.results import RunRecord
from flowbench.training.evaluate import summarize_conditional


def test_status_reads_the_trainers_field_before_the_prose():
    """``ended`` decides; ``stop_reason`` is only read for records written before the field."""
    capped = RunRecord.example(ended="capped", stop_reason="whatever the words", config={"max_epochs": 7})
    assert S.run_status(capped).kind == "capped" and "--max-epochs 7" in S.run_status(capped).text
    assert S.is_capped(capped) and "--max-epochs 7" in S.convergence_note([capped])
    conv = RunRecord.example(ended="converged", stop_reason="reached max_epochs=3", config={"patience": 30})
    assert S.run_status(conv).kind == "converged" and not S.is_capped(conv)  # the field wins over the prose
    budget = RunRecord.example(ended="budget", stop_reason="", config={"max_steps": 500, "eval_every": 100})
    assert S.run_status(budget).text.startswith("step budget spent: --max-steps 500")
    legacy = RunRecord.example(stop_reason="reached max_epochs=4")  # no field: parsed as before
    assert legacy.ended is None and S.run_status(legacy).kind == "capped"
    assert RunRecord.from_json(capped.to_json()).ended == "capped"


def test_trainer_writes_how_the_run_ended(tmp_path):
    from flowbench.data.base import Dataset
    from flowbench.training.experiment import run_experiment

    rng = np.random.default_rng(0)
    data = Dataset("tab2", *(rng.standard_normal((n, 2)).astype(np.float32) for n in (200, 50, 50)))
    base = {"out": str(tmp_path), "model": "maf", "hidden": 4, "layers": 1, "device": "cpu"}
    capped = run_experiment({**base, "max_epochs": 2}, data=data, progress=False)
    assert (capped.ended, capped.stop_reason) == ("capped", "reached max_epochs=2")
    done = run_experiment({**base, "seed": 1, "patience": 1, "max_epochs": 50}, data=data, progress=False)
    assert done.ended == "converged" and S.run_status(done).kind == "converged"
    gauss = run_experiment({"out": str(tmp_path), "model": "gaussian", "device": "cpu"}, data=data, progress=False)
    assert gauss.ended == "closed-form"


def test_conditional_summary_is_the_marginal_under_a_uniform_prior():
    """Two 1-D classes N(−2, 1) and N(2, 1): log p(x) = log(½ N(x; −2, 1) + ½ N(x; 2, 1)), computed directly."""
    x = np.array([-3.0, -0.5, 0.0, 1.0, 2.5])
    labels = np.array([0, 0, 1, 1, 1])
    class_lp = np.stack([norm.logpdf(x, -2), norm.logpdf(x, 2)], axis=1)
    marginal, fields = summarize_conditional(class_lp, labels)
    direct = np.log(0.5 * norm.pdf(x, -2) + 0.5 * norm.pdf(x, 2))
    np.testing.assert_allclose(marginal, direct, rtol=1e-12)
    at = class_lp[np.arange(5), labels]
    assert fields["test_ll_conditional"] == pytest.approx(at.mean(), abs=1e-12)
    assert fields["test_ll_conditional_2se"] == pytest.approx(2 * at.std() / math.sqrt(5), abs=1e-12)
    # argmax picks class 0 for x < 0 and class 1 for x > 0; x = 0 ties (argmax takes 0) and its label is 1
    assert fields["test_accuracy"] == pytest.approx(4 / 5) and fields["conditional"] is True


def test_a_run_the_device_cannot_hold_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import flowbench.utils as U
    from flowbench.cli import main

    monkeypatch.setattr(U, "available_memory", lambda device="cpu": 1 << 20)  # 1 MiB free
    code = main(
        [
            "run",
            "--dataset",
            "digits",
            "--model",
            "maf",
            "--hidden",
            "64",
            "--out",
            str(tmp_path),
            "--max-epochs",
            "1",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "parameters: training one run needs about" in err and "GiB is free" in err
    assert "Traceback" not in err and not list(tmp_path.rglob("*.json"))  # nothing written


# -- end to end on the raw-format fixtures ------------------------------------------------------------------------

RAW = __import__("pathlib").Path(__file__).resolve().parent / "fixtures" / "raw"


def _root(tmp_path, *names):
    import shutil

    root = tmp_path / "data"
    for name in names:
        shutil.copytree(RAW / name, root / name)
    return root


def _cli(*argv):
    from flowbench.cli import main

    return main(["run", "--quiet", "--device", "cpu", *argv])


def test_conditional_mnist_run_end_to_end(tmp_path, capsys):
    """maf-cond on the MNIST-format fixture: the record's test LL is the marginal over labels, computed here
    again from the saved model through the flow's own ``marginal_log_prob``; the table shows it in MNIST cond."""
    import json

    import torch

    from flowbench.data import load_dataset
    from flowbench.models import build_model
    from flowbench.results import iter_records
    from flowbench.tables import build_table
    from flowbench.training.trainer import best_model_state

    root, out = _root(tmp_path, "mnist"), tmp_path / "out"
    code = _cli(
        "--dataset",
        "mnist",
        "--model",
        "maf-cond",
        "--data-root",
        str(root),
        "--out",
        str(out),
        "--hidden",
        "8",
        "--hidden-layers",
        "1",
        "--layers",
        "2",
        "--max-epochs",
        "2",
    )
    assert code == 0, capsys.readouterr().err
    path = out / "runs" / "mnist" / "maf-cond" / "seed0.json"
    rec = json.loads(path.read_text())
    assert rec["conditional"] is True and rec["model"] == "maf-cond" and rec["display_name"] == "MAF (2)"
    data = load_dataset("mnist", root)
    flow = build_model("maf-cond", 784, classes=10, **rec["hparams"])
    flow.load_state_dict(best_model_state(path.with_name("seed0.model.pt")))
    flow.eval()
    x = torch.as_tensor(data.test)
    with torch.no_grad():
        marginal = flow.marginal_log_prob(x).double().numpy()
        at_label = flow.log_prob(torch.cat([x, torch.as_tensor(data.one_hot("test"))], 1)).double().numpy()
    assert rec["test_ll"] == pytest.approx(float(marginal.mean()), rel=1e-6)
    assert rec["test_ll_conditional"] == pytest.approx(float(at_label.mean()), rel=1e-6)
    assert 0 <= rec["test_accuracy"] <= 1 and rec["bits_per_pixel"] is not None
    table = build_table(list(iter_records(out)), ["maf"], "best-val", datasets=["mnist-cond"])
    row = next(ln for ln in table.splitlines() if ln.startswith("| MAF (2) ") and "| ours" in ln)
    assert f"{rec['test_ll']:.2f}" in row and "MNIST cond." in table
    from flowbench.cli import main

    assert main(["report", "--results", str(out), "--out", str(tmp_path / "report.md")]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| mnist-cond " in report and "MAF (2) (class-conditional)" in report  # its runs row and samples


def test_conditional_stack_equals_single_runs(tmp_path):
    """Stacked seeds of a conditional model train as the single runs do."""
    import json

    root = _root(tmp_path, "mnist")
    common = [
        "--dataset",
        "mnist",
        "--model",
        "made-cond",
        "--data-root",
        str(root),
        "--hidden",
        "8",
        "--max-epochs",
        "2",
    ]
    assert _cli(*common, "--seeds", "0-1", "--out", str(tmp_path / "stack")) == 0
    assert _cli(*common, "--seed", "1", "--out", str(tmp_path / "one")) == 0
    stacked = json.loads((tmp_path / "stack/runs/mnist/made-cond/seed1.json").read_text())
    single = json.loads((tmp_path / "one/runs/mnist/made-cond/seed1.json").read_text())
    assert stacked["test_ll"] == pytest.approx(single["test_ll"], rel=1e-5)
    assert stacked["best_val_ll"] == pytest.approx(single["best_val_ll"], rel=1e-5)


def test_cifar10_format_runs_end_to_end(tmp_path, capsys):
    """An unconditional MAF with MAF's random degrees and a conditional MADE on the CIFAR-10-format fixture;
    bits/pixel from α = 0.05 beside the logit-space LL."""
    import json

    root, out = _root(tmp_path, "cifar10"), tmp_path / "out"
    assert (
        _cli(
            "--dataset",
            "cifar10",
            "--model",
            "maf",
            "--data-root",
            str(root),
            "--out",
            str(out),
            "--hidden",
            "16",
            "--layers",
            "2",
            "--degrees",
            "random",
            "--max-epochs",
            "1",
        )
        == 0
    )
    assert (
        _cli(
            "--dataset",
            "cifar10",
            "--model",
            "made-cond",
            "--data-root",
            str(root),
            "--out",
            str(out),
            "--hidden",
            "16",
            "--degrees",
            "random",
            "--max-epochs",
            "1",
        )
        == 0
    ), capsys.readouterr().err
    maf = json.loads((out / "runs/cifar10/maf/seed0.json").read_text())
    cond = json.loads((out / "runs/cifar10/made-cond/seed0.json").read_text())
    assert maf["hparams"]["degrees"] == "random" and not maf.get("conditional")
    assert cond["conditional"] is True and cond["n_test"] == 3
    for r in (maf, cond):  # bits/pixel = −(pixel LL)/(3072 ln 2) + 8
        assert r["bits_per_pixel"] == pytest.approx(-r["test_ll_pixel"] / (3072 * math.log(2)) + 8, rel=1e-12)


def test_conditional_model_on_unlabelled_data_is_refused(tmp_path, capsys):
    code = _cli("--dataset", "digits", "--model", "maf", "--out", str(tmp_path), "--max-epochs", "1")
    assert code == 0  # digits has labels, an unconditional model ignores them
    capsys.readouterr()
    root = _root(tmp_path, "power")
    code = _cli("--dataset", "power", "--model", "maf-cond", "--data-root", str(root), "--out", str(tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and "class-conditional" in err and "power has none" in err and "maf" in err
    assert "Traceback" not in err


def test_rows_keep_a_plugged_in_namesake_apart_but_join_conditional_twins():
    from flowbench.aggregate import row_labels

    ours = RunRecord.example(dataset="power", model="maf", display_name="MAF (5)")
    theirs = RunRecord.example(dataset="gas", model="user.py:SPEC", display_name="MAF (5)")
    cond = RunRecord.example(dataset="mnist", model="maf-cond", display_name="MAF (5)", conditional=True)
    assert row_labels([ours, theirs]) == ["MAF (5) (maf)", "MAF (5) (user.py:SPEC)"]
    assert row_labels([ours, cond]) == ["MAF (5)", "MAF (5)"]


def test_measuring_a_step_leaves_a_data_initialised_model_as_it_was():
    """A model that sets itself from its first training batch (ActNorm-like) is measured without keeping it."""
    import torch

    from flowbench.models.base import Flow
    from flowbench.training.lifecycle import step_memory

    class FirstBatchInit(Flow):
        def __init__(self):
            super().__init__(torch.nn.Identity(), None, 3)
            self.shift = torch.nn.Parameter(torch.zeros(3))
            self.register_buffer("ready", torch.zeros(()))

        def train_log_prob(self, x):
            if not self.ready:
                with torch.no_grad():
                    self.shift.copy_(-x.mean(0) + 1.0)
                    self.ready.fill_(1)
            return -(x + self.shift).pow(2).sum(-1)

    flow = FirstBatchInit()
    assert step_memory(flow, 10) > 0
    assert float(flow.ready) == 0 and torch.equal(flow.shift, torch.zeros(3))  # not initialised on the zeros


def test_a_knob_named_like_a_commands_option_is_refused_clearly(tmp_path, capsys):
    """Model hyperparameters are the commands' generated flags; one named like the command's own option (a
    plugged-in model's ``perturb`` against check-model's --perturb) is an exit-2 message, not argparse's crash."""
    from flowbench.cli import main

    (tmp_path / "knobs.py").write_text(
        "from flowbench.models import HParam, ModelSpec\n"
        "from flowbench.models.maf import build_maf\n"
        "SPEC = ModelSpec(name='knobs', label='Knobs', paper='test', lr=1e-3,\n"
        "    build=lambda dim, *, perturb, layers: build_maf(dim, layers=layers, hidden=8, hidden_layers=1,\n"
        "        activation='relu', batch_norm=False),\n"
        "    hparams={'perturb': HParam(1, 'p', low=0), 'layers': HParam(2, 'l', low=1)})\n"
    )
    code = main(["check-model", f"{tmp_path / 'knobs.py'}:SPEC", "--check", "log-det"])
    err = capsys.readouterr().err
    assert code == 2 and "perturb have the name of this command's own option(s) --perturb" in err
    assert "Traceback" not in err


def test_a_nan_validation_score_is_no_improvement_and_training_goes_on():
    """MAF's trainer compares ``val_loss < best``, false for NaN: an evaluation whose every validation point is
    non-finite (whole-training-set batch-norm statistics overflowed by a few extreme rows) counts as no
    improvement; the run trains on and ends by patience with its best state."""
    import numpy as np
    import torch
    from toy_flows import tiny_flow

    from flowbench.data.base import Dataset
    from flowbench.training.trainer import Trainer

    class NaNAtEpoch3(type(tiny_flow(2))):
        evals = 0

        def prepare_for_eval(self, train_x, batch_size=10_000):
            type(self).evals += 1

        def log_prob(self, x):
            out = super().log_prob(x)
            return torch.full_like(out, float("nan")) if not self.training and type(self).evals == 3 else out

    flow = tiny_flow(2)
    flow.__class__ = NaNAtEpoch3
    rng = np.random.RandomState(0)
    data = Dataset("toy", *(rng.standard_normal((n, 2)).astype(np.float32) for n in (300, 100, 100)))
    res = Trainer(
        flow, torch.as_tensor(data.train), torch.as_tensor(data.val), lr=1e-2, patience=2, max_epochs=8, progress=False
    ).fit()
    vals = [h["val_ll"] for h in res.history]
    assert res.status == "ok" and math.isnan(vals[2]) and len(vals) > 3  # trained on past the NaN epoch
    assert res.best_epoch != 3 and math.isfinite(res.best_val_ll)
