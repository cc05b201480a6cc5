"""The results table from run records, beside the published numbers (MAF paper Table 1 layout), in Markdown,
LaTeX, CSV or JSON.

Rows are models (display names), columns datasets, cells ``mean ± 2 SE`` of the test log-likelihood in nats.
Which configuration and which seeds a cell reports, its value, ± and (sd, n), and when it may be bolded are the
rules of :mod:`flowbench.aggregate` (the same function chooses what the plots and the report show).

Bolding follows the MAF paper (Papamakarios et al. 2017), whose Table 1 caption reads: "The best performing
model for each dataset is shown in bold (multiple models are highlighted if the difference is not
statistically significant according to a paired t-test)". Here: the best value of each column (published or
ours) is bold; when that best is ours, every other row of ours whose per-point test log-likelihoods do not
differ from the best's by a two-sided paired t-test (``scipy.stats.ttest_rel``, α = :data:`ALPHA`) on the same
test points is bold too, seeds averaged point by point. Published rows have no per-point values, so they are
bold only as the column's best, and never by a test. A row of ours without per-point values (records written
before they were kept) is bolded by value only, with a footnote. The output is a pure function of the records
and their per-point files: same inputs, same bytes.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from tabulate import tabulate

from flowbench import aggregate as A
from flowbench.aggregate import ALPHA, row_order_key
from flowbench.data import DATASETS
from flowbench.errors import ConfigError, FlowbenchError
from flowbench.published import SOURCES, UNVERIFIED_NOTE, PublishedResult, published
from flowbench.results import RunRecord
from flowbench.status import convergence_note

__all__ = [
    "ALPHA",
    "BOLD_PUBLISHED",
    "BOLD_RULE",
    "FORMATS",
    "Table",
    "build_table",
    "compute_table",
    "parse_sources",
    "plugged_in_note",
    "render",
    "row_order_key",
]

FORMATS = ("markdown", "latex", "csv", "json")
_SOURCE_ORDER = {"maf": 0, "relgrad": 1, "beyond": 2, "ours": 3}

#: The bolding rule, as the table's notes state it (the second sentence when published rows are shown).
BOLD_RULE = (
    "Bold: the best value of each column, and every other row of ours whose per-point test log-likelihoods do "
    "not differ significantly from the best's by a paired t-test (two-sided, scipy.stats.ttest_rel, "
    f"α = {ALPHA:g}) on the same test points, its seeds averaged point by point: the MAF paper's rule "
    '("multiple models are highlighted if the difference is not statistically significant according to a paired '
    't-test", Table 1). A cell with a seed left out or a −∞ seed is never bold'
)
BOLD_PUBLISHED = (
    "; published rows have no per-point values: bold only as the column's best, and a row of ours is tested only "
    "when the column's best is ours"
)
#: Footnotes of our cell that could not be t-tested against its column's best (ours): bold only at the best value.
NO_POINTS_NOTE = (
    "no paired t-test against the column's best: this row or the best has no per-point test "
    "log-likelihoods beside its records (written before flowbench kept them), so bold only at the best "
    "value (the rule before the test)"
)
OTHER_POINTS_NOTE = (
    "no paired t-test against the column's best: not evaluated on the same test points, so bold only at the best value"
)


@dataclass
class _Cell:
    mean: float
    se2: float | None
    decimals: int
    notes: list[str] = field(default_factory=list)
    unverified: bool = False
    #: our runs' config file is not confirmed to be the paper's (its ``[provenance]`` says so): its source text
    config_unverified: str | None = None
    spread: tuple[float | None, int] | None = None  # (sd of the per-seed test LLs or None, number of seeds), n ≥ 2
    can_bold: bool = True
    other_data: bool = False  # its test set is not the paper's split (see other_test_set_note)
    config: A.Configuration | None = None  # ours: the configuration behind the cell
    bold: bool = False
    marks: list[int] = field(default_factory=list)  # footnote numbers, filled in by compute_table


@dataclass
class _Row:
    label: str
    source: str  # "ours" or a published source key
    cells: dict[str, _Cell] = field(default_factory=dict)


@dataclass
class Table:
    """A laid-out table: rows in order, bold and footnote marks decided; :func:`render` writes it out."""

    heading: str
    columns: list[str]
    rows: list[_Row]
    footnotes: list[str]  # numbered from 1 in this order
    notes: list[str]  # the closing notes after the numbered footnotes (bold rule, ``?``, citations)
    sources: list[str]


def parse_sources(text: str | None) -> list[str]:
    """``"maf,relgrad"`` → ``["maf", "relgrad"]``; ``"none"`` or empty → ``[]``."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    return [s.strip() for s in text.split(",") if s.strip()]


