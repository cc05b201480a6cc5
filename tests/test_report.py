"""`flowbench report`: one page with the table (not-converged runs footnoted), run status, curves and samples."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import pytest
import torch
from test_plots import fake_record, write_fakes

from flowbench.cli import main
from flowbench.errors import ConfigError
from flowbench.plots.report import (
    build_report,
    format_seconds,
    markdown_to_html,
    report_markdown,
)
from flowbench.status import NOT_CONVERGED

pytest.importorskip("sklearn")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Hand-written records (converged, capped, non-finite), one real digits run, one failed sweep run."""
    from flowbench.training import run_experiment

    out = tmp_path_factory.mktemp("results")
    write_fakes(
        out,
        [
            fake_record("power", "maf", "MAF (5)", 0, [-1.0, 0.1, 0.05, 0.0], wall=75.0),
            fake_record("power", "maf", "MAF (5)", 1, [-1.1, 0.12, 0.02], wall=80.0),
            fake_record("power", "made", "MADE", 0, [-5.0, -4.0], stop="reached max_epochs=2", wall=4000.0),
            fake_record(
                "power",
                "realnvp",
                "Real NVP (5)",
                0,
                [1.0, 2.0],
                status="nonfinite",
                stop="non-finite loss",
                failure="non-finite training loss (nan) at epoch 3, batch 4 (lower --lr)",
            ),
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_experiment(
        {
            "dataset": "digits",
            "model": "maf",
            "hidden": 8,
            "layers": 1,
            "max_epochs": 1,
            "out": str(out),
            "device": "cpu",
        },
        progress=False,
    )
    torch.set_num_threads(threads)
    sweeps = out / "sweeps"
    sweeps.mkdir()
    (sweeps / "grid.json").write_text(
        json.dumps(
            {
                "runs": [
                    {
                        "dataset": "power",
                        "model": "realnvp",
                        "tag": "lr=1e-3",
                        "seed": 0,
                        "status": "failed",
                        "error": "RuntimeError: CUDA out of memory",
                    },
                    {
                        "dataset": "power",
                        "model": "maf",
                        "tag": None,
                        "seed": 0,
                        "status": "failed",
                        "error": "retried later",
                    },
                ]
            }
        )
    )
    (sweeps / "broken.json").write_text("{")
    return out


@pytest.fixture(scope="module")
def md_report(results, tmp_path_factory):
    """The Markdown report, written over the figures of an earlier report (one stale, one not a figure)."""
    out = tmp_path_factory.mktemp("md") / "report.md"
    (out.parent / "report_files").mkdir()
    (out.parent / "report_files" / "samples_old.png").write_bytes(PNG)
    (out.parent / "report_files" / "notes.txt").write_text("kept")
    build_report(results, out)
    return out, out.read_text()


def test_markdown_report(md_report):
    out, text = md_report
    for heading in ("## Comparison table", "## Runs", "## Training curves", "### POWER", "## Samples", "### DIGITS"):
        assert f"\n{heading}\n" in text
    # every image link resolves to a PNG beside the report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 3  # curves of power and digits; digits samples
    for link in links:
        assert (out.parent / link).read_bytes().startswith(PNG)
    assert any("samples_digits_maf_seed0.png" in ln for ln in links)
    # samples of the hand-written runs (no checkpoint) are explained, not fatal, and load no data
    assert text.count("Samples not drawn: no checkpoint at") == 3
    files = {p.name for p in (out.parent / "report_files").iterdir()}
    assert "samples_old.png" not in files and "notes.txt" in files  # stale figure gone, other files kept


def test_table_marks_only_capped_runs(md_report):
    _, text = md_report
    table = text.split("## Comparison table")[1].split("## Runs")[0]
    rows = {
        ln.split("|")[1].strip() + "/" + ln.split("|")[2].strip(): ln
        for ln in table.splitlines()
        if ln.startswith("| ")
    }
    notes = dict(re.findall(r"^- \[(\d+)\] (.*)$", table, re.MULTILINE))
    made = rows["MADE/ours"].split("|")[3]  # POWER column
    (mark,) = re.findall(r"\[(\d+)\]", made)
    assert NOT_CONVERGED in notes[mark]
    maf_power = rows["MAF (5)/ours"].split("|")[3]
    assert all(NOT_CONVERGED not in notes[m] for m in re.findall(r"\[(\d+)\]", maf_power))  # converged seeds
    assert "MAF paper" in rows["MAF (5)/published: MAF paper"]


def test_runs_table_status_seeds_and_wall_time(md_report):
    _, text = md_report
    runs = text.split("## Runs")[1].split("## Training curves")[0]
    lines = [ln for ln in runs.splitlines() if ln.startswith("| ")][1:]
    assert len(lines) == 5 + 1  # five records and the failed sweep run whose record never appeared
    by = {(c[1].strip(), c[2].strip(), c[3].strip()): c for c in (re.split(r"(?<!\\)\|", ln) for ln in lines)}
    maf0 = by[("power", "MAF (5)", "0")]
    assert maf0[4].strip() == "converged: patience 3 ran out (best epoch 2 of 4)" and maf0[9].strip() == "1 min 15 s"
    assert by[("power", "MAF (5)", "1")][4].strip().startswith("converged")
    made = by[("power", "MADE", "0")]
    assert "capped by --max-epochs 2" in made[4] and made[9].strip() == "1 h 06 min"
    nvp = by[("power", "Real NVP (5)", "0")][4]
    assert "non-finite" in nvp and "batch 4" in nvp
    failed = by[("power", "realnvp [lr=1e-3]", "0")]
    assert "failed (sweep grid): RuntimeError: CUDA out of memory" in failed[4]
    assert "retried later" not in runs  # that run has a record now: the record wins
    assert "warning: could not read sweep report" in text and "broken.json" in text


def test_html_is_one_self_contained_file(results, tmp_path):
    out = build_report(results, tmp_path / "report.html", select="all", datasets=["digits"])
    page = out.read_text()
    assert not (tmp_path / "report_files").exists()

    class Check(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.srcs, self.cells = [], [], 0

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.srcs.append(dict(attrs)["src"])
            elif tag not in ("meta",):
                self.stack.append(tag)
            self.cells += tag == "td"

        def handle_endtag(self, tag):
            assert self.stack.pop() == tag, f"unbalanced </{tag}>"

    check = Check()
    check.feed(page)
    assert check.stack == []
    assert len(check.srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in check.srcs)
    for s in check.srcs:
        assert base64.b64decode(s.split(",", 1)[1]).startswith(PNG)
    assert "<h2>Comparison table</h2>" in page and "<strong>" in page and check.cells > 20


def test_markdown_to_html_subset():
    page = markdown_to_html("## A & B\n\n| a | b |\n|---|---|\n| log\\|det W\\| | **1** `x` |\n\n- one\n- two", {}, "t")
    assert "<h2>A &amp; B</h2>" in page
    assert "<td>log|det W|</td><td><strong>1</strong> <code>x</code></td>" in page
    assert "<ul><li>one</li><li>two</li></ul>" in page
    with pytest.raises(ValueError, match="no PNG"):
        markdown_to_html("![x](f/missing.png)", {})


def test_format_seconds():
    assert [format_seconds(s) for s in (3.14, 65, 3725)] == ["3.1 s", "1 min 05 s", "1 h 02 min"]


def test_cli_and_errors(results, tmp_path, capsys):
    out = tmp_path / "x.md"
    assert (
        main(
            [
                "report",
                "--results",
                str(results),
                "--out",
                str(out),
                "--no-samples",
                "--dataset",
                "power",
                "--model",
                "maf",
                "made",
            ]
        )
        == 0
    )
    text = out.read_text()
    assert "## Samples" not in text and "### DIGITS" not in text and "report written to" in capsys.readouterr().out
    runs = text.split("## Runs")[1]
    assert "| MADE " in runs and "Real NVP" not in runs and "realnvp" not in runs  # the failed realnvp run too
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "r.pdf")]) == 2
    assert "written as .md or .html" in capsys.readouterr().err
    assert main(["report", "--results", str(tmp_path / "none")]) == 2
    with pytest.raises(ConfigError, match="unknown --select"):
        report_markdown(results, select="best")


