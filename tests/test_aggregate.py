"""From records to table cells (:mod:`flowbench.aggregate`, :mod:`flowbench.tables`): each rule checked against
an independent computation on records shaped like a real sweep's, and the MAF paper's bolding rule (a paired
t-test on the per-point test log-likelihoods) against ``scipy.stats.ttest_rel`` on constructed data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from flowbench.aggregate import ALPHA, choose, chosen_runs, paired_pvalue
from flowbench.cli import main
from flowbench.data.base import Dataset
from flowbench.results import (
    RunRecord,
    iter_records,
    per_point_path,
    read_per_point,
    record_path,
    sha256_of_test_set,
    write_per_point,
    write_record,
)
from flowbench.status import NOT_CONVERGED
from flowbench.tables import CONFIG_UNVERIFIED_NOTE, NO_POINTS_NOTE, OTHER_POINTS_NOTE, build_table

# -- a sweep's records: several tags × seeds, a tie, a failed seed, a −∞ seed, capped runs, matched, unverified --

#: (dataset, model, display name, tag) → per seed: (best val LL, test LL, test 2 SE); the values the rules see.
MAF_A = {0: (0.25, 0.25, 0.010), 1: (0.5, 0.27, 0.030), 2: (0.75, 0.20, 0.014)}  # mean val 0.5
MAF_B = {0: (0.375, 0.40, 0.01), 1: (0.625, 0.41, 0.01)}  # mean val 0.5: an exact tie with "a"; "a" sorts first
MAF_C = {0: (0.0, 0.60, 0.01), 1: (0.9, 0.61, 0.01)}  # best single seed (0.9) but mean val 0.45: never chosen
MADE_POWER = {0: (0.1, 0.30, 0.01), 1: (0.2, 0.34, 0.02)}  # both capped by --max-epochs
MAF_GAS = {0: (9.0, 9.0, 0.02), 1: (9.1, 9.2, 0.02), 2: (9.05, -math.inf, None)}  # seed 2: −∞ test LL
FAILED_SEED = 3  # of tag "a": status nonfinite, with a tempting validation LL 9.0 and test LL 5.0


def rec(dataset, model, display, seed, val, test, se2, tag=None, **kw):
    base = dict(
        dataset=dataset,
        model=model,
        display_name=display,
        tag=tag,
        seed=seed,
        config={},
        params=10,
        epochs=40,
        best_epoch=10,
        best_val_ll=val,
        test_ll=test,
        test_ll_2se=se2,
        n_test=100,
        wall_time_s=1.0,
        device="cpu",
        torch="x",
        python="3",
        timestamp="t",
        stop_reason="no improvement for 30 epochs",
        history=[{"epoch": i, "train_loss": -val, "val_ll": val - 1.0 / i} for i in range(1, 11)],
    )
    return RunRecord.example(**{**base, **kw})


def sweep_records() -> list[RunRecord]:
    out = []
    for tag, seeds in (("a", MAF_A), ("b", MAF_B), ("c", MAF_C)):
        out += [rec("power", "maf", "MAF (5)", s, *v, tag=tag) for s, v in seeds.items()]
    out.append(
        rec(
            "power",
            "maf",
            "MAF (5)",
            FAILED_SEED,
            9.0,
            5.0,
            0.5,
            tag="a",
            status="nonfinite",
            failure="non-finite training loss (nan) at epoch 4",
            stop_reason="non-finite loss",
        )
    )
    # matched to relgrad's size: its validation LL beats every tag, but it is a row of its own
    out.append(
        rec(
            "power",
            "maf",
            "MAF (5)",
            0,
            5.0,
            0.05,
            0.01,
            tag="match-params=relgrad",
            match_target={"against": "relgrad", "target": 84, "achieved": 90},
        )
    )
    out += [rec("power", "made", "MADE", s, *v, stop_reason="reached max_epochs=5") for s, v in MADE_POWER.items()]
    for s, (val, test, se2) in MAF_GAS.items():
        extra = dict(n_nonfinite_test=3, test_ll_finite=9.1, test_ll_finite_2se=0.03) if test == -math.inf else {}
        out.append(rec("gas", "maf", "MAF (5)", s, val, test, se2, **extra))
    out.append(rec("gas", "made", "MADE", 0, 3.5, 3.56, 0.04))
    out.append(
        rec(
            "power",
            "relgrad",
            "Relgrad dense flow",
            0,
            0.01,
            0.01,
            0.012,
            provenance={"verified": False, "source": "ours: lr 1e-3 (the paper's table is not legible)"},
        )
    )
    return out


def write_records(out: Path, records) -> list[RunRecord]:
    for r in records:
        write_record(record_path(out, r.dataset, r.model, r.seed, r.tag), r)
    return list(iter_records(out))


@pytest.fixture
def sweep(tmp_path) -> list[RunRecord]:
    return write_records(tmp_path, sweep_records())


def cells(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """Markdown table → {(row label, source): {DATASET: cell text}}."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].split("|")[1:-1]]
    out = {}
    for ln in lines[1:]:
        row = [c.strip() for c in ln.split("|")[1:-1]]
        out[(row[0], row[1])] = dict(zip(head[2:], row[2:]))
    return out