def _fmt(x: float, decimals: int) -> str:
    s = f"{x:.{decimals}f}"
    return "0" + s[2:] if s.startswith("-0") and float(s) == 0 else s  # no "-0.00"


def _our_decimals(se2: float | None) -> int:
    return 2 if se2 is None or not math.isfinite(se2) or se2 >= 0.01 else 3


def _nonfinite_note(r: RunRecord) -> str:
    others = ""
    if r.test_ll_finite is not None and math.isfinite(r.test_ll_finite):
        se = f" ± {r.test_ll_finite_2se:.2f}" if r.test_ll_finite_2se is not None else ""
        others = f"; over the other {r.n_test - r.n_nonfinite_test} it is {r.test_ll_finite:.2f}{se}"
    return (
        f"seed {r.seed}: {r.n_nonfinite_test} of {r.n_test} test points have log-density −inf (below float "
        f"range), so the mean over all points is −inf and so is the cell's mean over seeds (never bold)"
        f"{others}"
    )


@functools.lru_cache(maxsize=None)
def _importable(ref: str) -> str | None:
    """None when a plugged-in model's reference still resolves, else why not (one line)."""
    from flowbench.models import MODELS  # lazy: imports torch, which the table does not otherwise need

    try:
        MODELS.resolve(ref)
    except FlowbenchError as e:
        return str(e).split("\n")[0]
    return None


def plugged_in_note(r: RunRecord) -> str | None:
    """The footnote of a row whose model was plugged in (by reference, or by an installed plugin): where from,
    and whether it still imports (a record keeps its numbers either way)."""
    origin = r.model_origin or {}
    if r.model_ref:
        note, key = f"model {r.model!r} plugged in from {r.model_ref}", r.model_ref
    elif origin.get("kind") == "plugin":
        note, key = (
            f"model {r.model!r} from the plugin {origin.get('detail', '')} ({origin.get('reference', '')})",
            r.model,
        )
    else:
        return None
    why = _importable(key)
    if why is not None:
        note += f"; it can no longer be imported ({why}), so this row shows the numbers its records hold"
    return note


def other_test_set_note(runs: Iterable[RunRecord]) -> str | None:
    """The footnote of a cell whose test set is not the size of the paper's split of its dataset: other data than
    the paper's (POWER rebuilt from the UCI table has 204,925 test rows against MAF's 204,928; a small fixture or
    a subset has far fewer), so the published numbers beside it are not a like-for-like comparison."""
    runs = [r for r in runs if r.dataset in DATASETS]
    sizes = sorted({r.n_test for r in runs if r.n_test != DATASETS[r.dataset].sizes[2]})
    if not sizes:
        return None
    name = runs[0].dataset.upper()
    got = " and ".join(f"{n:,}" for n in sizes)
    return (
        f"test set of {got} points, not the {DATASETS[runs[0].dataset].sizes[2]:,} of the paper's {name} split: "
        f"other data than the paper's (a rebuild, a subset or a file of its own), not comparable with the "
        f"published numbers on {name}, so never bold beside them"
    )


def _selection_note(choice: A.Choice) -> str | None:
    if len(choice.tried) < 2:
        return None
    note = f"best of {len(choice.tried)} configurations by mean validation LL: tag {choice.config.tag or '(none)'}"
    if choice.tied:
        tied = ", ".join(t or "(none)" for t in choice.tied)
        note += f" (tied exactly with tag {tied}; the first tag in sorted order is taken)"
    return note