def test_report_links_the_table_exports(md_report, results, tmp_path):
    from flowbench.results import iter_records
    from flowbench.tables import build_table

    out, text = md_report
    links = dict((name, target) for name, target in re.findall(r"\[(LaTeX \(booktabs\)|CSV|JSON)\]\(([^)]+)\)", text))
    assert set(links) == {"LaTeX (booktabs)", "CSV", "JSON"}
    records = list(iter_records(results))
    for what, fmt in (("LaTeX (booktabs)", "latex"), ("CSV", "csv"), ("JSON", "json")):
        assert (out.parent / links[what]).read_text() == build_table(records, ["maf", "relgrad"], fmt=fmt)
    page = build_report(results, tmp_path / "r.html", samples=False).read_text()
    (csv_link,) = re.findall(r'<a download="table.csv" href="data:text/csv;base64,([^"]+)">CSV</a>', page)
    assert base64.b64decode(csv_link).decode() == build_table(records, ["maf", "relgrad"], fmt="csv")


def test_runs_in_progress_are_reported_from_their_checkpoints(tmp_path, capsys):
    """Issue 24: a folder of long runs (POWER's take hours an epoch's stack) has a report before its first record:
    every run with a checkpoint and no record, with its epoch, best validation LL (epoch), patience left and the
    non-finite validations, here recomputed from the validation LLs the killed run's callback saw. A finished
    run's kept checkpoint, and a failed sweep run that trained since its sweep reported it, are not listed as
    in progress or failed; an unreadable checkpoint is a warning, not a failure."""
    import os

    from test_train import Kill, gaussian_data, opts

    from flowbench.results import checkpoint_path, record_path
    from flowbench.training import run_experiment

    data = gaussian_data(400, 100, 200)
    o = dict(model="maf", layers=2, hidden=8, seed=3, lr=3e-2, patience=30, max_epochs=6, checkpoint_every_s=0)
    seen: list[float] = []

    def kill(info):
        seen.append(info.val_ll)
        if info.epoch == 4:
            raise Kill

    out = tmp_path / "results"
    with pytest.raises(Kill):
        run_experiment(opts(out, **o, tag="lr=3e-2"), data, progress=False, callbacks=[kill])
    run_experiment(opts(out, **dict(o, seed=4, max_epochs=2), keep_checkpoint=True), data, progress=False)
    assert checkpoint_path(out, "toy", "maf", 4).is_file() and record_path(out, "toy", "maf", 4).is_file()
    best = max(seen)
    best_epoch = seen.index(best) + 1
    assert best_epoch < 4  # the run had bad epochs: patience left is not simply the patience
    bad = checkpoint_path(out, "toy", "realnvp", 0)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")

    text, figures = report_markdown(out, samples=False)
    assert figures["progress_toy.png"].startswith(PNG) and "(report_files/progress_toy.png)" in text
    rows = [ln for ln in text.split("## Runs in progress")[1].splitlines() if ln.startswith("| toy")]
    assert len(rows) == 1, rows  # not the finished seed 4, not the unreadable file
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:7] == [
        "toy",
        "MAF (2) [lr=3e-2]",
        "3",
        "after epoch 4 (16 steps)",
        f"{best:.3f} (epoch {best_epoch})",
        f"{30 - (4 - best_epoch)} of 30",
        "0",
    ]
    assert cells[9].startswith("2 epochs, ~")  # the cap of 6 comes before the patience runs out
    assert cells[-2].endswith(" ago") and cells[-1] == "no"  # killed: nobody holds its lock
    from test_faults import _start_holder

    from flowbench.results import lock_path

    holder = _start_holder(lock_path(out, "toy", "maf", 3, "lr=3e-2"))  # as the process training it would
    try:
        again, _ = report_markdown(out, samples=False)
        assert main(["table", "--results", str(out)]) == 0
    finally:
        holder.kill()
        holder.wait()
    (row,) = [ln for ln in again.split("## Runs in progress")[1].splitlines() if ln.startswith("| toy")]
    assert row.rstrip(" |").endswith(f"yes (process {holder.pid})")
    # counted without reading them (the unreadable checkpoint too), and told apart by their locks
    note = "note: 2 runs have a checkpoint and no record yet and are not in the table: {} training now, {} stopped"
    assert note.format(1, 1) in capsys.readouterr().err
    from flowbench.plots._records import read_progress
    from flowbench.results import runs_without_record
    from flowbench.status import run_status

    (run,), _ = read_progress(runs_without_record(out))
    so_far = run.record()
    assert so_far["display_name"] == "MAF (2)" and [h["val_ll"] for h in so_far["history"]] == seen
    assert run_status(so_far).text == f"in progress (best epoch {best_epoch} of 4 so far)"
    assert f"warning: checkpoint {bad} is truncated or not a flowbench file" in text
    assert "1 runs of 1 configurations on 1 datasets, and 1 runs in progress" in text

    assert main(["table", "--results", str(out)]) == 0
    assert note.format(0, 2) in capsys.readouterr().err
    # a column counts its own runs: mnist-cond the conditional models' runs on mnist, mnist the others'
    for model in ("maf", "maf-cond"):
        fake = checkpoint_path(out, "mnist", model, 0)
        fake.parent.mkdir(parents=True)
        fake.write_bytes(b"")  # counted without being read
    for columns, n in (("mnist-cond", "1 run has"), ("mnist", "1 run has"), ("mnist,mnist-cond", "2 runs have")):
        assert main(["table", "--results", str(out), "--datasets", columns]) == 0
        assert f"note: {n} a checkpoint" in capsys.readouterr().err, columns
    assert main(["table", "--results", str(out), "--datasets", "toy"]) == 0
    assert note.format(0, 2) in capsys.readouterr().err
    for model in ("maf", "maf-cond"):
        checkpoint_path(out, "mnist", model, 0).unlink()
    # A report of one model reads only that model's checkpoints: the unreadable realnvp one is not read.
    only_maf, _ = report_markdown(out, models=["maf"], samples=False)
    assert "MAF (2) [lr=3e-2]" in only_maf and "warning" not in only_maf

    # The NaN rule's validations (batch-norm statistics broken by an overflow) are counted.
    ckpt = checkpoint_path(out, "toy", "maf", 3, "lr=3e-2")
    state = torch.load(ckpt, weights_only=True)
    state["result"]["history"][1]["val_ll"] = float("nan")
    torch.save(state, ckpt)
    assert "| 1 of 4 " in report_markdown(out, samples=False)[0]

    # A folder of runs in progress only: the report stands, without table, curves or samples.
    for path in (record_path(out, "toy", "maf", 4), checkpoint_path(out, "toy", "maf", 4), bad):
        path.unlink()
    assert main(["report", "--results", str(out), "--out", str(tmp_path / "r.md"), "--dataset", "toy"]) == 0
    only = (tmp_path / "r.md").read_text()
    assert "no finished runs yet, and 1 runs in progress" in only and "No run has finished yet" in only
    assert "## Comparison table" not in only and "## Training curves" not in only
    assert main(["report", "--results", str(out), "--dataset", "power"]) == 2
    assert "no records for dataset power; the results hold: toy" in capsys.readouterr().err

    # A sweep reported the run failed (its lock was held by the process training it): a checkpoint written
    # after that report means it trained since, so it is no failure.
    sweeps = out / "sweeps"
    sweeps.mkdir()
    failed = {"dataset": "toy", "model": "maf", "tag": "lr=3e-2", "seed": 3, "status": "failed", "error": "lock held"}
    (sweeps / "grid.json").write_text(json.dumps({"runs": [failed]}))
    ckpt = checkpoint_path(out, "toy", "maf", 3, "lr=3e-2")
    written = ckpt.stat().st_mtime
    os.utime(sweeps / "grid.json", (written - 60, written - 60))
    assert "failed" not in report_markdown(out, samples=False)[0]
    os.utime(sweeps / "grid.json", (written + 60, written + 60))
    again = report_markdown(out, samples=False)[0]
    assert "1 failed sweep runs that left no record, and 1 runs in progress" in again


