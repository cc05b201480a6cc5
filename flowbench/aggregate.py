"""From run records to the numbers of one table cell: the one aggregation the table, the plots and the report use.

Model selection follows the MAF paper (Papamakarios et al. 2017, section 4): configurations are compared on
validation data only. Each rule below is stated once here; the table's footnotes and the README quote it.

- **Row.** A row is a label on a dataset. The label is the record's display name (``MAF (5)``), with
  ``(model)`` appended when two registry models share that display name among the records aggregated, and
  ``[matched to X]`` for runs whose size was matched to model X (``--match-params``): a matched run never
  competes with the model's own configurations.
- **Column.** A dataset, or ``<dataset>-cond`` for a class-conditional model's records (MAF Table 2: their test
  LL is log p(x) = logsumexp_y log p(x | y) − log K, beside the unconditional models' log p(x)); a conditional
  model shares its row with the unconditional one (``MAF (5)``).
- **Configuration.** The runs of one row with one tag (no tag is a configuration too); its seeds are its runs.
- **Seeds that count.** A seed counts when its status is ``ok`` (training ended by patience, the closed-form
  fit or ``--max-epochs``, and the test set was evaluated). A seed with any other status (``nonfinite``: a
  non-finite loss stopped it) is *left out* of the selection, the value, the ± and the (sd, n), and footnoted.
- **Selection** (``best-val``). Of a row's configurations, the one with the highest *mean* best validation LL
  over its counting seeds (seeds without a finite validation LL left out of that mean; a configuration with
  none scores −∞). An exact tie goes to the first tag in sorted order, no tag first. ``all`` keeps every
  configuration as a row of its own, ``label [tag]``.
- **Value.** The mean of the counting seeds' test LLs. A counting seed whose test LL is −∞ (a test point below
  float range; a legitimate, worst value) makes the value −∞: it is shown, never dropped.
- **±.** The mean of the counting seeds' per-run 2 SE over test points (each seed is evaluated on the same test
  points; this is their typical error bar, not a spread over seeds).
- **(sd, n).** The sample standard deviation (ddof 1) of the counting seeds' test LLs and their count; shown
  when n ≥ 2 (sd only when the value is finite).
- **Bold.** A cell may be bolded only when its value is finite and no seed was left out (an incomplete
  configuration is shown, not ranked). Capped runs may be bolded, with their footnote.
- **Per-point values** (the paired t-test of :mod:`flowbench.tables`). A cell's vector is its counting seeds'
  per-point test LLs averaged point by point (:func:`cell_points`), so its mean is the cell's value and the
  test pairs test points, as in the MAF paper, not seeds (:func:`paired_pvalue`, level :data:`ALPHA`).
"""

from __future__ import annotations

import functools
import math
import re
import statistics
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flowbench.errors import ConfigError
from flowbench.results import read_field, read_per_point

__all__ = [
    "Choice",
    "Configuration",
    "SELECT_MODES",
    "CellStats",
    "cell_stats",
    "cell_points",
    "column",
    "column_title",
    "paired_pvalue",
    "ALPHA",
    "choose",
    "chosen_runs",
    "configurations",
    "counts",
    "row_labels",
    "row_order_key",
]

Record = Any  # a flowbench.results.RunRecord, or a mapping with its keys (sweep reports)
SELECT_MODES = ("best-val", "all")


_get = read_field  # a record or its mapping (sweep reports)


def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def counts(rec: Record) -> bool:
    """Whether a seed counts in its cell: status ``ok`` and a test LL (finite or −∞) was computed."""
    return (_get(rec, "status") or "ok") == "ok" and not math.isnan(_float(_get(rec, "test_ll")))


def column(rec: Record) -> str:
    """The table column of a record: its dataset, ``<dataset>-cond`` for a class-conditional model's record."""
    return f"{_get(rec, 'dataset')}-cond" if _get(rec, "conditional") else _get(rec, "dataset")


def column_title(key: str) -> str:
    """``mnist`` → ``MNIST``, ``mnist-cond`` → ``MNIST cond.`` (the MAF paper's Table 2 headings)."""
    return key.removesuffix("-cond").upper() + (" cond." if key.endswith("-cond") else "")


def _row_model(rec: Record) -> str:
    """The model a row stands for: a class-conditional model is its unconditional twin's row (MAF Table 2)."""
    model = _get(rec, "model")
    return model.removesuffix("-cond") if _get(rec, "conditional") else model