def footnote(text: str, cell: str, starts: str) -> str:
    """The footnote of ``cell`` that starts with ``starts`` (fails if the cell does not point at one)."""
    notes = {ln.split("] ", 1)[0][3:]: ln.split("] ", 1)[1] for ln in text.splitlines() if ln.startswith("- [")}
    marks = [m.rstrip("]") for m in cell.split("[")[1:]]
    hits = [notes[m] for m in marks if notes[m].startswith(starts)]
    assert hits, f"cell {cell!r} has no footnote starting {starts!r}"
    return hits[0]


def expected(seeds: dict[int, tuple]) -> dict:
    """The cell's numbers computed here, from the raw fixture values (not through flowbench)."""
    test = np.array([v[1] for v in seeds.values()])
    se2 = np.array([v[2] for v in seeds.values()])
    return {
        "mean": float(np.mean(test)),
        "pm": float(np.mean(se2)),
        "sd": float(np.std(test, ddof=1)),
        "n": len(seeds),
        "val": float(np.mean([v[0] for v in seeds.values()])),
    }


def test_selection_is_best_mean_validation_with_the_tie_rule(sweep):
    a, b, c = expected(MAF_A), expected(MAF_B), expected(MAF_C)
    assert a["val"] == b["val"] > c["val"] and max(v[0] for v in MAF_C.values()) > max(v[0] for v in MAF_A.values())
    (choice,) = [ch for ch in choose(sweep) if (ch.row, ch.config.dataset) == ("MAF (5)", "power")]
    assert choice.config.tag == "a" and choice.tied == ("b",) and len(choice.tried) == 3
    assert [r.seed for r in choice.config.counted] == [0, 1, 2]  # the failed seed 3 does not count
    # the matched run is a row of its own although its validation LL beats every tag
    matched = [ch for ch in choose(sweep) if ch.row == "MAF (5) [matched to relgrad]"]
    assert [ch.config.tag for ch in matched] == ["match-params=relgrad"]
    text = build_table(sweep, [], "best-val")
    note = footnote(text, cells(text)[("MAF (5)", "ours")]["POWER"], "best of 3 configurations")
    assert note == (
        "best of 3 configurations by mean validation LL: tag a (tied exactly with tag b; the first tag "
        "in sorted order is taken)"
    )


