"""Training curves: validation log-likelihood and training NLL against epoch, one row of panels per dataset.

What a reader checks here is the MAF protocol's early stopping (Papamakarios et al. 2017, section 4): the
star marks the epoch whose parameters were restored; a run that converged shows a plateau of ``patience``
epochs after it, a run cut short by ``--max-epochs`` ends on a rising curve. Seeds of one configuration are
drawn together: the mean over the seeds that reached that epoch, with their min–max band; the legend names the
row and tag as the table does (configurations grouped by :func:`flowbench.aggregate.configurations`). The
published test LL of the same model (dashed) is the level a converged run should approach. A dataset with
runs that validate every ``--eval-every`` steps (the NSF protocol) is drawn against optimiser steps instead.

The training panel shows each evaluation's exact NLL on a fixed training subsample
(:func:`flowbench.training.evaluate.training_nll`, history key ``train_nll``): the evaluated state in evaluation
mode, as validation scores it, so its difference from the negated validation LL is the generalisation gap.
Records written before it was kept fall back to the running training loss (dotted); relgrad's leaves
Σ log|det W| out by design (Gresele et al. 2020, section 4), ~27 nats off its NLL on POWER, and the panel
says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowbench import status as S
from flowbench.aggregate import Configuration, configurations
from flowbench.plots import _records as R
from flowbench.plots._mpl import color, pyplot, save_figure

__all__ = ["LOSS_LABEL", "VAL_LABEL", "dataset_order", "plot_curves", "save_curves"]

VAL_LABEL = "validation log-likelihood (nats)"
LOSS_LABEL = "training NLL (nats per example)"
_IMAGE_SETS = ("mnist", "digits")


def dataset_order(records: Iterable[Any]) -> list[str]:
    """Datasets in the table's column order, unknown ones after them alphabetically."""
    from flowbench.data import DATASETS

    present = {R.dataset(r) for r in records}
    return [d for d in DATASETS if d in present] + sorted(present - set(DATASETS))