def _our_cell(choice: A.Choice) -> _Cell:
    """The cell of one chosen configuration (rules: :mod:`flowbench.aggregate`)."""
    conf = choice.config
    stats = A.cell_stats(conf)
    notes = []
    for r in conf.runs:
        if not A.counts(r):
            ll = f", test LL {r.test_ll:.2f}" if r.test_ll is not None and math.isfinite(r.test_ll) else ""
            notes.append(
                f"seed {r.seed}: status {r.status} ({r.failure}){ll}; left out of the value, ±, (sd, n) "
                "and the selection, and the cell is not bold"
            )
        if r.n_nonfinite_test and A.counts(r):
            notes.append(_nonfinite_note(r))
    capped = convergence_note(conf.runs)  # stopped by --max-epochs: not comparable with published numbers
    if capped:
        notes.append(capped)
    dec = _our_decimals(stats.se2)
    spread = None
    if stats.n > 1:
        spread = (stats.sd, stats.n)
        if math.isfinite(stats.value):
            lls = [r.test_ll for r in conf.counted]
            seeds = ", ".join(map(str, stats.seeds))
            notes.append(
                f"mean of {stats.n} seeds ({seeds}): the value is the mean of the per-seed test LLs, ± the mean "
                f"per-run 2 SE over test points; (sd, n) is the seed spread: the standard deviation of the "
                f"per-seed test LLs ({_fmt(stats.sd, dec + 1)}) and their count; range {_fmt(min(lls), dec)} to "
                f"{_fmt(max(lls), dec)}"
            )
    for note in dict.fromkeys(filter(None, map(plugged_in_note, conf.runs))):
        notes.append(note)
    other_data = other_test_set_note(conf.counted)
    if other_data is not None:
        notes.append(other_data)
    if (note := _selection_note(choice)) is not None:
        notes.append(note)
    cell = _Cell(
        stats.value,
        stats.se2,
        dec,
        notes,
        spread=spread,
        can_bold=stats.can_bold,
        other_data=bool(other_data),
        config=conf,
    )
    unverified = [r.provenance for r in conf.runs if r.provenance and not r.provenance.get("verified")]
    if unverified:
        cell.config_unverified = str(unverified[0].get("source", ""))
    return cell


#: Footnote of our cell when its config is not confirmed to be the paper's but a published number stands beside it.
CONFIG_UNVERIFIED_NOTE = (
    "ours, config unverified: the paper's settings for this cell could not be confirmed, so the run used ours "
    "(the config file's [provenance] says where they come from); not a reproduction of the published number"
)


def _published_rows(cells: Iterable[PublishedResult]) -> list[_Row]:
    rows: dict[tuple[str, str], _Row] = {}
    for p in cells:
        row = rows.setdefault((p.model, p.source), _Row(p.model, p.source))
        row.cells[p.dataset] = _Cell(p.mean, p.se2, p.decimals, [p.note] if p.note else [], p.unverified)
    return list(rows.values())


def _row_key(row: _Row) -> tuple:
    return (*row_order_key(row.label), _SOURCE_ORDER.get(row.source, 9), row.label)


def _bold_column(rows: list[_Row], d: str) -> None:
    """Mark the bold cells of column ``d`` (see :data:`BOLD_RULE`); footnote our untested cells."""
    cands = [(row, row.cells[d]) for row in rows if d in row.cells]
    cands = [(row, c) for row, c in cands if c.can_bold and math.isfinite(c.mean)]
    if not cands:
        return
    top = max(c.mean for _, c in cands)
    for _, c in cands:
        c.bold = c.mean == top
    best_row, best = next(((row, c) for row, c in cands if c.mean == top and row.source == "ours"), (None, None))
    if best is None:
        return  # a published best: nothing of ours can be paired with it
    points = {}

    def load(c: _Cell) -> tuple[Any, str | None, str | None]:
        if id(c) not in points:
            points[id(c)] = A.cell_points(c.config)
        return points[id(c)]

    ours = [c for row, c in cands if row.source == "ours" and c is not best]
    best_pts, best_sha, best_why = load(best) if ours else (None, None, None)
    for c in ours:
        if c.bold:
            continue  # an exact tie with the best
        pts, sha, why = load(c)
        if best_pts is None or pts is None:
            # Which seed or file exactly would make one footnote per cell; the rule that applies is what matters.
            mixed = any("different test points" in (w or "") for w in (why, best_why))
            c.notes.append(OTHER_POINTS_NOTE if mixed else NO_POINTS_NOTE)
            continue
        if sha != best_sha or pts.size != best_pts.size:
            c.notes.append(OTHER_POINTS_NOTE)
            continue
        p = A.paired_pvalue(best_pts, pts)
        if p >= ALPHA:
            c.bold = True
            c.notes.append(
                f"bold: not significantly below {best_row.label} (paired t-test over {pts.size} test "
                f"points, p = {p:.2g} ≥ {ALPHA:g})"
            )


