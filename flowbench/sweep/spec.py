"""Sweep files: parsing, validation and expansion of the grid into runs.

A sweep file (TOML) names datasets, models and a grid of ``flowbench run`` options::

    datasets = ["digits"]
    models = ["gaussian", "maf"]

    [grid]                 # keys = `flowbench run` flag names without the dashes in front
    seed = [0, 1]
    hidden-layers = [1, 2]
    max-epochs = 2         # a scalar is a one-value axis

    [override.maf]         # per model, per dataset, or per "dataset/model": replaces those grid axes
    layers = [5, 10]

The cartesian product of the axes is the set of runs. Each run is tagged with its non-seed settings
(``hidden-layers=1,layers=5,max-epochs=2``), so configurations never share a record path and the seeds of one
configuration share a tag: ``<out>/runs/<dataset>/<model>/<tag>/seed<k>.json``. The tag depends only on the
run's own values, not on the rest of the grid, so adding a value to an axis leaves existing tags (and the
records already written under them) valid.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from flowbench.config import OPTIONS, UNTAGGED, RunOptions, hparam_declarations, normalize, read_toml, resolve_options
from flowbench.errors import ConfigError
from flowbench.plugins import is_reference, normalize_reference
from flowbench.results import checkpoint_path, lock_path, record_path

__all__ = ["Sweep", "SweepRun", "load_sweep", "parse_sweep", "expand", "make_tag", "RESERVED", "UNTAGGED"]

#: Options the sweep sets itself for every run: a sweep file may not set them.
RESERVED = ("dataset", "model", "tag", "out", "resume", "force")
# UNTAGGED (from flowbench.config): options that do not change the result (where and how it runs) are left
# out of the tag; so is ``seed``, because the seeds of one configuration are replicates that the table averages.
#: Top-level keys of a sweep file.
TOP_LEVEL = ("description", "datasets", "models", "grid", "override")
#: Tags longer than this are shortened with a digest (file-name limits; the full values are in the record).
MAX_TAG = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: what ``flowbench run`` would be given, plus the derived tag."""

    dataset: str
    model: str
    seed: int
    tag: str
    values: tuple[tuple[str, Any], ...]  # the sweep's own settings for this run (underscore keys, no seed)
    #: a plugged-in model's or dataset's reference (absolute for files); ``model``/``dataset`` are the spec names
    model_ref: str | None = None
    dataset_ref: str | None = None

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.model}/{self.tag}/seed{self.seed}"

    def cli_options(self, out: str | Path) -> dict[str, Any]:
        """The explicit options of this run, as ``flowbench run`` flags would give them."""
        opts = dict(self.values)
        opts.update(
            dataset=self.dataset_ref or self.dataset,
            model=self.model_ref or self.model,
            seed=self.seed,
            tag=self.tag,
            out=str(out),
        )
        return opts

    def options(self, out: str | Path) -> RunOptions:
        """Fully resolved run options: defaults < ``configs/<dataset>/<model>.toml`` < the sweep's values.

        Resolved on the driver, so workers (Ray nodes included) need neither the sweep file nor configs/.
        """
        return resolve_options(self.cli_options(out))

    def record_path(self, out: str | Path) -> Path:
        return record_path(out, self.dataset, self.model, self.seed, self.tag)

    def log_path(self, out: str | Path) -> Path:
        """Where a parallel or Ray run's output goes (sequential runs print to the terminal)."""
        return Path(out) / "sweeps" / "logs" / self.dataset / self.model / self.tag / f"seed{self.seed}.log"

    def checkpoint_path(self, out: str | Path) -> Path:
        return checkpoint_path(out, self.dataset, self.model, self.seed, self.tag)

    def lock_path(self, out: str | Path) -> Path:
        return lock_path(out, self.dataset, self.model, self.seed, self.tag)


@dataclass
class Sweep:
    """A parsed sweep file (validated) and the runs it expands to."""

    name: str
    path: Path | None
    datasets: list[str]
    models: list[str]
    grid: dict[str, list[Any]]
    overrides: dict[str, dict[str, list[Any]]]
    description: str = ""
    runs: list[SweepRun] = field(default_factory=list)
    #: model -> option names of the grid that the model does not take (dropped for it), for --dry-run.
    ignored: dict[str, list[str]] = field(default_factory=dict)
    #: spec name -> reference, for the plugged-in models (``refs``) and datasets the sweep names by reference
    refs: dict[str, str] = field(default_factory=dict)
    dataset_refs: dict[str, str] = field(default_factory=dict)


def _flag(key: str) -> str:
    return key.replace("_", "-")