def test_cell_value_pm_and_spread_count_the_right_seeds(sweep):
    text = build_table(sweep, [], "best-val")
    doc = json.loads(build_table(sweep, [], "best-val", fmt="json"))
    got = {(c["model"], c["dataset"]): c for c in doc["cells"]}
    a = expected(MAF_A)
    cell = got[("MAF (5)", "power")]
    assert cell["mean"] == pytest.approx(a["mean"], abs=1e-12) and cell["pm_2se"] == pytest.approx(a["pm"], abs=1e-12)
    assert cell["sd"] == pytest.approx(a["sd"], abs=1e-12) and cell["n"] == 3 and cell["seeds"] == [0, 1, 2]
    assert cell["tag"] == "a"
    shown = cells(text)[("MAF (5)", "ours")]["POWER"]
    assert shown.startswith(f"{a['mean']:.2f} ± {a['pm']:.2f} (sd {a['sd']:.2f}, n=3)")
    made = expected(MADE_POWER)
    assert cells(text)[("MADE", "ours")]["POWER"].startswith(
        f"**{made['mean']:.2f} ± {made['pm']:.2f}** (sd {made['sd']:.2f}, n=2)"
    )
    # one seed: no spread
    assert got[("MADE", "gas")]["sd"] is None and "(sd" not in cells(text)[("MADE", "ours")]["GAS"]


def test_failed_seed_is_left_out_footnoted_and_the_cell_not_bold(sweep):
    text = build_table(sweep, [], "best-val")
    shown = cells(text)[("MAF (5)", "ours")]["POWER"]
    assert not shown.startswith("**")  # incomplete configuration: shown, not ranked
    note = footnote(text, shown, f"seed {FAILED_SEED}:")
    assert note == (
        f"seed {FAILED_SEED}: status nonfinite (non-finite training loss (nan) at epoch 4), test LL 5.00; "
        "left out of the value, ±, (sd, n) and the selection, and the cell is not bold"
    )
    # the best bold-eligible value of the column is MADE's, although the matched row's and ours are below it
    bold = [k for k, v in cells(text).items() if v["POWER"].startswith("**")]
    assert bold == [("MADE", "ours")]


def test_minus_infinity_seed_shows_and_is_never_bold(sweep):
    text = build_table(sweep, [], "best-val")
    gas = cells(text)[("MAF (5)", "ours")]["GAS"]
    assert gas.startswith("−∞ (n=3) [")  # finite seeds 9.0 and 9.2 would be the column's best
    note = footnote(text, gas, "seed 2:")
    assert (
        note.startswith("seed 2: 3 of 100 test points have log-density −inf") and "over the other 97 it is 9.10" in note
    )
    assert cells(text)[("MADE", "ours")]["GAS"].startswith("**3.56 ± 0.04**")
    doc = json.loads(build_table(sweep, [], "best-val", fmt="json"))
    cell = next(c for c in doc["cells"] if (c["model"], c["dataset"]) == ("MAF (5)", "gas"))
    assert cell["mean"] is None and cell["minus_infinity"] and cell["n"] == 3 and not cell["bold"]