def compute_table(
    records: list[RunRecord],
    sources: list[str] | tuple[str, ...] = ("maf", "relgrad"),
    select: str = "best-val",
    datasets: list[str] | None = None,
) -> Table:
    """Rows, cells, bold and footnotes for ``records`` and the published ``sources`` (rules: module docstring);
    ``datasets``: only these columns (dataset names, ``<dataset>-cond`` for the class-conditional columns)."""
    ours: dict[str, _Row] = {}
    for choice in A.choose(records, select):
        ours.setdefault(choice.row, _Row(choice.row, "ours")).cells[choice.config.column] = _our_cell(choice)
    pub = _published_rows(published(sources))
    rows = sorted([*ours.values(), *pub], key=_row_key)
    columns = _columns(rows, ours, datasets)
    _beside_published(ours, pub)
    for d in columns:
        _bold_column(rows, d)
    footnotes, any_unverified = _footnotes(rows, columns)
    notes = [BOLD_RULE + (BOLD_PUBLISHED if pub else "")] if ours else []
    if any_unverified:
        notes.append(f"? {UNVERIFIED_NOTE}")
    cited = [s for s in sources if s in SOURCES]
    notes += [f"{SOURCES[s][0]}: {SOURCES[s][1]}" for s in cited]
    return Table(_heading(columns), columns, rows, footnotes, notes, cited)


def _heading(columns: list[str]) -> str:
    """The caption, saying only what the columns shown need: which are in logit space, what cond. means."""
    bases = dict.fromkeys(c.removesuffix("-cond") for c in columns)  # MNIST cond. is MNIST's data: logit too
    names = [A.column_title(d) if d != "digits" else d for d in bases if getattr(DATASETS.get(d), "image", None)]
    logit = f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else "".join(names)
    return (
        "Average test log-likelihood in nats (higher is better), mean ± 2 standard errors over the test points. "
        "(sd S, n=N): standard deviation of the test LL over N seeds. "
        + (f"{logit[:1].upper()}{logit[1:]} in logit space. " if logit else "")  # a sentence's start: "Digits"
        + (
            "cond.: class-conditional models, their log p(x) under a uniform label prior. "
            if any(c.endswith("-cond") for c in columns)
            else ""
        )
        + "**Bold**: best in its column, and rows of ours not significantly below our best (paired t-test). "
        "N/A: no result."
    )


def _columns(rows: list[_Row], ours: dict[str, _Row], datasets: list[str] | None) -> list[str]:
    """The table's columns: every dataset with a cell, in registry order, limited to ``datasets`` if given."""
    present = {d for r in rows for d in r.cells}
    ours_datasets = {d for r in ours.values() for d in r.cells}
    # Each dataset in registry order, its class-conditional column (MAF Table 2) right after it.
    order = [c for d in DATASETS for c in (d, f"{d}-cond")]
    columns = [d for d in order if d in present] + sorted(ours_datasets - set(order))
    if datasets:
        unknown = [d for d in datasets if d not in order and d not in present]
        if unknown:
            raise ConfigError(
                f"--datasets: unknown column(s) {', '.join(unknown)}; choose from "
                f"{', '.join(d for d in order if d in present) or 'the datasets of the records'} "
                "(a class-conditional model's column is <dataset>-cond)"
            )
        columns = [d for d in columns if d in datasets]
    return columns


def _beside_published(ours: dict[str, _Row], pub: list[_Row]) -> None:
    """The rules for a cell of ours beside published numbers: an unverified config is footnoted where a published
    number of the same row stands in its column (that number came from settings we could not confirm: ours are
    a guess); a cell on other data than the paper's split is never bold in a column with published numbers
    ("best in its column" would compare numbers on different test sets)."""
    published_cells = {(r.label, d) for r in pub for d in r.cells}
    published_columns = {d for _, d in published_cells}
    for row in ours.values():
        for d, cell in row.cells.items():
            if cell.config_unverified is not None and (row.label.split(" [")[0], d) in published_cells:
                cell.notes.append(CONFIG_UNVERIFIED_NOTE)
            if cell.other_data and d in published_columns:
                cell.can_bold = False


