"""``flowbench report``: one page with the comparison table, the curves, the samples and every run's status.

The page is written as Markdown (PNGs in a ``<name>_files/`` folder beside it) or as a single HTML file with
the PNGs embedded, from the same Markdown source, so both say the same thing. The table is also exported as
LaTeX, CSV and JSON beside it (embedded in the HTML page) and linked. Configurations are chosen by the table's
own function, :func:`flowbench.aggregate.choose` (``best-val``: the tag with the best mean validation LL, as in
the MAF paper; ``all``). Runs capped by ``--max-epochs`` are footnoted in the table as not converged: they are
not comparable with published numbers.
"""

from __future__ import annotations

import base64
import html
import math
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from flowbench import __version__
from flowbench import status as S
from flowbench.aggregate import SELECT_MODES, choose, column, configurations
from flowbench.errors import ConfigError, FlowbenchError
from flowbench.plots import _records as R
from flowbench.plots._mpl import png_bytes
from flowbench.plots.curves import dataset_order, plot_curves
from flowbench.results import PendingRun, runs_without_record
from flowbench.tables import compute_table, render
from flowbench.utils import atomic_write

__all__ = ["FORMATS", "build_report", "format_seconds", "markdown_to_html", "report_markdown", "total_wall_time"]

FORMATS = (".md", ".html")
#: The table's exports beside the report (format, file name, link text); the HTML page embeds them as downloads.
EXPORTS = (("latex", "table.tex", "LaTeX (booktabs)"), ("csv", "table.csv", "CSV"), ("json", "table.json", "JSON"))
_MIME = {".png": "image/png", ".tex": "text/x-tex", ".csv": "text/csv", ".json": "application/json"}