def _stack(values: list[np.ndarray], xs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Seeds × evaluations matrix (NaN where a seed has no value: it stopped earlier) over the x axis of every x
    some seed was evaluated at (epochs: 1..the longest run). Only those points, not a grid between them: the
    evaluations of a step-budget run are hundreds of steps apart, and NaN between them would break every line.
    A seed evaluated twice at one x (several evaluations in one epoch of an older record) keeps the last."""
    axis = np.unique(np.concatenate([np.asarray(x, dtype=int) for x in xs] + [np.zeros(0, dtype=int)]))
    m = np.full((len(values), axis.size), np.nan)
    for i, (v, x) in enumerate(zip(values, xs)):
        if not len(x):
            continue
        x, v = np.asarray(x)[::-1], np.asarray(v)[::-1]
        _, last = np.unique(x, return_index=True)  # first in the reversed order: the last evaluation at each x
        m[i, np.searchsorted(axis, x[last])] = v[last]
    return m, axis


def _by_step(records: Iterable[Any]) -> bool:
    """Whether a panel's x axis is optimiser steps: some run validated every ``--eval-every`` steps, and every
    run's history has its steps (an older record without them keeps the panel on epochs)."""
    records = list(records)
    return any(R.evaluates_by_step(r) for r in records) and all(
        R.history(r).has_step for r in records if R.history(r).epoch.size
    )


def _mean_band(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean over the seeds present at each epoch; min–max where at least two seeds are present."""
    present = np.isfinite(m).sum(0)
    with np.errstate(all="ignore"):
        mean = np.where(present > 0, np.nansum(m, 0) / np.maximum(present, 1), np.nan)
        lo = np.where(present > 1, np.nanmin(np.where(np.isfinite(m), m, np.inf), 0), np.nan)
        hi = np.where(present > 1, np.nanmax(np.where(np.isfinite(m), m, -np.inf), 0), np.nan)
    return mean, lo, hi, present


def _limits(values: list[np.ndarray], keep: list[float], upper_tail: bool) -> tuple[float, float] | None:
    """Axis limits that show the end of training, not the first epochs.

    The first epochs of a flow sit orders of magnitude below its plateau (MNIST: −10⁴ → −10³ nats), which
    would flatten everything that matters; the 5 % of values farthest from the plateau are left off-axis.
    ``keep`` (best epochs, published levels) is always inside.
    """
    flat = np.concatenate([v[np.isfinite(v)] for v in values] + [np.zeros(0)])
    if flat.size == 0 and not keep:
        return None
    pts = list(keep)
    if flat.size:
        pts += [float(np.percentile(flat, 95 if upper_tail else 5)), float(flat.min() if upper_tail else flat.max())]
    lo, hi = min(pts), max(pts)
    pad = 0.06 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 1.0)
    return lo - pad, hi + pad


def _name(conf: Configuration, tagged: bool) -> str:
    return f"{conf.label} [{conf.tag}]" if tagged and conf.tag else conf.label


@dataclass
class _Row:
    """What one dataset's row collects from its configurations for its axis limits, titles and legend."""

    by_step: bool
    handles: list[Any] = field(default_factory=list)
    val_values: list[np.ndarray] = field(default_factory=list)
    loss_values: list[np.ndarray] = field(default_factory=list)
    keep: list[float] = field(default_factory=list)
    has_published: bool = False
    fallback: bool = False
    relgrad_fallback: bool = False


def plot_curves(
    records: list[Any],
    *,
    sources: Iterable[str] = ("maf", "relgrad"),
    train_loss: bool = True,
    with_tag: bool = False,
) -> Any:
    """A figure with one row per dataset: validation LL (left) and training NLL (right) against epoch.

    Args:
        records: the runs to draw (several datasets allowed); seeds of one configuration are averaged.
        sources: published sources for the reference lines (keys of :data:`flowbench.published.SOURCES`).
        train_loss: also draw the training panel (exact NLL on the training subsample; older records: their
            running training loss, dotted).
        with_tag: put the configuration's tag in the legend (several tags of one model drawn).

    Returns:
        The matplotlib ``Figure`` (not saved; see :func:`save_curves`).
    """
    plt = pyplot()
    sources = list(sources)
    confs = configurations(records)  # the table's rows and order
    # One colour per row label across all datasets, so a model is the same colour in every panel.
    labels = list(dict.fromkeys(_name(c, with_tag) for c in confs))
    colors = {lab: color(i) for i, lab in enumerate(labels)}
    datasets = dataset_order(records)
    ncols = 2 if train_loss else 1
    fig, axes = plt.subplots(
        len(datasets), ncols, figsize=(6.2 * ncols + 3.0, 3.4 * len(datasets)), squeeze=False, layout="constrained"
    )
    for row, ds in enumerate(datasets):
        ax_val, ax_loss = axes[row, 0], axes[row, 1] if train_loss else None
        ds_confs = [c for c in confs if c.dataset == ds]
        state = _Row(by_step=_by_step(r for c in ds_confs for r in c.runs))
        for conf in ds_confs:
            _draw_configuration(state, ax_val, ax_loss, conf, colors[_name(conf, with_tag)], sources)
        _label_row(axes[row], ax_val, ax_loss, ds, state)
    return fig


def _draw_configuration(
    row: _Row, ax_val: Any, ax_loss: Any | None, conf: Configuration, c: str, sources: list[str]
) -> None:
    """One configuration's curves (mean over its seeds, min–max band, restored best evaluations) in the
    row's panels, and its published level."""
    from matplotlib.lines import Line2D  # lazy, as all of matplotlib here: importing this module must not load it

    runs = list(conf.runs)
    hists = [R.history(r) for r in runs]
    # The legend names the configuration (its tag) as the table's footnote does.
    legend = f"{_name(conf, True)} · {len(runs)} seed{'s' if len(runs) > 1 else ''} · {S.summary(runs)}"
    ref = R.published_ll(runs[0], sources)
    if ref is not None:
        ax_val.axhline(ref, color=c, ls="--", lw=1.0, alpha=0.9, gid="published")
        row.keep.append(ref)
        row.has_published = True
    if not any(h.epoch.size for h in hists):
        # Closed-form fits (the Gaussian) have no epochs: their validation LL is a level, not a curve.
        levels = [v for v in (R.best_val_ll(r) for r in runs) if np.isfinite(v)]
        level = float(np.mean(levels)) if levels else math.nan
        if np.isfinite(level):
            ax_val.axhline(level, color=c, ls=":", lw=1.5, gid="closed-form")
            row.keep.append(level)
        row.handles.append(Line2D([], [], color=c, ls=":", lw=1.5, label=legend))
        return
    xs = [h.step if row.by_step else h.epoch for h in hists]
    m, ep = _stack([h.val_ll for h in hists], xs)
    mean, lo, hi, present = _mean_band(m)
    marker = "o" if ep.size == 1 else None
    (line,) = ax_val.plot(ep, mean, color=c, lw=1.6, marker=marker, label=legend, gid="val-mean")
    if (present > 1).any():
        ax_val.fill_between(ep, lo, hi, color=c, alpha=0.18, lw=0, gid="val-band")
    row.handles.append(line)
    row.val_values.append(mean)
    _mark_best(row, ax_val, runs, hists, xs, c)
    if ax_loss is not None:
        _loss_curve(row, ax_loss, runs, hists, xs, c, marker)


def _mark_best(row: _Row, ax_val: Any, runs: list[Any], hists: list[Any], xs: list[np.ndarray], c: str) -> None:
    """The evaluation each seed's early stopping restored, at that seed's validation LL."""
    bx, by = [], []
    for r, h, x in zip(runs, hists, xs):
        b = R.best_step(r) if row.by_step else R.best_epoch(r)
        if b is not None and b in x:
            bx.append(b)
            by.append(float(h.val_ll[x == b][-1]))
    if bx:
        ax_val.plot(bx, by, ls="none", marker="*", ms=11, color=c, mec="black", mew=0.6, zorder=5, gid="best-epoch")
        row.keep += by


def _loss_curve(
    row: _Row, ax_loss: Any, runs: list[Any], hists: list[Any], xs: list[np.ndarray], c: str, marker: str | None
) -> None:
    """The training panel's mean and band: the exact training NLL, or older records' running loss (dotted)."""
    exact = all(h.has_train_nll for h in hists if h.epoch.size)
    if not exact:  # a configuration with older records: their running loss, marked as such
        row.fallback = True
        row.relgrad_fallback |= R.model(runs[0]) == "relgrad"
    ml, ep_l = _stack([h.train_nll if exact else h.train_loss for h in hists], xs)
    mean_l, lo_l, hi_l, present_l = _mean_band(ml)
    ax_loss.plot(
        ep_l,
        mean_l,
        color=c,
        lw=1.6,
        marker=marker,
        ls="-" if exact else ":",
        gid="loss-mean" if exact else "loss-fallback",
    )
    if (present_l > 1).any():
        ax_loss.fill_between(ep_l, lo_l, hi_l, color=c, alpha=0.18, lw=0, gid="loss-band")
    row.loss_values.append(mean_l)


def _label_row(axes_row: np.ndarray, ax_val: Any, ax_loss: Any | None, ds: str, row: _Row) -> None:
    """Titles, axis limits, grids and the legend of one dataset's row."""
    from matplotlib.ticker import MaxNLocator

    unit = "optimiser step" if row.by_step else "epoch"
    space = " (logit space)" if ds in _IMAGE_SETS else ""
    ax_val.set(title=f"{ds.upper()}: validation LL{space}", xlabel=unit, ylabel=VAL_LABEL)
    if (lim := _limits(row.val_values, row.keep, upper_tail=False)) is not None:
        ax_val.set_ylim(*lim)
    if ax_loss is not None:
        note = ""
        if row.fallback:
            note = "\ndotted: older records' running training loss"
            note += " (relgrad's: without log|det W|, not its NLL)" if row.relgrad_fallback else ""
        ax_loss.set(title=f"{ds.upper()}: training NLL{space}, fixed subsample{note}", xlabel=unit, ylabel=LOSS_LABEL)
        if (lim := _limits(row.loss_values, [], upper_tail=True)) is not None:
            ax_loss.set_ylim(*lim)
    for ax in axes_row:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, lw=0.5)
    _legend(axes_row[-1], row)


def _legend(ax: Any, row: _Row) -> None:
    """The row's legend beside its last panel: the configurations, then the markers' meaning."""
    from matplotlib.lines import Line2D

    extra = [
        Line2D(
            [],
            [],
            ls="none",
            marker="*",
            ms=11,
            color="0.6",
            mec="black",
            mew=0.6,
            label=f"best {'step' if row.by_step else 'epoch'} (restored)",
        )
    ]
    if row.has_published:
        extra.append(Line2D([], [], ls="--", color="0.3", lw=1.0, label="published test LL"))
    ax.legend(
        handles=row.handles + extra,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=8,
        frameon=False,
        title="mean over seeds, band: min–max",
        title_fontsize=8,
    )


def save_curves(records: list[Any], path: str | Path, **kwargs: Any) -> Path:
    """:func:`plot_curves` written as a PNG at ``path``."""
    return save_figure(plot_curves(records, **kwargs), path)