def test_every_footnote_and_mark_in_both_selection_modes(sweep):
    beside = build_table(sweep, ["relgrad"], "best-val")
    got = cells(beside)
    footnote(beside, got[("Relgrad dense flow", "ours")]["POWER"], CONFIG_UNVERIFIED_NOTE)
    assert "?" not in got[("Relgrad dense flow", "ours")]["POWER"]  # "?" is for published numbers only
    # the fixture's test sets (100 points) are not MAF's POWER split: said, and never bold beside the paper's
    other = "test set of 100 points, not the 204,928 of the paper's POWER split"
    for row in ("MADE", "MAF (5)", "Relgrad dense flow"):
        footnote(beside, got[(row, "ours")]["POWER"], other)
        assert "**" not in got[(row, "ours")]["POWER"]
    # bold among ours alone: by value and by the paired t-test
    text = build_table(sweep, [], "best-val")
    got = cells(text)
    footnote(text, got[("MADE", "ours")]["POWER"], NOT_CONVERGED + " (seeds 0, 1: --max-epochs 5)")
    footnote(text, got[("MAF (5)", "ours")]["POWER"], "mean of 3 seeds (0, 1, 2)")
    # no per-point values in these records: compared by value only, and the footnote says so
    footnote(text, got[("MAF (5) [matched to relgrad]", "ours")]["POWER"], NO_POINTS_NOTE)
    assert "best of" not in got[("MAF (5) [matched to relgrad]", "ours")]["POWER"]
    assert "- Bold: the best value of each column" in text and f"α = {ALPHA:g}" in text

    text_all = build_table(sweep, [], "all")
    rows = cells(text_all)
    assert {"MAF (5) [a]", "MAF (5) [b]", "MAF (5) [c]", "MAF (5) [matched to relgrad] [match-params=relgrad]"} <= {
        label for label, _ in rows
    }
    assert "best of" not in text_all
    footnote(text_all, rows[("MAF (5) [a]", "ours")]["POWER"], f"seed {FAILED_SEED}:")
    for tag, seeds in (("b", MAF_B), ("c", MAF_C)):
        e = expected(seeds)
        shown = rows[(f"MAF (5) [{tag}]", "ours")]["POWER"].replace("**", "")
        assert shown.startswith(f"{e['mean']:.2f} ± {e['pm']:.2f} (sd {e['sd']:.2f}, n=2)")
        assert "seed 3" not in text_all.split(f"MAF (5) [{tag}]")[1].split("\n")[0]
    assert rows[("MAF (5) [c]", "ours")]["POWER"].startswith("**")  # every configuration competes with all
    footnote(text_all, rows[("MADE", "ours")]["POWER"], NOT_CONVERGED)
    beside_all = build_table(sweep, ["relgrad"], "all")
    footnote(beside_all, cells(beside_all)[("Relgrad dense flow", "ours")]["POWER"], CONFIG_UNVERIFIED_NOTE)