def format_seconds(s: float) -> str:
    """``12.3 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if not math.isfinite(s):
        return "?"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _num(x: float, decimals: int = 2) -> str:
    return f"{x:.{decimals}f}" if math.isfinite(x) else "N/A"


def _cell(text: str) -> str:
    """Table cell text: pipes escaped (log|det W| in a failure message must not split the row)."""
    return text.replace("|", "\\|").replace("\n", " ")


@dataclass
class _Page:
    """The Markdown lines and the figures they refer to (file name → PNG bytes)."""

    lines: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, name: str, png: bytes, alt: str, folder: str) -> None:
        self.figures[name] = png
        self.add(f"![{alt}]({folder}/{name})", "")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_")


def _runs_table(records: list[Any], failed: list[R.FailedRun]) -> str:
    rows = []
    confs = configurations(records)
    for ds in dataset_order(records):  # datasets in the table's column order, models in its row order
        for r in (r for c in confs if c.dataset == ds for r in c.runs):
            se = R.test_ll_2se(r)
            test = _num(R.test_ll(r)) + (f" ± {_num(se)}" if math.isfinite(se) else "")
            wall = format_seconds(R.wall_time_s(r))
            if stack := R.field(r, "stack"):  # its wall time is the whole stack's
                wall += f" (stack of {stack.get('size', '?')})"
            rows.append(
                [
                    column(r),  # mnist-cond for a class-conditional model: its table column
                    _cell(R.label(r, with_tag=True)),
                    R.seed(r),
                    _cell(S.run_status(r).text),
                    R.epochs(r),
                    _num(R.best_val_ll(r)),
                    test,
                    R.params(r) or "",
                    wall,
                ]
            )
    for f in failed:
        rows.append(
            [f.dataset, _cell(f.label), f.seed, _cell(f"failed (sweep {f.sweep}): {f.error}"), "", "", "", "", ""]
        )
    headers = [
        "dataset",
        "model",
        "seed",
        "status",
        "epochs",
        "best val LL",
        "test LL ± 2 SE (nats)",
        "params",
        "wall time",
    ]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True, stralign="left")


def total_wall_time(records: Iterable[Any]) -> float:
    """The wall time of ``records``, a stack's once: each run of a stack records the whole stack's wall time.

    A stack is its record's ``stack["id"]``; records written before the id was kept are grouped by dataset, model,
    tag and the stack's seeds (a sweep's stack of several tags is then counted once per tag)."""
    singles, stacks = 0.0, {}
    for r in records:
        w = R.wall_time_s(r)
        if not math.isfinite(w):
            continue
        stack = R.field(r, "stack")
        if not stack:
            singles += w
            continue
        key = stack.get("id") or (R.dataset(r), R.model(r), R.tag(r), tuple(stack.get("seeds") or ()))
        stacks[key] = max(stacks.get(key, 0.0), w)  # the last record written holds the others' evaluation too
    return singles + sum(stacks.values())


class _Data:
    """Each dataset loaded once for all the sample figures (a failure to load is remembered too)."""

    def __init__(self, data_root: str | Path | None):
        self.data_root = data_root
        self._cache: dict[tuple, Any] = {}

    def __call__(self, rec: Any) -> Any:
        from flowbench.plots.samples import TOY_PREFIX, load_dataset_for

        toy = R.dataset(rec).startswith(TOY_PREFIX)
        key = (R.dataset(rec), R.seed(rec) if toy else None)  # toy data are drawn with the run's seed
        if key not in self._cache:
            try:
                self._cache[key] = load_dataset_for(rec, self.data_root)
            except FlowbenchError as e:
                self._cache[key] = e
        if isinstance(self._cache[key], FlowbenchError):
            raise self._cache[key]
        return self._cache[key]


def _sample_png(rec: Any, data: _Data) -> bytes:
    from flowbench.plots.samples import (
        TOY_PREFIX,
        check_checkpoint,
        plot_samples,
        save_samples,
    )

    check_checkpoint(rec)  # before loading any data
    if R.dataset(rec).startswith(TOY_PREFIX):  # the toy figure is written by flowbench.sanity.toy2d itself
        with tempfile.TemporaryDirectory() as tmp:
            return save_samples(rec, Path(tmp) / "toy.png", data=data(rec)).read_bytes()
    return png_bytes(plot_samples(rec, data(rec)))


def report_markdown(
    results: str | Path,
    *,
    folder: str = "report_files",
    sources: Iterable[str] = ("maf", "relgrad"),
    select: str = "best-val",
    datasets: Iterable[str] | None = None,
    models: Iterable[str] | None = None,
    samples: bool = True,
    data_root: str | Path | None = None,
) -> tuple[str, dict[str, bytes]]:
    """The report as Markdown whose images are ``<folder>/<name>.png``, and those PNGs by name."""
    if select not in SELECT_MODES:
        raise ConfigError(f"unknown --select {select!r}; use best-val or all")
    sources = list(sources)
    datasets, models = (list(x) if x else None for x in (datasets, models))
    # A run still training counts as present: a folder of long runs has a report before its first record. Only
    # the selected runs' checkpoints are read.
    kept = R.select_runs(R.load_runs(results) + runs_without_record(results), datasets, models)
    records = [r for r in kept if not isinstance(r, PendingRun)]
    running, unread = R.read_progress(r for r in kept if isinstance(r, PendingRun))
    failed, problems = R.failed_runs(results)
    failed = [
        f
        for f in failed
        if (datasets is None or f.dataset in datasets)
        and (models is None or f.model in models)
        and not _trained_since(f, running)
    ]
    choices = choose(records, select)  # the table's choice (compute_table makes the same call)
    shown = [r for c in choices for r in c.config.runs]

    page = _Page()
    _add_header(page, results, records, failed, running, problems + unread)
    if records:
        _add_table(page, records, sources, select, folder)
        _add_runs(page, records, failed)
    if running:
        _add_in_progress(page, running, sources, folder)
    if not records:
        page.add(
            "No run has finished yet: the comparison table, the curves and the samples appear once the first "
            "record is written.",
            "",
        )
        return "\n".join(page.lines).rstrip("\n") + "\n", page.figures
    _add_curves(page, shown, sources, select, folder)
    if samples:
        _add_samples(page, choices, shown, data_root, folder)
    return "\n".join(page.lines).rstrip("\n") + "\n", page.figures


def _trained_since(failed: R.FailedRun, running: list[R.RunInProgress]) -> bool:
    """Whether a failed sweep run has trained since its sweep reported it (its checkpoint is newer): the
    failure is then history (e.g. another process held its lock and was training it)."""
    return any(
        (r.dataset, r.model, r.tag, r.seed) == (failed.dataset, failed.model, failed.tag, failed.seed)
        and r.written > failed.reported
        for r in running
    )


def _add_header(
    page: _Page,
    results: str | Path,
    records: list[Any],
    failed: list[R.FailedRun],
    running: list[R.RunInProgress],
    problems: list,
) -> None:
    """The title, what the results folder holds, and the warnings met reading it."""
    page.add("# flowbench report", "")
    if records:
        summary = (
            f"Results folder `{results}`: {len(records)} runs of {len(configurations(records))} configurations "
            f"on {len(dataset_order(records))} datasets"
        )
    else:
        summary = f"Results folder `{results}`: no finished runs yet"
    if failed:
        summary += f", {len(failed)} failed sweep runs that left no record"
    if running:
        summary += f", {len(running)} runs in progress"
    summary = re.sub(r", ([^,]*)$", r", and \1", summary) if failed or running else summary
    page.add(summary + f". Generated by flowbench {__version__}.", "")
    for p in problems:
        page.add(f"- warning: {p}")
    if problems:
        page.add("")


def _add_table(page: _Page, records: list[Any], sources: list[str], select: str, folder: str) -> None:
    """The comparison table, and its LaTeX, CSV and JSON exports as figures linked below it."""
    page.add("## Comparison table", "")
    table = compute_table(records, sources, select)
    page.add(render(table, "markdown").rstrip("\n"), "")
    links = []
    for fmt, name, what in EXPORTS:
        page.figures[name] = render(table, fmt).encode("utf-8")
        links.append(f"[{what}]({folder}/{name})")
    page.add("The same table for papers and scripts: " + ", ".join(links) + ".", "")


def _add_runs(page: _Page, records: list[Any], failed: list[R.FailedRun]) -> None:
    """Every run's status, the failed sweep runs included, and the total wall time."""
    page.add("## Runs", "")
    page.add(
        "Status: *converged*: early stopping ended the run (the MAF protocol); *capped*: stopped by "
        "`--max-epochs` before that, not converged; *step budget spent*: `--max-steps` ended the run, which "
        "keeps its best validated state (the NSF protocol); *non-finite*: a non-finite loss stopped training "
        "and the best model so far was evaluated; *failed*: a sweep run that raised and left no record.",
        "",
    )
    page.add(_runs_table(records, failed), "")
    page.add(
        f"Total wall time of the recorded runs: {format_seconds(total_wall_time(records))} (the runs of a "
        "stack trained together: a stack counts once).",
        "",
    )