def _format_value(key: str, value: Any) -> str:
    """A value as it appears in a tag: TOML-like, restricted to file-name-safe characters."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)  # shortest round-trip form: 0.0001, 1e-05
    elif key == "config":
        text = Path(str(value)).stem
    elif isinstance(value, (list, tuple)):  # a list-valued hyperparameter: hidden-features=64x64
        text = "x".join(_format_value(key, v) for v in value)
    else:
        text = str(value)
    return _UNSAFE.sub("_", text)


def make_tag(values: Iterable[tuple[str, Any]]) -> str:
    """Deterministic tag from a run's settings: ``key=value`` pairs sorted by key, joined by commas.

    Seeds and execution-only options (:data:`UNTAGGED`) are left out; no settings gives ``default``.
    """
    parts = [f"{_flag(k)}={_format_value(k, v)}" for k, v in sorted(values) if k not in UNTAGGED]
    tag = ",".join(parts) or "default"
    if len(tag) > MAX_TAG:
        digest = hashlib.sha1(tag.encode()).hexdigest()[:10]
        tag = f"{tag[: MAX_TAG - 11]}+{digest}"
    return tag


def _axes(table: Any, source: str) -> dict[str, list[Any]]:
    """Validate one ``[grid]``/``[override.X]`` table: run-flag keys; scalar or non-empty list values."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source} must be a table of `flowbench run` options, e.g. `seed = [0, 1]`")
    axes: dict[str, list[Any]] = {}
    for raw, value in table.items():
        values = value if isinstance(value, list) else [value]
        if _list_valued(raw) and isinstance(value, list) and not any(isinstance(v, list) for v in value):
            values = [value]  # `hidden-features = [64, 64]` is one value; an axis of lists is [[64], [64, 64]]
        if isinstance(value, dict) or not values:
            raise ConfigError(f"{source}: {raw!r} must be a value or a non-empty list of values")
        # normalize() checks the key against the run options (naming a bad key) and each value's type.
        checked = [normalize({raw: v}, source) for v in values]
        key = next(iter(checked[0]))
        if key in RESERVED:
            what = "top-level `datasets`/`models` lists" if key in ("dataset", "model") else "sweep itself"
            raise ConfigError(f"{source}: {raw!r} cannot be set in a sweep; it is set by the {what}")
        if key in axes:
            raise ConfigError(f"{source}: {raw!r} is given twice (as {_flag(key)!r} and with underscores)")
        vals = [c[key] for c in checked]
        if len(set(map(repr, vals))) != len(vals):
            raise ConfigError(f"{source}: {raw!r} lists a value twice: {value!r}")
        axes[key] = vals
    return axes


def _list_valued(raw: str) -> bool:
    """Whether the hyperparameter named ``raw`` takes a list for every model that has it (where models disagree, a
    flat list is an axis, and a list value is written as a list of lists)."""
    decl = hparam_declarations().get(str(raw).strip().lstrip("-").replace("-", "_"))
    return decl is not None and all(h.type is tuple for h in decl["models"].values())


def _names(raw: Any, what: str, source: str, known: Iterable[str] | None) -> list[str]:
    """A validated list of names; ``known`` None means "not checkable here" (accept any)."""
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) for x in raw):
        raise ConfigError(
            f"{source}: `{what}` must be a non-empty list of names, e.g. {what} = ['digits']"
            if what == "datasets"
            else f"{source}: `{what}` must be a non-empty list of names"
        )
    known = list(raw) if known is None else list(known)
    bad = [x for x in raw if x not in known]
    if bad:
        raise ConfigError(f"{source}: unknown {what[:-1]} {bad[0]!r} in `{what}`; choose from {', '.join(known)}")
    if len(set(raw)) != len(raw):
        raise ConfigError(f"{source}: `{what}` lists a name twice: {raw}")
    return list(raw)


def _resolve_refs(raw: Any, registry: Any, base: Path | None, refs: dict[str, str]) -> Any:
    """``raw`` (a list of names) with every reference replaced by its spec's name; the references (files made
    absolute, relative to the sweep file's folder) go into ``refs``. Anything else is left to :func:`_names`."""
    if not isinstance(raw, list):
        return raw
    out = []
    for x in raw:
        if isinstance(x, str) and is_reference(x):
            ref = normalize_reference(x, base)
            name = registry.resolve(ref)[0].name
            refs[name] = ref  # two references declaring one name were refused by the registry
            x = name
        out.append(x)
    return out


