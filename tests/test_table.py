"""`flowbench table`: selection, seed averaging, bold best, N/A, published rows, golden output."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from flowbench.data import DATASETS
from flowbench.errors import ConfigError, UsageError
from flowbench.published import PUBLISHED, published
from flowbench.results import RunRecord, iter_records, record_path, write_record
from flowbench.tables import build_table

GOLDEN = Path(__file__).parent / "golden" / "table.md"


def fake_record(dataset, model, display, seed, test_ll, se2, val, tag=None, status="ok", failure=None):
    return RunRecord.example(
        dataset=dataset,
        model=model,
        display_name=display,
        tag=tag,
        seed=seed,
        config={},
        params=10,
        epochs=3,
        best_epoch=2,
        best_val_ll=val,
        test_ll=test_ll,
        test_ll_2se=se2,
        n_test=DATASETS[dataset].sizes[2],  # stands for a run on the paper's test split
        wall_time_s=1.0,
        device="cpu",
        torch="x",
        python="3",
        timestamp="t",
        status=status,
        failure=failure,
    )


def write_fixture(out: Path) -> None:
    recs = [
        # two seeds of one configuration → mean and a spread footnote
        fake_record("power", "maf", "MAF (5)", 0, 0.20, 0.01, 0.21),
        fake_record("power", "maf", "MAF (5)", 1, 0.30, 0.01, 0.31),
        # relgrad on power: two tags; best-val must pick lr=1e-3 (higher val) although its test is lower
        fake_record("power", "relgrad", "Relgrad dense flow", 0, 0.01, 0.012, 0.50, tag="lr=1e-3"),
        fake_record("power", "relgrad", "Relgrad dense flow", 0, 0.90, 0.012, 0.10, tag="lr=1e-4"),
        fake_record("digits", "relgrad", "Relgrad dense flow", 0, -30.123, 0.5, -29.0),
        fake_record("digits", "gaussian", "Gaussian", 0, -45.5, 0.8, -44.0),
    ]
    for r in recs:
        write_record(record_path(out, r.dataset, r.model, r.seed, r.tag), r)


def test_golden_table(tmp_path):
    write_fixture(tmp_path)
    text = build_table(list(iter_records(tmp_path)), ["maf", "relgrad"], "best-val")
    if os.environ.get("FLOWBENCH_UPDATE_GOLDEN"):  # regenerate deliberately, then review the diff
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    # deterministic: same records, same bytes
    assert build_table(list(iter_records(tmp_path)), ["maf", "relgrad"], "best-val") == text


def test_the_caption_explains_only_the_columns_shown(tmp_path):
    write_fixture(tmp_path)
    records = list(iter_records(tmp_path))

    def caption(datasets):
        return build_table(records, ["maf", "relgrad"], "best-val", datasets=datasets).split("\n")[0]

    everything = caption(None)  # the published rows give every column, MNIST cond. and CIFAR10 among them
    assert "MNIST, CIFAR10 and digits in logit space." in everything and "cond.: class-conditional" in everything
    readme = caption(["power", "mnist", "digits"])
    assert "MNIST and digits in logit space." in readme and "cond." not in readme and "CIFAR" not in readme
    tabular = caption(["power", "gas"])
    assert "logit" not in tabular and "cond." not in tabular and tabular.endswith("N/A: no result.")
    cond = caption(["mnist-cond"])
    assert "MNIST in logit space. cond.: class-conditional models" in cond and "digits" not in cond
    assert "seeds. Digits in logit space." in caption(["digits"])  # a sentence starts with a capital


def test_selection_seeds_bold_and_na(tmp_path):
    write_fixture(tmp_path)
    text = build_table(list(iter_records(tmp_path)), [], "best-val")
    lines = {
        ln.split("|")[1].strip() + "/" + ln.split("|")[2].strip(): ln for ln in text.splitlines() if ln.startswith("| ")
    }
    maf = lines["MAF (5)/ours"]
    assert "**0.25 ± 0.01**" in maf  # mean of 0.20 and 0.30; ± stays the per-run 2 SE, spread goes to a note
    # the seed spread in the cell: std of the per-seed test LLs 0.20 and 0.30 (0.0707) and the seed count
    assert "0.25 ± 0.01** (sd 0.07, n=2)" in maf
    assert "mean of 2 seeds (0, 1): the value is the mean of the per-seed test LLs, ± the mean per-run 2 SE" in text
    assert "(sd, n) is the seed spread" in text and "(0.071)" in text and "range 0.20 to 0.30" in text
    assert "(sd" not in lines["Gaussian/ours"]  # one seed: no spread
    rel = lines["Relgrad dense flow/ours"]
    assert "0.01 ± 0.01 [" in rel and "0.90" not in rel  # best validation wins, not best test
    assert "best of 2 configurations by mean validation LL: tag lr=1e-3" in text
    assert "N/A" in lines["Gaussian/ours"]  # no power result for the Gaussian
    assert "**-30.12 ± 0.50**" in rel  # best digits cell in bold
    text_all = build_table(list(iter_records(tmp_path)), [], "all")
    assert "Relgrad dense flow [lr=1e-4]" in text_all and "Relgrad dense flow [lr=1e-3]" in text_all


def test_published_rows_marked_and_best_across_all(tmp_path):
    write_fixture(tmp_path)
    text = build_table(list(iter_records(tmp_path)), ["maf", "relgrad", "beyond"], "best-val")
    assert "| MAF (5)" in text and "published: MAF paper" in text and "published: relgrad paper" in text
    assert "96.67 ± 0.25 ?" in text  # the unverified Gaussian BSDS300 number keeps its mark
    assert "**0.66 ± 0.01** ?" in text  # RQ-NSF (AR) is the best POWER number shown, and unverified
    # MAF Table 2: MNIST and CIFAR-10, each unconditional and class-conditional, every published cell shown
    header = next(ln for ln in text.splitlines() if ln.startswith("| Model"))
    assert [c.strip() for c in header.split("|")[8:12]] == ["MNIST", "MNIST cond.", "CIFAR10", "CIFAR10 cond."]
    assert "2983 ± 26 ?" in text and "-1092.3 ± 1.7 ?" in text  # conditional cells: one secondary source
    assert "logsumexp_y log p(x | y) − log 10" in text  # what a conditional column reports, footnoted


def test_published_data_complete():
    maf = [p for p in PUBLISHED if p.source == "maf"]
    assert len(maf) == 8 * 5 + 8 * 4  # Table 1, and Table 2's four columns
    cell = next(p for p in maf if p.model == "MAF MoG (5)" and p.dataset == "bsds300")
    assert (cell.mean, cell.se2, cell.decimals) == (156.36, 0.28, 2)
    rel = [p for p in PUBLISHED if p.source == "relgrad"]
    assert {p.dataset: p.mean for p in rel}["hepmass"] == -21.958
    assert sum(p.unverified for p in PUBLISHED) == 11 + 16  # + Table 2's conditional columns
    cond = next(p for p in maf if p.model == "MAF (10)" and p.dataset == "cifar10-cond")
    assert (cond.mean, cond.se2, cond.decimals, cond.unverified) == (3058, 26, 0, True)
    with pytest.raises(ConfigError, match="unknown published source"):
        published(["nope"])


def test_table_errors(tmp_path):
    with pytest.raises(ConfigError, match="no run records"):
        list(iter_records(tmp_path))
    write_fixture(tmp_path)
    with pytest.raises(ConfigError, match="--select"):
        build_table(list(iter_records(tmp_path)), [], "worst")
    with pytest.raises(UsageError, match="already exists"):
        r = fake_record("power", "maf", "MAF (5)", 0, 0.2, 0.01, 0.2)
        write_record(record_path(tmp_path, "power", "maf", 0), r)
    with pytest.raises(ConfigError, match="file name"):
        record_path(tmp_path, "power", "maf", 0, tag="../evil")


def test_a_results_folder_without_records_gives_the_published_rows_and_says_so(tmp_path, capsys):
    from flowbench.cli import main

    (tmp_path / "runs" / "power" / "relgrad").mkdir(parents=True)  # what a run refused before training leaves
    assert main(["table", "--results", str(tmp_path), "--datasets", "power"]) == 0
    out, err = capsys.readouterr()
    assert "| MAF (5) " in out and "| ours " not in out
    assert f"note: no run records under {tmp_path / 'runs'}, so the table holds the published rows only" in err
    write_fixture(tmp_path)
    assert main(["table", "--results", str(tmp_path), "--datasets", "power"]) == 0
    out, err = capsys.readouterr()
    assert "| ours " in out and "no run records" not in err


def test_failed_runs_are_footnoted(tmp_path):
    r = fake_record("gas", "made", "MADE", 0, 1.5, 0.02, 1.4, status="nonfinite", failure="non-finite training loss")
    write_record(record_path(tmp_path, "gas", "made", 0), r)
    r2 = fake_record("gas", "maf", "MAF (5)", 0, None, None, None, status="nonfinite", failure="diverged at once")
    write_record(record_path(tmp_path, "gas", "maf", 0), r2)
    text = build_table(list(iter_records(tmp_path)), [], "best-val")
    # a failed seed is left out of the value (here: the only seed, so N/A), its number kept in the footnote
    assert "| MADE    | ours     | N/A [1]" in text
    assert "[1] seed 0: status nonfinite (non-finite training loss), test LL 1.50; left out of the value" in text
    assert "| MAF (5) | ours     | N/A [2]" in text


def test_matched_baselines_are_rows_of_their_own(tmp_path):
    # A MAF matched to relgrad's parameter count must not compete with the MAF-table configuration.
    plain = fake_record("power", "maf", "MAF (5)", 0, 0.20, 0.01, 0.90)
    matched = fake_record("power", "maf", "MAF (5)", 0, 0.05, 0.01, 0.10, tag="match-params=relgrad")
    matched.match_target = {"against": "relgrad", "target": 84, "achieved": 215}
    for r in (plain, matched):
        write_record(record_path(tmp_path, r.dataset, r.model, r.seed, r.tag), r)
    text = build_table(list(iter_records(tmp_path)), [], "best-val")
    rows = [ln for ln in text.splitlines() if ln.startswith("| MAF (5)")]
    assert len(rows) == 2
    assert any("[matched to relgrad]" in ln and "0.05 ± 0.01" in ln for ln in rows)
    assert any("[matched to relgrad]" not in ln and "0.20 ± 0.01" in ln for ln in rows)


def test_format_1_records_still_load_and_give_the_same_table(tmp_path):
    """Records written before the format bump (``*_se2`` names, no ``format`` key) read as format 2."""
    write_fixture(tmp_path / "v2")
    for rec in iter_records(tmp_path / "v2"):
        old = rec.to_json()
        del old["format"]
        for new_name, old_name in (("test_ll_2se", "test_ll_se2"), ("bits_per_pixel_2se", "bits_per_pixel_se2")):
            old[old_name] = old.pop(new_name)
        path = Path(rec.path.replace(str(tmp_path / "v2"), str(tmp_path / "v1")))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(old))
    v1 = list(iter_records(tmp_path / "v1"))
    assert v1[0].test_ll_2se is not None and "test_ll_se2" not in v1[0].extra
    assert build_table(v1, ["maf", "relgrad"]) == GOLDEN.read_text()
    written = json.loads(next((tmp_path / "v2").rglob("seed*.json")).read_text())
    assert written["format"] == 2 and "test_ll_2se" in written and "test_ll_se2" not in written


def test_bad_records_are_named(tmp_path):
    path = record_path(tmp_path, "power", "maf", 0)
    path.parent.mkdir(parents=True)
    good = fake_record("power", "maf", "MAF (5)", 0, 0.2, 0.01, 0.2).to_json()
    for content, match in [
        (b"\xff\xfe{", "not UTF-8"),
        (b"{", "bad JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps(dict(good, test_ll="high")).encode(), "test_ll is 'high', not a number"),
        (json.dumps(dict(good, format=9)).encode(), "format 9"),
    ]:
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=match):
            list(iter_records(tmp_path))


def test_unverified_config_is_footnoted_beside_a_published_number(tmp_path):
    prov = {"verified": False, "source": "ours: 8 layers, lr 1e-4 (paper's Table 4 not legible)"}
    for dataset in ("power", "digits"):
        r = fake_record(dataset, "relgrad", "Relgrad dense flow", 0, -1.0, 0.01, -1.0)
        r.provenance = prov
        write_record(record_path(tmp_path, dataset, "relgrad", 0), r)
    ok = fake_record("power", "maf", "MAF (5)", 0, 0.2, 0.01, 0.2)
    ok.provenance = {"verified": True, "source": "MAF paper section 4"}
    write_record(record_path(tmp_path, "power", "maf", 0), ok)
    text = build_table(list(iter_records(tmp_path)), ["maf", "relgrad"], "best-val")
    ours = next(ln for ln in text.splitlines() if ln.startswith("| Relgrad dense flow") and "| ours" in ln)
    power, digits = ours.split("|")[3].strip(), ours.split("|")[-2].strip()
    mark = power.rsplit("[", 1)[1].rstrip("]")
    assert f"- [{mark}] ours, config unverified" in text
    assert "[" not in digits  # no published relgrad number on digits: nothing to caution against
    maf = next(ln for ln in text.splitlines() if ln.startswith("| MAF (5)") and "| ours" in ln)
    assert "[" not in maf  # verified config: no footnote


# -- export for papers: markdown, latex, csv, json (golden) ------------------------------------------------------

EXPORT_GOLDEN = {
    fmt: Path(__file__).parent / "golden" / f"table_rules.{ext}"
    for fmt, ext in (("markdown", "md"), ("latex", "tex"), ("csv", "csv"), ("json", "json"))
}


def sweep_fixture(out: Path) -> list:
    from test_aggregate import sweep_records, write_records

    return write_records(out, sweep_records())


@pytest.mark.parametrize("fmt", list(EXPORT_GOLDEN))
def test_golden_exports(tmp_path, fmt):
    text = build_table(sweep_fixture(tmp_path), ["maf", "relgrad"], "best-val", fmt=fmt)
    if os.environ.get("FLOWBENCH_UPDATE_GOLDEN"):  # regenerate deliberately, then review the diff
        EXPORT_GOLDEN[fmt].write_text(text)
    assert text == EXPORT_GOLDEN[fmt].read_text()


def test_exports_hold_the_cells_numbers_and_marks(tmp_path):
    import csv
    import io
    import math

    from test_aggregate import MAF_A, expected

    records = sweep_fixture(tmp_path)
    md = build_table(records, ["maf", "relgrad"], "best-val")
    rows = list(csv.DictReader(io.StringIO(build_table(records, ["maf", "relgrad"], "best-val", fmt="csv"))))
    doc = json.loads(build_table(records, ["maf", "relgrad"], "best-val", fmt="json"))
    assert len(rows) == len(doc["cells"])
    a = expected(MAF_A)
    row = next(r for r in rows if (r["model"], r["source"], r["dataset"]) == ("MAF (5)", "ours", "power"))
    assert (float(row["mean"]), float(row["pm_2se"]), float(row["sd"]), int(row["n"])) == pytest.approx(
        (a["mean"], a["pm"], a["sd"], 3), abs=1e-12
    )
    assert row["tag"] == "a" and row["seeds"] == "0 1 2" and row["bold"] == "0"
    for mark, note in zip(row["marks"].split(), row["notes"].split("\n")):
        assert f"- [{mark}] {note}" in md  # the marks are the Markdown table's footnote numbers
    gas = next(r for r in rows if (r["model"], r["source"], r["dataset"]) == ("MAF (5)", "ours", "gas"))
    assert gas["mean"] == "-inf" and gas["text"] == "−∞ (n=3)"
    pub = next(c for c in doc["cells"] if (c["model"], c["source"], c["dataset"]) == ("Gaussian", "maf", "bsds300"))
    assert (pub["mean"], pub["pm_2se"], pub["unverified"], pub["n"]) == (96.67, 0.25, True, None)
    assert doc["footnotes"][0]["mark"] == 1 and doc["sources"]["maf"]["label"] == "MAF paper"
    bold = {(c["model"], c["source"], c["dataset"]) for c in doc["cells"] if c["bold"]}
    assert {("MADE MoG", "maf", "power"), ("MAF (10)", "maf", "gas")} <= bold and not any(
        c["bold"] and c["mean"] is not None and not math.isfinite(c["mean"]) for c in doc["cells"]
    )
    assert bold == {(m, s, d) for (m, s), v in _md_cells(md).items() for d, t in v.items() if t.startswith("**")}


def _md_cells(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    head = [c.strip().lower().replace(" cond.", "-cond") for c in lines[0].split("|")[1:-1]]
    out = {}
    for ln in lines[1:]:
        row = [c.strip() for c in ln.split("|")[1:-1]]
        source = (
            "ours"
            if row[1] == "ours"
            else {"published: MAF paper": "maf", "published: relgrad paper": "relgrad"}[row[1]]
        )
        out[(row[0], source)] = dict(zip(head[2:], row[2:]))
    return out


def test_latex_is_well_formed(tmp_path):
    tex = build_table(sweep_fixture(tmp_path), ["maf", "relgrad"], "best-val", fmt="latex")
    lines = tex.splitlines()
    body = lines[lines.index(r"\midrule") + 1 : lines.index(r"\bottomrule")]
    spec = next(ln for ln in lines if ln.startswith(r"\begin{tabular}"))
    ncols = len(spec.split("{")[2].rstrip("}"))
    assert all(ln.endswith(r" \\") and ln.count(" & ") == ncols - 1 for ln in body)
    assert tex.count("{") == tex.count("}") and tex.count("$") % 2 == 0
    assert r"\toprule" in lines and r"\usepackage{booktabs}" in lines[0]
    assert r"$\mathbf{0.40 \pm 0.01}$" in tex and r"$-\infty$ ($n{=}3$)\textsuperscript{" in tex
    assert r"96.67 \pm 0.25$\textsuperscript{?}" in tex and "seed 3: status nonfinite" in tex


def test_table_cli_formats(tmp_path, capsys):
    from flowbench.cli import main

    sweep_fixture(tmp_path)
    for name, start in (
        ("t.tex", "% flowbench table"),
        ("t.csv", "model,source,dataset"),
        ("t.json", "{"),
        ("t.md", "Average test"),
    ):
        assert main(["table", "--results", str(tmp_path), "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / name).read_text().startswith(start)  # the format follows --out's suffix
    capsys.readouterr()
    assert main(["table", "--results", str(tmp_path), "--format", "csv", "--published", "none"]) == 0
    assert capsys.readouterr().out.startswith("model,source,dataset")
    with pytest.raises(ConfigError, match="unknown table format 'html'"):
        build_table(sweep_fixture(tmp_path / "again"), [], fmt="html")


def test_latex_keeps_en_dashes_and_literal_double_hyphens_apart():
    from flowbench.tables import _latex_text

    assert _latex_text("seeds 0–2, --max-epochs 30") == "seeds 0--2, -{}-max-epochs 30"


def test_conditional_records_have_their_own_column(tmp_path):
    """A class-conditional model's records (MAF Table 2) share the unconditional model's row, in a column of their
    own, never chosen against the unconditional configurations; ``--datasets`` picks columns."""
    for seed, (ll, val) in enumerate([(-1300.0, -1290.0), (-1302.0, -1291.0)]):
        write_record(
            record_path(tmp_path, "mnist", "maf", seed), fake_record("mnist", "maf", "MAF (5)", seed, ll, 1.7, val)
        )
        r = fake_record("mnist", "maf-cond", "MAF (5)", seed, ll - 10, 1.8, val + 50)  # better val: p(x|y)
        r.conditional = True
        write_record(record_path(tmp_path, "mnist", "maf-cond", seed), r)
    records = list(iter_records(tmp_path))
    text = build_table(records, [], "best-val")
    cells = _md_cells(text)
    assert list(cells) == [("MAF (5)", "ours")]  # one row, not "MAF (5) (maf)" and "MAF (5) (maf-cond)"
    assert cells[("MAF (5)", "ours")]["mnist"].startswith("**-1301.00 ± 1.70")
    assert cells[("MAF (5)", "ours")]["mnist-cond"].startswith("**-1311.00 ± 1.80")
    only = build_table(records, ["maf"], "best-val", datasets=["mnist-cond"])
    header = next(ln for ln in only.splitlines() if ln.startswith("| Model"))
    assert [c.strip() for c in header.split("|")[3:-1]] == ["MNIST cond."]
    assert "-1302.9 ± 1.7 ?" in only and "-1300.5" not in only
    with pytest.raises(ConfigError, match="unknown column"):
        build_table(records, [], "best-val", datasets=["mnist-conditional"])


def test_other_test_set_is_footnoted_and_never_bold_beside_the_paper(tmp_path):
    """A cell whose test set is not the size of the paper's split (POWER rebuilt from UCI: 204,925 test rows
    against MAF's 204,928) says it is other data, and is not bold above the published numbers even when its
    value is higher; the same value on the paper's split is bold, without the note."""

    def table(n_test):
        out = tmp_path / str(n_test)
        for s in (0, 1):
            r = fake_record("power", "relgrad", "Relgrad dense flow", s, 0.5, 0.014, 0.5)  # above MADE MoG's 0.40
            r.n_test = n_test
            write_record(record_path(out, r.dataset, r.model, r.seed, r.tag), r)
        text = build_table(list(iter_records(out)), ["maf", "relgrad"], "best-val")
        notes = dict(re.findall(r"^- \[(\d+)\] (.*)$", text, re.MULTILINE))
        rows = {
            ln.split("|")[1].strip() + "/" + ln.split("|")[2].strip(): ln.split("|")[3]
            for ln in text.splitlines()
            if ln.startswith("| ")
        }
        cell = rows["Relgrad dense flow/ours"]
        return cell, [notes[m] for m in re.findall(r"\[(\d+)\]", cell)], rows["MADE MoG/published: MAF paper"]

    cell, said, made_mog = table(204_925)
    assert any(
        n.startswith("test set of 204,925 points, not the 204,928 of the paper's POWER split: other data") for n in said
    )
    assert "**" not in cell and "**0.40 ± 0.01**" in made_mog  # the published best keeps the bold
    cell, said, made_mog = table(204_928)
    assert not any("test set of" in n for n in said)
    assert cell.strip().startswith("**0.50") and "**" not in made_mog