def _add_in_progress(page: _Page, running: list[R.RunInProgress], sources: list[str], folder: str) -> None:
    """Where each run without a record stands, from its training checkpoint, and its curves so far."""
    page.add("## Runs in progress", "")
    page.add(
        "Runs with a training checkpoint and no record yet: training now, or stopped and waiting to be resumed "
        "(the same `flowbench run` command with `--resume`, or the same sweep again). *Position*: where its "
        "checkpoint stands, and so where a resume takes up the run. *Patience left*: epochs "
        "(evaluations, for a run with `--eval-every`) without a better validation LL before early stopping ends "
        "the run; each new best starts it again; *stopped*: its training has ended (a seed of a stack that stopped "
        "before the others: the stack writes the records when it ends). *Per epoch*: the median training time "
        "of the last 20 epochs (evaluations); for a run of a stack, the whole stack's. *Earliest end*: the epochs "
        "(evaluations) it trains at the least, and about how long: until its patience runs out, or its epoch cap "
        "or step budget if that comes first. *Training now*: whether a process holds the run's lock (a killed run "
        "holds none: resume it). The comparison table and "
        "the finished runs' curves leave these runs out until their records are written.",
        "",
    )
    now = time.time()
    rows = []
    order = {ds: i for i, ds in enumerate(dataset_order(running))}
    running = sorted(running, key=lambda r: (order[r.dataset], r.model, r.tag or "", r.seed))
    so_far = [r.record() for r in running]  # once each: it resolves the model's row label
    for r, rec in zip(running, so_far):
        p = r.progress
        by_step = p.options.get("eval_every") is not None
        if p.best_val_ll is None:
            best = "none finite yet"
        else:
            where = f"step {p.best_step:,}" if by_step and p.best_step is not None else f"epoch {p.best_epoch}"
            best = f"{p.best_val_ll:.3f} ({where})"
        rows.append(
            [
                r.dataset,
                _cell(R.label(rec, with_tag=True)),  # as its record's row will be labelled
                r.seed,
                p.where if p.pos else f"{p.where} ({p.step:,} steps)",
                best,
                "stopped" if p.finished else f"{p.patience_left} of {p.patience}",
                f"{p.nonfinite_val} of {p.evaluations}" if p.nonfinite_val else "0",
                format_seconds(p.train_time_s),
                format_seconds(p.seconds_per_eval) if p.seconds_per_eval is not None else "",
                _earliest_end(p, by_step),
                f"{format_seconds(max(0.0, now - r.written))} ago",
                r.training_now(),
            ]
        )
    headers = [
        "dataset",
        "model",
        "seed",
        "position",
        "best val LL",
        "patience left",
        "non-finite validations",
        "training so far",
        "per epoch",
        "earliest end",
        "checkpoint written",
        "training now",
    ]
    page.add(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True, stralign="left"), "")
    page.add(
        "Their training curves so far, drawn as the finished runs' curves are (the star: each seed's best "
        "evaluation so far):",
        "",
    )
    for ds in dataset_order(so_far):
        runs = [r for r in so_far if R.dataset(r) == ds]
        png = png_bytes(plot_curves(runs, sources=sources, with_tag=True))
        page.figure(f"progress_{_slug(ds)}.png", png, f"training curves so far on {ds}", folder)