def test_plot_and_report_show_the_configuration_the_table_names(sweep, tmp_path, monkeypatch):
    from flowbench.plots import curves, report

    doc = json.loads(build_table(sweep, [], "best-val", fmt="json"))
    table_tags = {(c["model"], c["dataset"]): (c["tag"], c["seeds"]) for c in doc["cells"]}
    drawn: list = []
    real = curves.save_curves
    monkeypatch.setattr(curves, "save_curves", lambda records, *a, **k: drawn.append(records) or real(records, *a, **k))
    assert main(["plot", "curves", "--results", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0
    fig = curves.plot_curves(drawn[0])
    legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("MAF (5) [a] · 4 seeds") for t in legends)  # the plot names tag a, as the table does
    plotted = {}
    for r in drawn[0]:
        label = "MAF (5) [matched to relgrad]" if r.match_target else r.display_name
        plotted.setdefault((label, r.dataset), set()).add(r.tag)
    assert {k: {v[0]} for k, v in table_tags.items()} == plotted

    seen: list = []
    monkeypatch.setattr(report, "plot_curves", lambda runs, **k: seen.extend(runs) or curves.plot_curves(runs, **k))
    report.report_markdown(tmp_path, samples=False, sources=[])
    assert {(r.dataset, r.tag) for r in seen if r.model == "maf" and not r.match_target} == {
        ("power", "a"),
        ("gas", None),
    }
    assert [r.tag for r in chosen_runs(sweep) if r.model == "maf" and r.dataset == "power" and not r.match_target] == [
        "a"
    ] * 4


# -- the MAF paper's bolding rule: a paired t-test on the per-point test log-likelihoods ------------------------

N_POINTS = 400
TEST_SET = np.arange(N_POINTS * 2, dtype=np.float32).reshape(N_POINTS, 2)  # the test points all runs share


def alternating(n: int) -> np.ndarray:
    return np.where(np.arange(n) % 2 == 0, 1.0, -1.0)


def shifted(base: np.ndarray, t: float) -> np.ndarray:
    """``base`` lowered so that the paired differences ``base - other`` have t statistic ``t``: differences
    ``δ + alt`` (alt = ±1 alternating) have mean δ and sd sqrt(n/(n-1)), so t = δ·sqrt(n)/sd."""
    n = base.size
    sd = math.sqrt(n / (n - 1))
    delta = t * sd / math.sqrt(n)
    return base - delta - alternating(n)


def write_points(out: Path, dataset, model, display, seed, logp, tag=None, test=TEST_SET, keep=True, **kw):
    logp = np.asarray(logp, dtype=np.float32)
    mean = float(logp.astype(np.float64).mean())
    r = rec(
        dataset,
        model,
        display,
        seed,
        mean,
        mean,
        float(2 * logp.std() / math.sqrt(logp.size)),
        tag=tag,
        n_test=logp.size,
        **kw,
    )
    if keep:
        r.test_points = write_per_point(per_point_path(out, dataset, model, seed, tag), logp, test)
    write_record(record_path(out, dataset, model, seed, tag), r)


@pytest.fixture
def points(tmp_path):
    rng = np.random.default_rng(0)
    best = rng.normal(0.5, 1.0, N_POINTS)
    write_points(tmp_path, "power", "maf", "MAF (5)", 0, best)
    target = shifted(best, 1.0)  # p ≈ 0.32: not significant, bold
    # two seeds whose point-by-point mean is `target`: each alone differs significantly from the best, their mean not
    write_points(tmp_path, "power", "made", "MADE", 0, target + 2.0)
    write_points(tmp_path, "power", "made", "MADE", 1, target - 2.0)
    write_points(tmp_path, "power", "realnvp", "Real NVP (5)", 0, shifted(best, 4.0))  # p ≈ 7e-5: not bold
    write_points(tmp_path, "power", "maf_mog", "MAF MoG (5)", 0, shifted(best, 0.5), keep=False)  # an old record
    other = TEST_SET + 1
    write_points(tmp_path, "power", "made_mog", "MADE MoG", 0, shifted(best, 0.2), test=other)  # other test points
    return tmp_path, best


def stored(out, model, seed=0):
    return np.load(per_point_path(out, "power", model, seed)).astype(np.float64)


def test_paired_t_test_bolds_what_scipy_says(points):
    out, best = points
    records = list(iter_records(out))
    text = build_table(records, [], "best-val")
    got = cells(text)
    best_v, made = stored(out, "maf"), (stored(out, "made", 0) + stored(out, "made", 1)) / 2
    nvp = stored(out, "realnvp")
    p_made, p_nvp = stats.ttest_rel(best_v, made).pvalue, stats.ttest_rel(best_v, nvp).pvalue
    # the constructed answer, from the t distribution directly
    assert p_made == pytest.approx(2 * stats.t.sf(1.0, N_POINTS - 1), rel=1e-3) and p_made > ALPHA
    assert p_nvp == pytest.approx(2 * stats.t.sf(4.0, N_POINTS - 1), rel=1e-2) and p_nvp < ALPHA
    assert got[("MAF (5)", "ours")]["POWER"].startswith("**")
    made_cell = got[("MADE", "ours")]["POWER"]
    assert made_cell.startswith("**")
    note = footnote(text, made_cell, "bold: not significantly below MAF (5)")
    assert (
        note
        == f"bold: not significantly below MAF (5) (paired t-test over {N_POINTS} test points, p = {p_made:.2g} ≥ 0.05)"
    )
    # seeds are averaged point by point: each seed alone is significantly different from the best
    for s in (0, 1):
        assert stats.ttest_rel(best_v, stored(out, "made", s)).pvalue < ALPHA
    assert not got[("Real NVP (5)", "ours")]["POWER"].startswith("**")
    # an old record without per-point values falls back to the best-value rule, and says so
    footnote(text, got[("MAF MoG (5)", "ours")]["POWER"], NO_POINTS_NOTE)
    assert not got[("MAF MoG (5)", "ours")]["POWER"].startswith("**")
    footnote(text, got[("MADE MoG", "ours")]["POWER"], OTHER_POINTS_NOTE)
    assert paired_pvalue(best_v, best_v) == 1.0  # identical vectors: p undefined, no difference to call significant


def test_published_rows_keep_their_bolding_and_are_never_tested(points):
    out, _ = points
    records = [r for r in iter_records(out)]
    for r in records:  # every row of ours below the published best (MADE MoG 0.40 in MAF Table 1)
        r.test_ll -= 5.0
    text = build_table(records, ["maf"], "best-val")
    got = cells(text)
    assert got[("MADE MoG", "published: MAF paper")]["POWER"] == "**0.40 ± 0.01**"
    assert [k for k, v in got.items() if v["POWER"].startswith("**")] == [("MADE MoG", "published: MAF paper")]
    assert "paired t-test over" not in text and NO_POINTS_NOTE not in text


def test_testll_file_must_match_its_record(points):
    out, _ = points
    r = next(r for r in iter_records(out) if r.model == "maf")
    values, why = read_per_point(r)
    assert why is None and values.size == N_POINTS
    r.test_ll += 0.01  # a file left by another run
    assert read_per_point(r)[0] is None and "mean" in read_per_point(r)[1]
    np.save(per_point_path(out, "power", "maf", 0), np.zeros(3, np.float32))
    assert "holds 3 values" in read_per_point(next(r for r in iter_records(out) if r.model == "maf"))[1]


# -- finish_run keeps the per-point values, for single and stacked runs -----------------------------------------


def toy(seed=1) -> Dataset:
    rng = np.random.RandomState(seed)
    x = (rng.randn(600, 3) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.5]])).astype(np.float32)
    return Dataset("toy", x[:400], x[400:500], x[500:])