def row_labels(records: list[Record]) -> list[str]:
    """The row label of each record (same order): display name, ``(model)`` on a display name shared by two
    models (a conditional model and its unconditional twin count as one), ``[matched to X]`` for a
    parameter-matched run."""
    models: dict[str, set[str]] = defaultdict(set)
    for r in records:
        models[_get(r, "display_name") or _get(r, "model")].add(_row_model(r))
    labels = []
    for r in records:
        label = _get(r, "display_name") or _get(r, "model")
        if len(models[label]) > 1:  # a plugged-in flow named like a built-in's row: both get their model name
            label += f" ({_row_model(r)})"
        against = (_get(r, "match_target") or {}).get("against")
        if against:  # parameter-matched baselines (relgrad Table 1) are rows of their own
            label += f" [matched to {against}]"
        labels.append(label)
    return labels


@functools.lru_cache(maxsize=None)
def _label_patterns() -> tuple[re.Pattern, ...]:
    """Per registered model, in registry order: its label template as a regex
    (``MAF ({layers})`` → ``MAF \\((.+)\\)``)."""
    from flowbench.models import MODELS  # lazy: imports torch, which this module (and the table) avoids

    pats = []
    for spec in MODELS.values():
        parts = re.split(r"\{[^}]*\}", spec.label)
        pats.append(re.compile("^" + "(.+?)".join(map(re.escape, parts)) + "$"))
    return tuple(pats)


def row_order_key(label: str) -> tuple:
    """Rows in the order of the model registry, then by the label's numbers (``Real NVP (5)`` before ``(10)``);
    labels of no registered model (published rows such as Glow) come after, alphabetically."""
    base = label.split(" [")[0]
    for index, pattern in enumerate(_label_patterns()):
        m = pattern.match(base)
        if m:
            values = tuple((0, float(v), "") if re.fullmatch(r"-?\d+(\.\d*)?", v) else (1, 0.0, v) for v in m.groups())
            return (index, values, "")
    return (len(_label_patterns()), (), base)


def _tag_key(tag: str | None) -> tuple[bool, str]:
    return (tag is not None, tag or "")  # no tag first, then tags in sorted order


@dataclass(frozen=True)
class Configuration:
    """The seeds (``runs``, sorted by seed) of one tag of one row on one dataset."""

    dataset: str
    label: str
    tag: str | None
    runs: tuple[Record, ...]
    column: str = ""  # the table column (:func:`column`); the dataset when empty

    def __post_init__(self) -> None:
        if not self.column:
            object.__setattr__(self, "column", self.dataset)

    @property
    def counted(self) -> tuple[Record, ...]:
        return tuple(r for r in self.runs if counts(r))

    @property
    def left_out(self) -> tuple[Record, ...]:
        return tuple(r for r in self.runs if not counts(r))

    @property
    def mean_val_ll(self) -> float:
        """Mean best validation LL over the counting seeds with a finite one; −∞ when there is none."""
        vals = [v for v in (_float(_get(r, "best_val_ll")) for r in self.counted) if math.isfinite(v)]
        return statistics.fmean(vals) if vals else -math.inf


def configurations(records: Iterable[Record]) -> list[Configuration]:
    """Records grouped into configurations, in the table's order: row (registry order), dataset, tag."""
    from flowbench.data import DATASETS  # lazy: imports numpy, which this module avoids until it needs it

    records = list(records)
    groups: dict[tuple[str, str, str | None], list[Record]] = defaultdict(list)
    for r, label in zip(records, row_labels(records)):
        groups[(label, column(r), _get(r, "tag"))].append(r)
    order = {d: i for i, d in enumerate(DATASETS)}

    def key(k: tuple[str, str, str | None]) -> tuple:
        label, col, tag = k
        base = col.removesuffix("-cond")
        return (row_order_key(label), label, order.get(base, len(order)), col, _tag_key(tag))

    return [
        Configuration(
            _get(groups[k][0], "dataset"),
            k[0],
            k[2],
            tuple(sorted(groups[k], key=lambda r: int(_get(r, "seed")))),
            k[1],
        )
        for k in sorted(groups, key=key)
    ]


@dataclass(frozen=True)
class Choice:
    """A configuration shown as a row: ``row`` is its label in the table (``label [tag]`` with ``all``);
    ``tried`` are the row's configurations it was chosen from, ``tied`` the tags whose mean validation LL
    equals the chosen one's exactly."""

    config: Configuration
    row: str
    tried: tuple[Configuration, ...]
    tied: tuple[str | None, ...] = ()