def _earliest_end(p: Any, by_step: bool) -> str:
    """How many more epochs (evaluations) the run trains at the least, and about how long: until its patience runs
    out if no evaluation is better, or its ``--max-epochs`` cap or ``--max-steps`` budget if that comes first."""
    if p.finished:
        return ""
    left = [p.patience_left]
    unit = "evaluations" if by_step else "epochs"
    if p.options.get("max_epochs") and not by_step:
        left.append(int(p.options["max_epochs"]) - p.epoch)
    per_eval = int(p.options["eval_every"]) if by_step else (p.step // p.epoch if p.epoch else 0)
    if p.options.get("max_steps") and per_eval:
        left.append(math.ceil((int(p.options["max_steps"]) - p.step) / per_eval))
    n = max(0, min(left))
    when = f", ~{format_seconds(n * p.seconds_per_eval)}" if p.seconds_per_eval is not None else ""
    return f"{n} {unit}{when}"


def _add_curves(page: _Page, shown: list[Any], sources: list[str], select: str, folder: str) -> None:
    """One figure of training curves per dataset, of the runs the table shows."""
    page.add("## Training curves", "")
    page.add(
        "Validation log-likelihood and exact training NLL (on a fixed subsample of the training set; older "
        "records: their running training loss, dotted) per epoch, or per optimiser step on a dataset with runs "
        "that validate every `--eval-every` steps; line: mean over seeds, band: min–max over seeds, star: the "
        "best evaluation of each seed (the parameters early stopping restored), dashed: the published test LL "
        "of the same model.",
        "",
    )
    for ds in dataset_order(shown):
        runs = [r for r in shown if R.dataset(r) == ds]
        page.add(f"### {ds.upper()}", "")
        png = png_bytes(plot_curves(runs, sources=sources, with_tag=select == "all"))
        page.figure(f"curves_{_slug(ds)}.png", png, f"training curves on {ds}", folder)


def _add_samples(page: _Page, choices: list[Any], shown: list[Any], data_root: str | Path | None, folder: str) -> None:
    """Samples of the best-validation seed of each configuration the table shows, dataset by dataset."""
    from flowbench.plots.samples import choose_run  # lazy, as in _sample_png: it imports torch

    page.add("## Samples", "")
    page.add(
        "Drawn from the best-validation seed of each configuration, with its best state from the "
        "checkpoint. Images: samples mapped from logit space to pixels beside test images; tabular data: "
        "pairwise marginals of samples against test points; 2-D toys: the learned density.",
        "",
    )
    data = _Data(data_root)
    for ds in dataset_order(shown):
        page.add(f"### {ds.upper()}", "")
        for choice in choices:
            if choice.config.dataset != ds:
                continue
            rec = choose_run(list(choice.config.runs))
            name = R.label(rec, with_tag=True) + (" (class-conditional)" if choice.config.column != ds else "")
            page.add(f"**{name}**, seed {R.seed(rec)}", "")
            try:
                png = _sample_png(rec, data)
            except FlowbenchError as e:  # missing checkpoint or data: the rest of the report still stands
                page.add(f"Samples not drawn: {e}", "")
                continue
            fname = f"samples_{_slug(ds)}_{_slug(R.model(rec))}_{_slug(R.tag(rec) or '')}_seed{R.seed(rec)}.png"
            page.figure(fname.replace("__", "_"), png, f"samples from {name} on {ds}", folder)


# -- a Markdown → HTML converter for exactly the subset report_markdown writes ----------------------------

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}
img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}"""

_PIPE = re.compile(r"(?<!\\)\|")


def _inline(text: str, files: dict[str, bytes] | None = None) -> str:
    out = html.escape(text.replace("\\|", "|"), quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", out)
    if files is not None:  # links to the report's own files: embedded, so the page stays one file
        out = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: _file_link(m.group(1), m.group(2), files), out)
    return out


def _file_link(text: str, target: str, files: dict[str, bytes]) -> str:
    name = target.rsplit("/", 1)[-1]
    if name not in files:
        raise ValueError(f"link {target} has no file")
    data = base64.b64encode(files[name]).decode("ascii")
    mime = _MIME.get(Path(name).suffix, "application/octet-stream")
    return f'<a download="{html.escape(name)}" href="data:{mime};base64,{data}">{text}</a>'


def _table(lines: list[str]) -> str:
    rows = [[c.strip() for c in _PIPE.split(ln.strip())[1:-1]] for ln in lines]
    head, body = rows[0], [r for r in rows[2:]]
    th = "".join(f"<th>{_inline(c)}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def markdown_to_html(text: str, images: dict[str, bytes], title: str = "flowbench report") -> str:
    """A self-contained HTML page: headings, paragraphs, lists, tables, and images and linked files (``images``:
    name → bytes) embedded as data URIs."""
    parts: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        first = lines[0]
        if m := re.match(r"^(#{1,6}) (.*)$", first):
            parts.append(f"<h{len(m.group(1))}>{_inline(m.group(2))}</h{len(m.group(1))}>")
        elif m := re.match(r"^!\[(.*)\]\((.*)\)$", first):
            name = m.group(2).rsplit("/", 1)[-1]
            if name not in images:
                raise ValueError(f"image {m.group(2)} has no PNG")
            data = base64.b64encode(images[name]).decode("ascii")
            parts.append(f'<p><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif all(ln.startswith("|") for ln in lines):
            parts.append(_table(lines))
        elif all(ln.startswith("- ") for ln in lines):
            parts.append("<ul>" + "".join(f"<li>{_inline(ln[2:])}</li>" for ln in lines) + "</ul>")
        else:
            parts.append(f"<p>{_inline(' '.join(lines), images)}</p>")
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def build_report(results: str | Path = "results", out: str | Path | None = None, **kwargs: Any) -> Path:
    """Write the report to ``out`` (``.md``: Markdown + ``<stem>_files/`` with the PNGs and the table as
    ``table.tex``/``.csv``/``.json``; ``.html``: one file, all of them embedded).

    ``out`` defaults to ``<results>/report.html``; ``kwargs`` go to :func:`report_markdown`.
    """
    from flowbench.utils import output_file

    out = Path(out) if out is not None else Path(results) / "report.html"
    if out.suffix not in FORMATS:
        raise ConfigError(f"--out {out}: the report is written as .md or .html, not {out.suffix or 'no suffix'}")
    folder = f"{out.stem}_files"
    # Before any figure is drawn or model rebuilt: a folder that cannot be written is said at once.
    output_file(out, what="the report")
    if out.suffix == ".md":
        output_file(out.parent / folder / "table.csv", what="the report's figures")
    text, figures = report_markdown(results, folder=folder, **kwargs)
    if out.suffix == ".html":
        page = markdown_to_html(text, figures)
        with atomic_write(out, "w") as f:
            f.write(page)
        return out
    figdir = out.parent / folder
    # Figures of an earlier report of other runs would otherwise linger beside the new ones.
    for old in figdir.glob("*.png") if figdir.is_dir() else ():
        if old.name not in figures and old.name.startswith(("curves_", "progress_", "samples_")):
            old.unlink()
    for name, png in figures.items():
        with atomic_write(figdir / name, "wb") as f:
            f.write(png)
    with atomic_write(out, "w") as f:
        f.write(text)
    return out
