"""Markdown results table from run records, beside the published numbers (MAF paper Table 1 layout).

Rows are models (display names), columns datasets, cells ``mean ± 2 SE`` of the test log-likelihood in nats.
Several seeds of one configuration: the cell is the mean over seeds, ± the mean per-run 2 SE, followed by the
seed spread ``(sd S, n=N)``: the standard deviation of the per-seed test LLs and their count (a different
quantity, never folded into the ± 2 SE); a footnote says which is which and gives the range. Several
configurations (tags) of one model on one dataset: ``select="best-val"`` keeps the one with the best mean
validation log-likelihood and a footnote says how many were tried (model selection on validation data only,
as in the MAF paper). The output is a pure function of the records: same records, same bytes.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from tabulate import tabulate

from flowbench.data import DATASETS
from flowbench.errors import ConfigError, FlowbenchError
from flowbench.plots.status import convergence_note
from flowbench.published import SOURCES, UNVERIFIED_NOTE, PublishedResult, published
from flowbench.results import RunRecord

__all__ = ["build_table", "parse_sources", "row_order_key"]

_SOURCE_ORDER = {"maf": 0, "relgrad": 1, "beyond": 2, "ours": 3}


@dataclass
class _Cell:
    mean: float
    se2: float | None
    decimals: int
    notes: list[str] = field(default_factory=list)
    unverified: bool = False
    #: our runs' config file is not confirmed to be the paper's (its ``[provenance]`` says so): its source text
    config_unverified: str | None = None
    spread: tuple[float, int] | None = None  # (std of the per-seed test LLs, number of seeds) for n ≥ 2


@dataclass
class _Row:
    label: str
    source: str  # "ours" or a published source key
    cells: dict[str, _Cell] = field(default_factory=dict)


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


def _mean_val_ll(runs: list[RunRecord]) -> float:
    """Mean best validation LL of ``runs`` (those without one left out); -inf when none has one."""
    vals = [r.best_val_ll for r in runs if r.best_val_ll is not None]
    return statistics.fmean(vals) if vals else -math.inf


def _select(records: list[RunRecord], select: str) -> list[_Row]:
    """Group records into our rows (one per display name, or per display name and tag with ``all``)."""
    if select not in ("best-val", "all"):
        raise ConfigError(f"unknown --select {select!r}; use best-val or all")
    groups: dict[tuple[str, str], dict[str | None, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    names: dict[str, set[str]] = defaultdict(set)
    for r in records:
        names[r.display_name].add(r.model)
    for r in records:
        label = r.display_name
        if len(names[label]) > 1:  # two models with one label (a plugged-in flow named like a built-in's row)
            label += f" ({r.model})"
        against = (r.match_target or {}).get("against")
        if against:  # parameter-matched baselines (relgrad Table 1) are rows of their own
            label += f" [matched to {against}]"
        groups[(label, r.dataset)][r.tag].append(r)
    rows: dict[str, _Row] = {}
    for (label, dataset), by_tag in sorted(groups.items()):
        tags = sorted(by_tag, key=lambda t: (t is not None, t or ""))
        if select == "best-val":
            # Highest mean validation LL; ties go to the first tag in sorted order (deterministic).
            best = max(tags, key=lambda t: (_mean_val_ll(by_tag[t]), -tags.index(t)))
            chosen = [(label, best)]
        else:
            chosen = [(f"{label} [{t}]" if t else label, t) for t in tags]
        for row_label, tag in chosen:
            runs = sorted(by_tag[tag], key=lambda r: r.seed)
            cell = _cell_from_runs(runs, dataset)
            if select == "best-val" and len(tags) > 1:
                cell.notes.append(
                    f"best of {len(tags)} configurations by mean validation LL: tag {tag or '(none)'}"
                )
            rows.setdefault(row_label, _Row(row_label, "ours")).cells[dataset] = cell
    return list(rows.values())


def _nonfinite_note(r: RunRecord) -> str:
    others = ""
    if r.test_ll_finite is not None and math.isfinite(r.test_ll_finite):
        se = f" ± {r.test_ll_finite_2se:.2f}" if r.test_ll_finite_2se is not None else ""
        others = f"; over the other {r.n_test - r.n_nonfinite_test} it is {r.test_ll_finite:.2f}{se}"
    return (f"seed {r.seed}: {r.n_nonfinite_test} of {r.n_test} test points have log-density −inf (below float "
            f"range), so the mean over all points is −inf{others}")


@functools.lru_cache(maxsize=None)
def _importable(ref: str) -> str | None:
    """None when a plugged-in model's reference still resolves, else why not (one line)."""
    from flowbench.models import MODELS

    try:
        MODELS.resolve(ref)
    except FlowbenchError as e:
        return str(e).split("\n")[0]
    return None