def test_a_seed_that_stopped_inside_a_running_stack_is_listed_as_stopped(tmp_path):
    """A stack writes its records when it ends: a seed that early stopping ended before the others has a finished
    checkpoint and no record meanwhile. The report lists it as stopped, beside its stack mate still training."""
    from test_stacked import Kill, run_opts, run_stacked, toy_data

    def kill(info):
        if info.epoch == 8 and info.seed == 1:
            raise Kill

    with pytest.raises(Kill):  # under patience 1 seed 0 stops at epoch 6 and seed 1 trains on (test_stacked.py)
        runs = [run_opts(tmp_path, seed=s, patience=1, lr=1e-2, max_epochs=10) for s in (0, 1)]
        run_stacked(runs, toy_data(), progress=False, callbacks=[kill])
    text, _ = report_markdown(tmp_path, samples=False)
    rows = {
        ln.split("|")[3].strip(): [c.strip() for c in ln.split("|")[4:7]]
        for ln in text.splitlines()
        if ln.startswith("| toy")
    }
    per_epoch = -(-len(toy_data().train) // runs[0]["batch_size"])
    assert rows["0"][0] == f"after epoch 6 ({6 * per_epoch} steps)" and rows["0"][2] == "stopped"
    assert rows["1"][0] == f"after epoch 8 ({8 * per_epoch} steps)" and rows["1"][2] == "1 of 1"
    assert "| 1 epochs, ~" in text  # patience 1 left comes before the cap of 10


def test_earliest_end_is_the_first_of_patience_cap_and_budget():
    from types import SimpleNamespace

    from flowbench.plots.report import _earliest_end

    def p(**kw):
        base = dict(finished=False, patience_left=30, epoch=6, step=600, seconds_per_eval=60.0, options={})
        return SimpleNamespace(**{**base, **kw})

    assert _earliest_end(p(), False) == "30 epochs, ~30 min 00 s"
    assert _earliest_end(p(options={"max_epochs": 10}), False) == "4 epochs, ~4 min 00 s"
    assert _earliest_end(p(options={"max_steps": 1000}), False) == "4 epochs, ~4 min 00 s"  # 100 steps an epoch
    by_step = p(patience_left=10, step=650, options={"max_steps": 1000, "eval_every": 100})
    assert _earliest_end(by_step, True) == "4 evaluations, ~4 min 00 s"
    assert _earliest_end(p(finished=True), False) == ""


def test_a_run_with_no_finite_evaluation_yet_is_reported_quietly(tmp_path):
    """A checkpoint whose run has no finite validation yet: the row says so, its curve panel draws no level, and
    nothing warns (numpy's mean of an empty slice used to)."""
    import warnings

    from test_train import Kill, gaussian_data, opts

    from flowbench.results import checkpoint_path
    from flowbench.training import run_experiment

    def kill(info):
        raise Kill

    with pytest.raises(Kill):
        run_experiment(
            opts(tmp_path, model="maf", layers=1, hidden=8, checkpoint_every_s=0),
            gaussian_data(400, 100, 200),
            progress=False,
            callbacks=[kill],
        )
    ckpt = checkpoint_path(tmp_path, "toy", "maf", 0)
    state = torch.load(ckpt, weights_only=True)
    state["result"]["history"] = []
    state["early_stopping"].update(best_value=float("-inf"), best_epoch=None, bad_epochs=0)
    torch.save(state, ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text, figures = report_markdown(tmp_path, samples=False)
    assert "| none finite yet |" in text and figures["progress_toy.png"].startswith(PNG)