def _footnotes(rows: list[_Row], columns: list[str]) -> tuple[list[str], bool]:
    """Number the shown cells' notes (each cell's marks set); the footnotes, and whether any cell is unverified."""
    footnotes: list[str] = []
    any_unverified = False
    for row in rows:
        for d in columns:
            cell = row.cells.get(d)
            if cell is None:
                continue
            any_unverified |= cell.unverified
            for note in cell.notes:
                if note not in footnotes:
                    footnotes.append(note)
            cell.marks = sorted({footnotes.index(note) + 1 for note in cell.notes})
    return footnotes, any_unverified


# -- output formats -------------------------------------------------------------------------------------------


def _source_text(row: _Row) -> str:
    return "ours" if row.source == "ours" else f"published: {SOURCES[row.source][0]}"


def _value_text(cell: _Cell) -> str:
    """The cell as Markdown shows it, without marks."""
    if cell.mean == -math.inf:
        return "−∞" + (f" (n={cell.spread[1]})" if cell.spread else "")
    if not math.isfinite(cell.mean):
        return "N/A"
    text = _fmt(cell.mean, cell.decimals)
    if cell.se2 is not None:
        text += f" ± {_fmt(cell.se2, cell.decimals)}"
    if cell.bold:
        text = f"**{text}**"
    if cell.spread is not None:
        text += f" (sd {_fmt(cell.spread[0], cell.decimals)}, n={cell.spread[1]})"
    return text


def _markdown(t: Table) -> str:
    body = []
    for row in t.rows:
        line = [row.label, _source_text(row)]
        for d in t.columns:
            cell = row.cells.get(d)
            if cell is None:
                line.append("N/A")
                continue
            marks = ("?" if cell.unverified else "") + "".join(f"[{m}]" for m in cell.marks)
            line.append(_value_text(cell) + (" " + marks if marks else ""))
        body.append(line)
    headers = ["Model", "Source"] + [A.column_title(d) for d in t.columns]
    out = [t.heading, "", tabulate(body, headers=headers, tablefmt="github", disable_numparse=True, stralign="left")]
    notes = [f"[{i}] {n}" for i, n in enumerate(t.footnotes, 1)] + t.notes
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_UNICODE = {
    "−": "$-$",
    "±": r"$\pm$",
    "∞": r"$\infty$",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
    "α": r"$\alpha$",
    "×": r"$\times$",
    "→": r"$\to$",
    "–": "--",
    "Σ": r"$\Sigma$",
    "…": r"\dots{}",
}


def _latex_text(text: str) -> str:
    """Plain text (footnotes, labels) as LaTeX: specials escaped, ``**x**`` bold, ``--`` kept as two hyphens."""
    text = text.replace("--", "-\0-")  # a literal "--" stays two hyphens; "–" becomes LaTeX's en dash "--"
    out = "".join(_LATEX_SPECIAL.get(ch, _LATEX_UNICODE.get(ch, ch)) for ch in text).replace(
        "$-$$\\infty$", "$-\\infty$"
    )
    out = out.replace("-\0-", "-{}-").replace('"', "''")
    return re.sub(r"\*\*(.+?)\*\*", r"\\textbf{\1}", out)


def _latex_cell(cell: _Cell | None) -> str:
    if cell is None or math.isnan(cell.mean):
        text = "N/A"
    elif cell.mean == -math.inf:
        text = r"$-\infty$" + (f" ($n{{=}}{cell.spread[1]}$)" if cell.spread else "")
    else:
        value = _fmt(cell.mean, cell.decimals) + (
            rf" \pm {_fmt(cell.se2, cell.decimals)}" if cell.se2 is not None else ""
        )
        text = rf"$\mathbf{{{value}}}$" if cell.bold else f"${value}$"
        if cell.spread is not None:
            text += f" (sd {_fmt(cell.spread[0], cell.decimals)}, $n{{=}}{cell.spread[1]}$)"
    marks = (["?"] if cell is not None and cell.unverified else []) + [str(m) for m in (cell.marks if cell else [])]
    return text + (rf"\textsuperscript{{{','.join(marks)}}}" if marks else "")