def choose(records: Iterable[Record], select: str = "best-val") -> list[Choice]:
    """The configurations a table, plot or report shows (see the module docstring for the rules).

    Raises:
        ConfigError: ``select`` is not ``best-val`` or ``all``.
    """
    if select not in SELECT_MODES:
        raise ConfigError(f"unknown --select {select!r}; use best-val or all")
    by_row: dict[tuple[str, str], list[Configuration]] = defaultdict(list)
    for c in configurations(records):  # already in tag order within a row
        by_row[(c.label, c.column)].append(c)
    out = []
    for (label, _), confs in by_row.items():
        if select == "all":
            out += [Choice(c, f"{label} [{c.tag}]" if c.tag else label, (c,)) for c in confs]
            continue
        # max() keeps the first of equal keys: the first tag in sorted order wins an exact tie.
        best = max(confs, key=lambda c: c.mean_val_ll)
        tied = tuple(c.tag for c in confs if c is not best and c.mean_val_ll == best.mean_val_ll)
        out.append(Choice(best, label, tuple(confs), tied))
    return out


def chosen_runs(records: Iterable[Record], select: str = "best-val") -> list[Record]:
    """The records of the configurations :func:`choose` keeps (what the plots and the report draw)."""
    return [r for c in choose(records, select) for r in c.config.runs]


@dataclass(frozen=True)
class CellStats:
    """The numbers of one cell (see the module docstring): ``value`` is NaN when no seed counts."""

    value: float
    se2: float | None
    sd: float | None
    n: int
    seeds: tuple[int, ...]  # the counting seeds
    left_out: tuple[int, ...]  # seeds with another status
    minus_inf: tuple[int, ...]  # counting seeds whose test LL is −∞

    @property
    def can_bold(self) -> bool:
        return math.isfinite(self.value) and not self.left_out


def cell_stats(config: Configuration) -> CellStats:
    """Value, ±, (sd, n) and the seeds behind them, for one configuration."""
    counted = config.counted
    seed = [int(_get(r, "seed")) for r in counted]
    lls = [_float(_get(r, "test_ll")) for r in counted]
    left_out = tuple(int(_get(r, "seed")) for r in config.left_out)
    minus_inf = tuple(s for s, v in zip(seed, lls) if v == -math.inf)
    se2s = [v for v in (_float(_get(r, "test_ll_2se")) for r in counted) if math.isfinite(v)]
    if not counted:
        return CellStats(math.nan, None, None, 0, (), left_out, ())
    if minus_inf:
        return CellStats(-math.inf, None, None, len(counted), tuple(seed), left_out, minus_inf)
    sd = statistics.stdev(lls) if len(lls) > 1 else None
    return CellStats(
        statistics.fmean(lls), statistics.fmean(se2s) if se2s else None, sd, len(counted), tuple(seed), left_out, ()
    )


#: Significance level of the paired t-test behind the bolding (two-sided). The MAF paper names the test but not
#: its level; 0.05 is the customary one.
ALPHA = 0.05


def cell_points(config: Configuration) -> tuple[Any, str | None, str | None]:
    """``(per-point test LLs, test-set hash, None)`` of a cell, or ``(None, None, why not)``.

    Seeds are averaged point by point (all are evaluated on the same test points), so the vector's mean is the
    cell's value; every counting seed must have its per-point file.
    """
    import numpy as np  # lazy: this module stays light until per-point data are read

    vectors, hashes = [], set()
    for r in config.counted:
        if isinstance(r, Mapping):
            return None, None, "its records were not read from a results folder"
        values, why = read_per_point(r)
        if values is None:
            return None, None, f"seed {int(_get(r, 'seed'))}: {why}"
        vectors.append(values)
        hashes.add((r.test_points or {}).get("test_sha256"))
    if not vectors:
        return None, None, "no seed counts"
    if len(hashes) > 1 or len({v.size for v in vectors}) > 1:
        return None, None, "its seeds were evaluated on different test points"
    return np.mean(vectors, axis=0), hashes.pop(), None


def paired_pvalue(best: Any, other: Any) -> float:
    """Two-sided p-value of the paired t-test (``scipy.stats.ttest_rel``) of ``best`` against ``other``, the
    per-point test LLs of two cells on the same test points. Identical vectors (p undefined) give 1.0."""
    from scipy.stats import ttest_rel  # lazy: scipy is heavy, and this module is light

    with warnings.catch_warnings():  # identical vectors: scipy warns of a 0/0, the answer is below
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(ttest_rel(best, other).pvalue)
    return 1.0 if math.isnan(p) else p