def plugged_in_note(r: RunRecord) -> str | None:
    """The footnote of a row whose model was plugged in by reference: where from, and whether it still imports
    (a record keeps its numbers either way)."""
    if not r.model_ref:
        return None
    note = f"model {r.model!r} plugged in from {r.model_ref}"
    why = _importable(r.model_ref)
    if why is not None:
        note += f"; it can no longer be imported ({why}), so this row shows the numbers its records hold"
    return note


def _cell_from_runs(runs: list[RunRecord], dataset: str) -> _Cell:
    cell = _cell_values(runs, dataset)
    for note in dict.fromkeys(filter(None, map(plugged_in_note, runs))):
        cell.notes.append(note)
    unverified = [r.provenance for r in runs if r.provenance and not r.provenance.get("verified")]
    if unverified:
        cell.config_unverified = str(unverified[0].get("source", ""))
    return cell


def _cell_values(runs: list[RunRecord], dataset: str) -> _Cell:
    finite = [r for r in runs if r.test_ll is not None and math.isfinite(r.test_ll)]
    notes = []
    for r in runs:
        if r.status != "ok":
            notes.append(f"seed {r.seed}: status {r.status} ({r.failure})")
        if r.n_nonfinite_test:
            notes.append(_nonfinite_note(r))
    capped = convergence_note(runs)  # stopped by --max-epochs: not comparable with published numbers
    if capped:
        notes.append(capped)
    if any(r.test_ll == -math.inf and r.status == "ok" for r in runs):
        # The protocol's mean over test points (and then over seeds) is −inf: shown as such, never dropped.
        return _Cell(-math.inf, None, 2, notes)
    if not finite:
        return _Cell(math.nan, None, 2, notes)
    means = [r.test_ll for r in finite]
    se2s = [r.test_ll_2se for r in finite if r.test_ll_2se is not None]
    mean = statistics.fmean(means)
    se2 = statistics.fmean(se2s) if se2s else None
    dec = _our_decimals(se2)
    spread = None
    if len(finite) > 1:
        seeds = ", ".join(str(r.seed) for r in finite)
        spread = (statistics.stdev(means), len(finite))
        notes.append(
            f"mean of {len(finite)} seeds ({seeds}): the value is the mean of the per-seed test LLs, ± the mean "
            f"per-run 2 SE over test points; (sd, n) is the seed spread: the standard deviation of the per-seed "
            f"test LLs ({_fmt(spread[0], dec + 1)}) and their count; range {_fmt(min(means), dec)} to "
            f"{_fmt(max(means), dec)}"
        )
    return _Cell(mean, se2, dec, notes, spread=spread)


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


@functools.lru_cache(maxsize=None)
def _label_patterns() -> tuple[tuple[re.Pattern, ...], ...]:
    """Per registered model, in registry order: its label template as a regex (``MAF ({layers})`` → ``MAF \\((.+)\\)``)."""
    from flowbench.models import MODELS

    pats = []
    for spec in MODELS.values():
        parts = re.split(r"\{[^}]*\}", spec.label)
        pats.append((re.compile("^" + "(.+?)".join(map(re.escape, parts)) + "$"),))
    return tuple(pats)


