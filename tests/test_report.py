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