def _latex(t: Table) -> str:
    lines = [
        r"% flowbench table: needs \usepackage{booktabs} in the preamble",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_latex_text(t.heading)}}}",
        r"\begin{tabular}{ll" + "l" * len(t.columns) + "}",
        r"\toprule",
        " & ".join(["Model", "Source"] + [_latex_text(A.column_title(d)) for d in t.columns]) + r" \\",
        r"\midrule",
    ]
    for row in t.rows:
        cells = [_latex_text(row.label), _latex_text(_source_text(row))] + [
            _latex_cell(row.cells.get(d)) for d in t.columns
        ]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "", r"\smallskip", r"\footnotesize"]
    notes = [rf"\textsuperscript{{{i}}}{_latex_text(n)}" for i, n in enumerate(t.footnotes, 1)]
    for n in t.notes:
        notes.append(rf"\textsuperscript{{?}}{_latex_text(n[2:])}" if n.startswith("? ") else _latex_text(n))
    lines += [n + r"\par" for n in notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


#: One row per cell: the columns of the CSV export and the keys of the JSON export's cells.
CELL_FIELDS = (
    "model",
    "source",
    "dataset",
    "tag",
    "mean",
    "pm_2se",
    "sd",
    "n",
    "seeds",
    "bold",
    "unverified",
    "marks",
    "notes",
    "text",
)


def _cell_rows(t: Table) -> list[dict[str, Any]]:
    out = []
    for row in t.rows:
        for d in t.columns:
            cell = row.cells.get(d)
            if cell is None:
                continue
            conf = cell.config
            out.append(
                {
                    "model": row.label,
                    "source": row.source,
                    "dataset": d,
                    "tag": conf.tag if conf is not None else None,
                    "mean": cell.mean if not math.isnan(cell.mean) else None,
                    "pm_2se": cell.se2,
                    "sd": cell.spread[0] if cell.spread else None,
                    "n": len(conf.counted) if conf is not None else None,
                    "seeds": [int(r.seed) for r in conf.counted] if conf is not None else None,
                    "bold": cell.bold,
                    "unverified": cell.unverified,
                    "marks": list(cell.marks),
                    "notes": [t.footnotes[m - 1] for m in cell.marks],
                    "text": _value_text(cell).replace("**", ""),
                }
            )
    return out


def _csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CELL_FIELDS, lineterminator="\n")
    w.writeheader()
    for c in _cell_rows(t):
        w.writerow(
            {
                **c,
                "mean": "" if c["mean"] is None else repr(float(c["mean"])),
                "seeds": " ".join(map(str, c["seeds"] or [])),
                "marks": " ".join(map(str, c["marks"])),
                "notes": "\n".join(c["notes"]),
                "bold": int(c["bold"]),
                "unverified": int(c["unverified"]),
                **{k: "" if c[k] is None else c[k] for k in ("tag", "pm_2se", "sd", "n")},
            }
        )
    return buf.getvalue()


def _json(t: Table) -> str:
    cells = []
    for c in _cell_rows(t):
        minus_inf = c["mean"] == -math.inf
        cells.append({**c, "mean": None if minus_inf else c["mean"], "minus_infinity": minus_inf})
    doc = {
        "caption": t.heading,
        "columns": t.columns,
        "cells": cells,
        "footnotes": [{"mark": i, "text": n} for i, n in enumerate(t.footnotes, 1)],
        "notes": t.notes,
        "sources": {s: {"label": SOURCES[s][0], "citation": SOURCES[s][1]} for s in t.sources},
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def render(table: Table, fmt: str = "markdown") -> str:
    """``table`` as ``markdown`` (GitHub table), ``latex`` (booktabs), ``csv`` or ``json`` (one row per cell,
    with mean, ± 2 SE, sd, n, source and marks in columns of their own).

    Raises:
        ConfigError: an unknown format.
    """
    writers = {"markdown": _markdown, "latex": _latex, "csv": _csv, "json": _json}
    if fmt not in writers:
        raise ConfigError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return writers[fmt](table)


def build_table(
    records: list[RunRecord],
    sources: list[str] | tuple[str, ...] = ("maf", "relgrad"),
    select: str = "best-val",
    fmt: str = "markdown",
    datasets: list[str] | None = None,
) -> str:
    """The table (a heading line, the rows, the footnotes) for ``records`` and published ``sources``, as ``fmt``."""
    return render(compute_table(records, sources, select, datasets), fmt)