def row_order_key(label: str) -> tuple:
    """Rows in the order of the model registry, then by the label's numbers (``Real NVP (5)`` before ``(10)``);
    labels of no registered model (published rows such as Glow) come after, alphabetically."""
    base = label.split(" [")[0]
    for index, (pattern,) in enumerate(_label_patterns()):
        m = pattern.match(base)
        if m:
            values = tuple((0, float(v), "") if re.fullmatch(r"-?\d+(\.\d*)?", v) else (1, 0.0, v) for v in m.groups())
            return (index, values, "")
    return (len(_label_patterns()), (), base)


def _row_key(row: _Row) -> tuple:
    return (*row_order_key(row.label), _SOURCE_ORDER.get(row.source, 9), row.label)


def build_table(
    records: list[RunRecord],
    sources: list[str] | tuple[str, ...] = ("maf", "relgrad"),
    select: str = "best-val",
) -> str:
    """The Markdown table (with a heading line and footnotes) for ``records`` and published ``sources``."""
    ours = _select(records, select)
    pub = _published_rows(published(sources))
    rows = sorted(ours + pub, key=_row_key)
    present = {d for r in rows for d in r.cells}
    ours_datasets = {d for r in ours for d in r.cells}
    order = list(DATASETS)
    extra = sorted(ours_datasets - set(order))
    # Published-only datasets outside flowbench's list (CIFAR-10) are left out: nothing of ours to compare.
    columns = [d for d in order if d in present] + extra

    best: dict[str, float] = {}
    for d in columns:
        vals = [r.cells[d].mean for r in rows if d in r.cells and math.isfinite(r.cells[d].mean)]
        if vals:
            best[d] = max(vals)

    footnotes: list[str] = []
    any_unverified = False
    published_cells = {(r.label, d) for r in pub for d in r.cells}
    for row in ours:
        for d, cell in row.cells.items():
            if cell.config_unverified is not None and (row.label.split(" [")[0], d) in published_cells:
                # The published number beside it came from settings we could not confirm: say ours are a guess.
                cell.notes.append(CONFIG_UNVERIFIED_NOTE)
    body = []
    for row in rows:
        source = "ours" if row.source == "ours" else f"published: {SOURCES[row.source][0]}"
        line = [row.label, source]
        for d in columns:
            cell = row.cells.get(d)
            if cell is not None and cell.mean == -math.inf:
                text = "−∞"
            elif cell is None or not math.isfinite(cell.mean):
                text = "N/A"
            else:
                text = _fmt(cell.mean, cell.decimals)
                if cell.se2 is not None:
                    text += f" ± {_fmt(cell.se2, cell.decimals)}"
                if d in best and cell.mean == best[d]:
                    text = f"**{text}**"
                if cell.spread is not None:
                    text += f" (sd {_fmt(cell.spread[0], cell.decimals)}, n={cell.spread[1]})"
            marks = ""
            if cell is not None and cell.unverified:
                marks += "?"
                any_unverified = True
            for note in cell.notes if cell is not None else []:
                if note not in footnotes:
                    footnotes.append(note)
                marks += f"[{footnotes.index(note) + 1}]"
            line.append(text + (" " + marks if marks else ""))
        body.append(line)

    headers = ["Model", "Source"] + [d.upper() for d in columns]
    out = [
        "Average test log-likelihood in nats (higher is better), mean ± 2 standard errors over the test points. "
        "(sd S, n=N): standard deviation of the test LL over N seeds. "
        "MNIST and digits in logit space. **Bold**: best in its column. N/A: no result.",
        "",
        tabulate(body, headers=headers, tablefmt="github", disable_numparse=True, stralign="left"),
    ]
    notes = [f"[{i}] {n}" for i, n in enumerate(footnotes, 1)]
    if any_unverified:
        notes.append(f"? {UNVERIFIED_NOTE}")
    cited = [s for s in sources if s in SOURCES]
    notes += [f"{SOURCES[s][0]}: {SOURCES[s][1]}" for s in cited]
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"