def run_opts(out, **kw):
    return {
        "out": str(out),
        "model": "maf",
        "layers": 1,
        "hidden": 8,
        "batch_norm": False,
        "batch_size": 50,
        "patience": 2,
        "max_epochs": 2,
        "lr": 1e-2,
        "device": "cpu",
        "checkpoint_every_s": 0,
        **kw,
    }


def check_kept(record: RunRecord, out: Path, data: Dataset) -> np.ndarray:
    path = per_point_path(out, record.dataset, record.model, record.seed, record.tag)
    raw = np.load(path)
    assert raw.dtype == np.float32 and raw.shape == (data.test.shape[0],)
    assert record.test_points == {
        "file": path.name,
        "n": 100,
        "dtype": "float32",
        "test_sha256": sha256_of_test_set(data.test),
    }
    assert float(raw.astype(np.float64).mean()) == pytest.approx(record.test_ll, abs=1e-6)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # written atomically
    back = next(r for r in iter_records(out) if r.seed == record.seed)
    np.testing.assert_array_equal(read_per_point(back)[0], raw.astype(np.float64))
    return raw


def test_single_and_stacked_runs_keep_per_point_test_lls(tmp_path):
    import torch

    from flowbench.plots.samples import load_flow
    from flowbench.training import run_experiment
    from flowbench.training.stacked import run_stacked

    data = toy()
    single = run_experiment(run_opts(tmp_path / "single"), data, progress=False)
    raw = check_kept(single, tmp_path / "single", data)
    # the values are the recorded model's log-densities of the test points, in order
    flow = load_flow(next(iter_records(tmp_path / "single")), data)
    with torch.no_grad():
        np.testing.assert_allclose(raw, flow.log_prob(torch.as_tensor(data.test)).numpy(), rtol=1e-6, atol=1e-6)
    stacked = run_stacked([run_opts(tmp_path / "stack", seed=s) for s in (0, 1)], data, progress=False)
    for r in stacked:
        check_kept(r, tmp_path / "stack", data)
    assert len({r.test_points["test_sha256"] for r in stacked}) == 1
