"""Figures from run records (`flowbench plot`): their content is checked, not just that a file appears.

Hand-written records (one helper, :func:`fake_record`) fix the numbers the curves must show; tiny real runs
(digits, an in-memory tabular set, a 2-D toy) check that the sampled model is the recorded one.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowbench import status as S
from flowbench.aggregate import chosen_runs
from flowbench.cli import main
from flowbench.data import DATASETS
from flowbench.data.base import Dataset
from flowbench.errors import ConfigError, FlowbenchError
from flowbench.plots import _records as R
from flowbench.plots._mpl import pyplot
from flowbench.plots.curves import LOSS_LABEL, VAL_LABEL, plot_curves
from flowbench.plots.samples import (
    choose_run,
    load_flow,
    logit_to_pixels,
    plot_samples,
    save_samples,
    tile,
)
from flowbench.results import RunRecord, record_path, write_record
from flowbench.tables import build_table

pytest.importorskip("sklearn")


# -- fixtures -----------------------------------------------------------------------------------------------


def fake_record(
    dataset,
    model,
    display,
    seed,
    val,
    *,
    train=None,
    best_epoch=None,
    stop="no improvement for 3 epochs",
    status="ok",
    failure=None,
    tag=None,
    test_ll=None,
    wall=1.5,
):
    """A record with history ``val`` (validation LL per epoch); the other fields follow from it."""
    val = list(val)
    train = list(train) if train is not None else [-v + 1.0 for v in val]
    if best_epoch is None and val:
        best_epoch = int(np.argmax(val)) + 1
    return RunRecord.example(
        dataset=dataset,
        model=model,
        display_name=display,
        tag=tag,
        seed=seed,
        config={},
        hparams={},
        params=100,
        epochs=len(val),
        best_epoch=best_epoch,
        best_val_ll=max(val) if val else -5.0,
        test_ll=test_ll if test_ll is not None else (max(val) if val else -5.0) - 0.1,
        test_ll_2se=0.05,
        n_test=DATASETS[dataset].sizes[2],  # stands for a run on the paper's test split
        wall_time_s=wall,
        device="cpu",
        torch="x",
        python="3",
        timestamp="t",
        status=status,
        failure=failure,
        stop_reason=stop,
        history=[{"epoch": i + 1, "train_loss": t, "val_ll": v} for i, (t, v) in enumerate(zip(train, val))],
    )


def write_fakes(out: Path, recs) -> list[dict]:
    for r in recs:
        write_record(record_path(out, r.dataset, r.model, r.seed, r.tag), r)
    return R.load_runs(out)


# Three seeds of MAF (5) on digits stopped by patience at different epochs; MADE capped; the Gaussian closed-form;
# MAF (5) on power (published 0.14 in the MAF paper).
MAF_VAL = {0: [-50, -40, -35, -36, -37, -38], 1: [-52, -41, -34, -35, -36], 2: [-49, -39, -33, -32, -34, -35, -36]}


def curve_records():
    recs = [fake_record("digits", "maf", "MAF (5)", s, v) for s, v in MAF_VAL.items()]
    recs.append(fake_record("digits", "made", "MADE", 0, [-80, -70, -60], stop="reached max_epochs=3"))
    recs.append(fake_record("digits", "gaussian", "Gaussian", 0, [], stop="closed-form fit (not trainable)"))
    recs[-1].best_val_ll = -45.0
    recs.append(fake_record("power", "maf", "MAF (5)", 0, [-1.0, -0.5, 0.1, 0.05]))
    return recs


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """Tiny real runs: MAF on digits (2 seeds), the Gaussian on digits, MAF on a 3-D tabular set, relgrad on moons."""
    from flowbench.sanity.toy2d import make_toy
    from flowbench.training import run_experiment

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("real")
    base = {"out": str(out), "device": "cpu", "max_epochs": 2, "lr": 1e-3, "data_root": str(out / "data")}
    for seed in (0, 1):
        run_experiment(
            {**base, "dataset": "digits", "model": "maf", "seed": seed, "hidden": 16, "layers": 1}, progress=False
        )
    run_experiment({**base, "dataset": "digits", "model": "gaussian"}, progress=False)
    rng = np.random.default_rng(0)
    tab = Dataset("tab3", *(rng.standard_normal((n, 3)).astype(np.float32) * [1, 2, 0.5] for n in (600, 100, 200)))
    run_experiment({**base, "model": "maf", "hidden": 8, "layers": 1}, data=tab, progress=False)
    toy = make_toy("moons", 0, n_train=500, n_val=100, n_test=100)
    run_experiment({**base, "model": "relgrad", "max_epochs": 1}, data=toy, progress=False)
    torch.set_num_threads(threads)
    return out, tab


# -- record accessors and run status --------------------------------------------------------------------------


def test_status_kinds_and_convergence_note():
    converged = fake_record("power", "maf", "MAF (5)", 0, [1, 2, 1], stop="no improvement for 30 epochs")
    capped = fake_record("power", "maf", "MAF (5)", 1, [1, 2, 3], stop="reached max_epochs=3")
    nonfinite = fake_record(
        "power",
        "maf",
        "MAF (5)",
        2,
        [1],
        stop="non-finite loss",
        status="nonfinite",
        failure="non-finite training loss (nan) at epoch 2, batch 7",
    )
    gauss = fake_record("power", "gaussian", "Gaussian", 0, [], stop="closed-form fit (not trainable)")
    assert [S.run_status(r).kind for r in (converged, capped, nonfinite, gauss)] == [
        "converged",
        "capped",
        "nonfinite",
        "closed-form",
    ]
    assert S.run_status(converged).text == "converged: patience 30 ran out (best epoch 2 of 3)"
    assert "--max-epochs 3" in S.run_status(capped).text and not S.run_status(capped).comparable
    assert "at epoch 2, batch 7" in S.run_status(nonfinite).text
    assert S.convergence_note([converged, gauss]) is None
    # a capped run whose test LL came out non-finite is footnoted by its status already, not as "capped"
    bad_test = fake_record(
        "power",
        "maf",
        "MAF (5)",
        3,
        [1, 2],
        stop="reached max_epochs=2",
        status="nonfinite",
        failure="test log-likelihood is not finite",
    )
    assert S.convergence_note([nonfinite, bad_test]) is None and S.run_status(bad_test).kind == "nonfinite"
    note = S.convergence_note([converged, capped])
    assert note.startswith(S.NOT_CONVERGED) and "seed 1: --max-epochs 3" in note
    assert S.summary([converged, capped, capped]) == "1 converged, 2 capped"
    # the legend's words are the report's and figures.md's, not the kinds' keys ("1 budget", "1 nonfinite")
    budget = fake_record("power", "maf", "MAF (5)", 4, [1, 2], stop="reached max_steps=200")
    assert S.summary([nonfinite, budget, gauss]) == "1 step budget spent, 1 closed-form, 1 non-finite"


def test_table_footnotes_only_the_capped_cell(tmp_path):
    recs = write_fakes(
        tmp_path,
        [
            fake_record("power", "maf", "MAF (5)", 0, [0.1, 0.2, 0.15], test_ll=0.19),
            fake_record("gas", "maf", "MAF (5)", 0, [1.0, 2.0], test_ll=1.9, stop="reached max_epochs=2"),
        ],
    )
    text = build_table(recs, [], "best-val")
    row = next(ln for ln in text.splitlines() if ln.startswith("| MAF (5)"))
    power, gas = (c.strip() for c in row.split("|")[3:5])
    assert power == "**0.19 ± 0.05**"  # converged: no mark
    assert gas == "**1.90 ± 0.05** [1]" and f"[1] {S.NOT_CONVERGED} (seed 0: --max-epochs 2)" in text
    assert R.load_runs(tmp_path)[0].status == "ok"  # the records on disk are untouched


def test_accessors_read_run_records():
    d = fake_record("power", "maf", "MAF (5)", 3, [0.1, 0.3])
    assert R.label(d) == "MAF (5)" and R.seed(d) == 3 and R.test_ll_2se(d) == 0.05
    np.testing.assert_array_equal(R.history(d).val_ll, [0.1, 0.3])
    again = RunRecord.from_json(d.to_json())
    assert S.run_status(again) == S.run_status(d)


def test_selection_errors_name_what_exists():
    recs = curve_records()
    with pytest.raises(ConfigError, match="no records for model realnvp; the results hold: gaussian, made, maf"):
        R.select_runs(recs, models=["realnvp"])
    with pytest.raises(ConfigError, match="dataset mnist"):
        R.select_runs(recs, datasets=["mnist"])
    assert {R.model(r) for r in R.select_runs(recs, ["digits"], ["maf", "made"])} == {"maf", "made"}


def test_best_configuration_by_validation_not_test():
    recs = [
        fake_record("power", "maf", "MAF (5)", 0, [0.5], tag="a", test_ll=0.0),
        fake_record("power", "maf", "MAF (5)", 0, [0.1], tag="b", test_ll=9.0),
    ]
    assert [R.tag(r) for r in chosen_runs(recs)] == ["a"]


# -- curves ----------------------------------------------------------------------------------------------------


def _by_gid(ax, gid):
    return [a for a in ax.get_children() if a.get_gid() == gid]


def test_curves_content():
    fig = plot_curves(curve_records())
    axes = np.array(fig.axes).reshape(-1, 2) if len(fig.axes) == 4 else None
    assert axes is not None, "2 datasets × (validation, training loss)"
    (val_p, loss_p), (val_d, loss_d) = axes  # power before digits: the table's column order
    assert val_p.get_title().startswith("POWER") and val_d.get_title() == "DIGITS: validation LL (logit space)"
    for ax in (val_p, val_d):
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == VAL_LABEL and "nats" in VAL_LABEL
    assert loss_d.get_ylabel() == LOSS_LABEL

    # digits: MAF (5) and MADE are curves, the Gaussian a level; one colour each
    means = _by_gid(val_d, "val-mean")
    assert len(means) == 2
    maf = next(ln for ln in means if ln.get_label().startswith("MAF (5)"))
    # mean over the seeds still running: epochs 1-5 all three, 6 seeds 0 and 2, 7 seed 2 only
    m = np.array([[*v, *[np.nan] * (7 - len(v))] for v in MAF_VAL.values()])
    np.testing.assert_allclose(maf.get_ydata(), np.nanmean(m, 0))
    np.testing.assert_array_equal(maf.get_xdata(), np.arange(1, 8))
    assert len(_by_gid(val_d, "val-band")) == 1  # MADE has a single seed: no band
    assert "3 seeds · 3 converged" in maf.get_label()
    made = next(ln for ln in means if ln.get_label().startswith("MADE"))
    assert "1 capped" in made.get_label()
    assert len({ln.get_color() for ln in means}) == 2
    (level,) = _by_gid(val_d, "closed-form")
    assert level.get_ydata()[0] == -45.0

    # stars at each seed's best epoch and its validation LL
    stars = {tuple(zip(s.get_xdata(), s.get_ydata())) for s in _by_gid(val_d, "best-epoch")}
    assert ((3, -35.0), (3, -34.0), (4, -32.0)) in stars and ((3, -60.0),) in stars

    # published MAF (5) on POWER: 0.14 (MAF paper, Table 1); none for digits
    (pub,) = _by_gid(val_p, "published")
    assert pub.get_ydata()[0] == pytest.approx(0.14)
    assert not _by_gid(val_d, "published")
    legend = [t.get_text() for t in loss_p.get_legend().get_texts()]
    assert "published test LL" in legend and "best epoch (restored)" in legend
    lo, hi = val_p.get_ylim()
    assert lo < -0.5 < 0.14 < hi  # the published level and the best epoch are inside the axes
    pyplot().close(fig)


def test_curves_stay_readable_with_eight_models():
    names = ["Gaussian", "MADE", "MADE MoG", "Real NVP (5)", "Real NVP (10)", "MAF (5)", "MAF (10)", "MAF MoG (5)"]
    recs = [fake_record("gas", f"m{i}", n, 0, list(np.linspace(-5, i, 5))) for i, n in enumerate(names)]
    fig = plot_curves(recs, train_loss=False)
    (ax,) = fig.axes
    means = _by_gid(ax, "val-mean")
    assert len(means) == 8 and len({ln.get_color() for ln in means}) == 8
    assert [ln.get_label().split(" · ")[0] for ln in means] == names  # the table's row order
    assert len(ax.get_legend().get_texts()) == 8 + 2  # models, best-epoch star, published line
    pyplot().close(fig)


def test_curves_cli_and_errors(tmp_path, capsys, monkeypatch):
    from flowbench.plots import curves

    write_fakes(tmp_path, curve_records())
    assert len({(r.dataset, r.model) for r in curve_records()}) > 1  # so that the filter has work to do
    drawn: list = []
    real = curves.save_curves
    monkeypatch.setattr(curves, "save_curves", lambda records, *a, **k: drawn.extend(records) or real(records, *a, **k))
    out = tmp_path / "c.png"
    assert (
        main(["plot", "curves", "--results", str(tmp_path), "--dataset", "digits", "--model", "maf", "--out", str(out)])
        == 0
    )
    assert drawn and {(r.dataset, r.model) for r in drawn} == {("digits", "maf")}  # the CLI's filters reach the plot
    img = pyplot().imread(out)
    assert img.shape[0] > 200 and img.std() > 0.05
    assert main(["plot", "curves", "--results", str(tmp_path), "--model", "nsf"]) == 2
    assert "no records for model nsf" in capsys.readouterr().err
    assert main(["plot", "curves", "--results", str(tmp_path / "nothing")]) == 2


# -- samples ---------------------------------------------------------------------------------------------------


def test_logit_to_pixels_inverts_the_digits_transform():
    from flowbench.data._common import logit
    from flowbench.data.digits import LOGIT_ALPHA

    x = np.random.default_rng(0).random((5, 64))
    y = logit(LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * x)
    np.testing.assert_allclose(logit_to_pixels(y, LOGIT_ALPHA), x, atol=1e-9)
    assert logit_to_pixels(np.array([-1e4, 1e4]), LOGIT_ALPHA).tolist() == [0.0, 1.0]  # clipped, no overflow


def test_tile_places_images_row_major():
    imgs = np.arange(5)[:, None, None] * np.ones((5, 2, 3))
    grid = tile(imgs, cols=3, pad=-1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1)
    assert grid[1, 1] == 0 and grid[1, 5] == 1 and grid[4, 1] == 3 and grid[4, 5] == 4
    assert grid[4, 9] == -1 and grid[0, 0] == -1  # the empty sixth slot and the separators


def test_rebuilt_model_is_the_recorded_one(real_runs):
    from flowbench.data import load_dataset

    out, _ = real_runs
    rec = next(r for r in R.load_runs(out) if (r.dataset, r.model, r.seed) == ("digits", "maf", 1))
    data = load_dataset("digits")
    flow = load_flow(rec, data)
    with torch.no_grad():
        ll = flow.log_prob(torch.as_tensor(data.test)).double().mean().item()
    assert ll == pytest.approx(rec.test_ll, abs=1e-4)  # best state, batch-norm statistics included


def test_image_grid_beside_test_images(real_runs):
    from flowbench.data import load_dataset

    out, _ = real_runs
    runs = [r for r in R.load_runs(out) if r.dataset == "digits" and r.model == "maf"]
    rec = choose_run(runs)
    assert rec.best_val_ll == max(r.best_val_ll for r in runs)  # best validation seed
    fig = plot_samples(rec, n=16, seed=3)
    left, right = fig.axes
    (s_img,), (t_img,) = left.get_images(), right.get_images()
    s, t = np.ma.getdata(s_img.get_array()), np.ma.getdata(t_img.get_array())
    assert s.shape == t.shape == (4 * 9 + 1, 4 * 9 + 1)  # 16 images of 8 × 8 in a 4 × 4 grid
    cells = s[1:, 1:].reshape(4, 9, 4, 9)[:, :8, :, :8]
    assert 0 <= cells.min() and cells.max() <= 1 and cells.std() > 0.05  # pixels, not a blank grid
    data = load_dataset("digits")
    np.testing.assert_allclose(t, tile(logit_to_pixels(data.test[:16], data.logit_alpha).reshape(-1, 8, 8), 4))
    assert "16 samples" in left.get_title() and "16 test images" in right.get_title()
    assert f"seed {rec.seed}" in fig._suptitle.get_text()
    # same sampling seed, same samples; another seed, others
    again = np.ma.getdata(plot_samples(rec, n=16, seed=3).axes[0].get_images()[0].get_array())
    other = np.ma.getdata(plot_samples(rec, n=16, seed=4).axes[0].get_images()[0].get_array())
    assert np.array_equal(s, again) and not np.array_equal(s, other)
    pyplot().close("all")


def test_pairwise_samples_against_test_data(real_runs):
    out, tab = real_runs
    rec = next(r for r in R.load_runs(out) if r.dataset == "tab3")
    fig = plot_samples(rec, tab, n=150, dims=[0, 2])
    visible = [ax for ax in fig.axes if ax.axison]
    assert len(visible) == 3  # two histograms and one scatter (lower triangle of 2 × 2)
    scatter = fig.axes[2]  # row 1, column 0: dim 2 against dim 0
    test_pts, sample_pts = scatter.collections
    assert len(test_pts.get_offsets()) == 150 and len(sample_pts.get_offsets()) == 150
    assert scatter.get_xlabel() == "dim 0" and scatter.get_ylabel() == "dim 2"
    assert np.ptp(sample_pts.get_offsets()[:, 1]) > 0.1
    with pytest.raises(ConfigError, match="distinct dimensions in 0..2"):
        plot_samples(rec, tab, dims=[0, 3])
    pyplot().close("all")


def test_toy2d_record_gets_the_density_figure(real_runs, tmp_path):
    out, _ = real_runs
    rec = next(r for r in R.load_runs(out) if r.dataset == "toy2d-moons")
    from flowbench.sanity.toy2d import make_toy

    path = save_samples(rec, tmp_path / "toy.png", data=make_toy("moons", 0, n_train=500, n_val=100, n_test=100))
    img = pyplot().imread(path)
    assert img.shape[1] > 1.5 * img.shape[0] and img.std() > 0.05  # data | density, side by side


def test_samples_cli(real_runs, tmp_path, capsys):
    out, _ = real_runs
    png = tmp_path / "s.png"
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
                "maf",
                "--seed",
                "0",
                "-n",
                "9",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    assert "MAF (1), seed 0" in capsys.readouterr().out and pyplot().imread(png).std() > 0.05
    assert main(["plot", "samples", "--results", str(out), "--dataset", "digits", "--model", "maf", "--seed", "7"]) == 2
    assert "recorded seeds: [0, 1]" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clean_error(tmp_path):
    (rec,) = write_fakes(tmp_path, [fake_record("digits", "maf", "MAF (5)", 0, [1.0])])
    rec.hparams = {"layers": 1, "hidden": 4}
    with pytest.raises(ConfigError, match="no checkpoint at .*seed0.ckpt"):
        plot_samples(rec)


# -- tensorboard -----------------------------------------------------------------------------------------------


def test_tensorboard_logs_the_record_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowbench.training import run_experiment
    from flowbench.training.tensorboard import run_log_dir

    log_dir = run_log_dir(tmp_path / "tb", "digits", "maf", 0, "small")
    assert log_dir == tmp_path / "tb" / "digits" / "maf" / "small" / "seed0"
    # `flowbench run --tensorboard DIR` is the option below
    rec = run_experiment(
        {
            "dataset": "digits",
            "model": "maf",
            "hidden": 8,
            "layers": 1,
            "max_epochs": 3,
            "lr": 1e-3,
            "out": str(tmp_path),
            "device": "cpu",
            "tag": "small",
            "tensorboard": str(tmp_path / "tb"),
        },
        progress=False,
    )
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in ("train_loss", "val_ll", "best_val_ll")}
    hist = rec.history
    assert [s for s, _ in got["val_ll"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in got["train_loss"]], [h["train_loss"] for h in hist], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in got["val_ll"]], [h["val_ll"] for h in hist], rtol=1e-6)
    np.testing.assert_allclose(
        [v for _, v in got["best_val_ll"]], np.maximum.accumulate([h["val_ll"] for h in hist]), rtol=1e-6
    )
    assert got["best_val_ll"][-1][1] == pytest.approx(rec.best_val_ll, rel=1e-6)


def test_tensorboard_missing_package_says_how_to_install(monkeypatch, tmp_path):
    from flowbench.training.tensorboard import tensorboard_callback

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(FlowbenchError, match=r'pip install "flowbench\[tensorboard\]"'):
        tensorboard_callback(tmp_path)


def test_nan_history_values_are_gaps_not_errors():
    rec = fake_record("power", "maf", "MAF (5)", 0, [0.1, 0.2])
    rec.history[0]["val_ll"] = None  # json_safe writes NaN as null
    assert math.isnan(R.history(rec).val_ll[0])
    pyplot().close(plot_curves([rec]))