def parse_sweep(raw: dict[str, Any], name: str = "sweep", path: Path | None = None) -> Sweep:
    """Validate a sweep given as a dict (the parsed TOML) and expand it into runs.

    ``models`` and ``datasets`` may hold references (``module:ATTR``, ``file.py:ATTR``; a file relative to the
    sweep file's folder); such a model is named by its spec's name in ``[override.NAME]`` tables and tags.
    """
    from flowbench.models import MODELS  # lazy: imports torch, and the sweep driver and its workers stay light

    source = f"sweep file {path}" if path else f"sweep {name!r}"
    unknown = [k for k in raw if k not in TOP_LEVEL]
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key {unknown[0]!r}; a sweep file has {', '.join(TOP_LEVEL)} "
            "(run options go in the [grid] table)"
        )
    for key in ("datasets", "models"):
        if key not in raw:
            raise ConfigError(f"{source}: `{key}` is missing; e.g. datasets = ['digits'] and models = ['maf']")
    from flowbench.data import DATASETS  # lazy: imports numpy (see MODELS above)

    refs: dict[str, str] = {}
    dataset_refs: dict[str, str] = {}
    base = path.resolve().parent if path is not None else None
    datasets = _names(
        _resolve_refs(raw["datasets"], DATASETS, base, dataset_refs), "datasets", source, [*DATASETS, *dataset_refs]
    )
    models = _names(_resolve_refs(raw["models"], MODELS, base, refs), "models", source, [*MODELS, *refs])
    grid = _axes(raw.get("grid", {}), f"{source}, [grid]")
    override_raw = raw.get("override", {})
    if not isinstance(override_raw, dict):
        raise ConfigError(f"{source}: `override` must hold tables such as [override.maf]")
    overrides: dict[str, dict[str, list[Any]]] = {}
    for target, table in override_raw.items():
        ds, _, md = target.partition("/")
        ok = (target in models or target in datasets) if not md else (ds in datasets and md in models)
        if not ok:
            raise ConfigError(
                f"{source}: [override.{target}] matches no model or dataset of this sweep; use a name from "
                f'models {models} or datasets {datasets}, or "dataset/model"'
            )
        overrides[target] = _axes(table, f"{source}, [override.{target}]")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{source}: `description` must be a string")
    sweep = Sweep(name, path, datasets, models, grid, overrides, description, refs=refs, dataset_refs=dataset_refs)
    expand(sweep)
    return sweep


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; the sweep's name is the file's stem."""
    path = Path(path)
    raw = read_toml(path, "sweep file", "see configs/sweeps/ for examples")
    return parse_sweep(raw, path.stem, path)


def _applicable(model: str, key: str, refs: dict[str, str] | None = None) -> bool:
    """Whether grid option ``key`` means anything for ``model`` (read from its spec).

    Model hyperparameters apply only to the models that take them (``layers`` is meaningless for the
    Gaussian), ``match-params`` only to models with a size knob to solve for (Gresele et al. 2020, appendix
    H.3, match the baselines' width to relgrad's parameter count), and training options only to trainable
    models (otherwise a learning-rate axis would fit the same Gaussian several times under different tags).
    """
    from flowbench.models import get_spec  # lazy: imports torch (see parse_sweep)

    spec = get_spec((refs or {}).get(model, model))
    if key not in OPTIONS:
        return key in spec.hparams
    if key == "match_params":
        return spec.match_knob is not None
    if key == "match_knob":
        return True
    if OPTIONS[key].training_only:
        return spec.trainable
    return True


def expand(sweep: Sweep) -> list[SweepRun]:
    """Fill ``sweep.runs``: datasets × models × the product of the axes (grid < dataset < model < pair)."""
    runs: dict[tuple[str, str, str, int], SweepRun] = {}
    ignored: dict[str, set[str]] = {}
    for dataset in sweep.datasets:
        for model in sweep.models:
            axes = dict(sweep.grid)
            explicit: dict[str, str] = {}  # keys set specifically for this model, where a misfit is an error
            for target in (dataset, model, f"{dataset}/{model}"):
                table = sweep.overrides.get(target, {})
                axes.update(table)
                if target != dataset:
                    explicit.update({k: target for k in table})
            if "match_params" in axes:  # matching a model to itself is a no-op: `match-params = "relgrad"`
                axes["match_params"] = [v for v in axes["match_params"] if v != model]  # is for the others
                if not axes["match_params"]:
                    del axes["match_params"]
            for key in list(axes):
                if _applicable(model, key, sweep.refs):
                    continue
                if key in explicit:
                    raise ConfigError(
                        f"[override.{explicit[key]}] sets {_flag(key)!r}, which model {model!r} does not take; "
                        "remove it (see `flowbench run --help` for which options apply to which model)"
                    )
                # A shared axis simply does not apply here (e.g. hidden-layers for the Gaussian).
                ignored.setdefault(model, set()).add(_flag(key))
                del axes[key]
            seeds = axes.pop("seed", [0])
            keys = sorted(axes)
            for combo in itertools.product(*(axes[k] for k in keys)):
                values = tuple(zip(keys, combo))
                tag = make_tag(values)
                for seed in seeds:
                    run = SweepRun(
                        dataset, model, int(seed), tag, values, sweep.refs.get(model), sweep.dataset_refs.get(dataset)
                    )
                    prev = runs.setdefault((dataset, model, tag, int(seed)), run)
                    if prev.values != values:  # two configurations whose tags collide after sanitising
                        raise ConfigError(
                            f"{dataset}/{model}: settings {dict(prev.values)} and {dict(values)} both give the "
                            f"tag {tag!r}; use values that differ in letters, digits or . _ + -"
                        )
    sweep.runs = list(runs.values())
    sweep.ignored = {m: sorted(k) for m, k in ignored.items()}
    return sweep.runs
