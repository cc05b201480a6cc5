"""Run options: one typed, immutable :class:`RunOptions` built in one place (defaults < config file < flags).

The general options are declared once in :data:`OPTIONS`; model hyperparameters come from the model specs
(:mod:`flowbench.models.spec`). ``flowbench run``'s flags, config files, sweep grids and the resume
fingerprint all read these declarations. The config file is ``--config FILE`` or, when none is given,
``configs/<dataset>/<model>.toml`` if it exists (the paper's settings for that pair; MAF paper section 4 and
Gresele et al. 2020, appendix H). Config keys are the ``flowbench run`` flag names (``max-epochs``;
``max_epochs`` is accepted too); an unknown key is an error that names it, so a typo never silently falls
back to a default. A config file may end with a ``[provenance]`` table (``verified``, ``source``) saying
whether its values are a paper's, confirmed; it travels into the record and the table.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from flowbench.errors import ConfigError, FlowbenchError
from flowbench.plugins import is_reference, normalize_reference

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "CONFIG_DIR",
    "OPTIONS",
    "Option",
    "MAF_PROTOCOL",
    "NO_PROTOCOL_VALUE",
    "RunOptions",
    "RESUME_MAY_CHANGE",
    "RESUME_RAISE_ONLY",
    "UNTAGGED",
    "hparam_declarations",
    "default_config_path",
    "load_config",
    "normalize",
    "read_toml",
    "resolve_options",
    "parse_match_params",
    "parse_seeds",
    "unset_value",
    "fingerprint_model",
]

#: The repository's ``configs/`` folder (the package is installed in editable mode from the checkout).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

#: Above this many parameters ``--match-params N`` is refused: no model of the zoo is meant to be that large,
#: and building one would exhaust memory before saying so.
MAX_MATCH_TARGET = 10**8
#: ``--seeds`` names at most this many seeds: they train as one stack, in one process at once, so memory grows
#: with each seed and one failure or kill stops them all (the sweeps' largest stack, ``stacked.MAX_STACK``).
MAX_SEEDS = 32


class _NoProtocolValue:
    def __repr__(self) -> str:
        return "<kept by --protocol maf>"


#: An :class:`Option`'s ``maf`` when ``--protocol maf`` leaves the option as the config file set it.
NO_PROTOCOL_VALUE: Any = _NoProtocolValue()


@dataclass(frozen=True)
class Option:
    """One general run option (not a model hyperparameter).

    ``tagged``: part of a sweep run's tag (it changes the result). ``resume_may_change``: may differ between a run
    and its ``--resume`` (it does not change the trajectory); ``resume_raise_only``: only upward, and not for a run
    that already finished (a higher value continues it as if it had had it from the start). ``training_only``:
    meaningless for closed-form models such as the Gaussian. ``choices``: the values allowed (checked with the types
    and bounds, wherever a value comes from). ``stackable``: False when the stacked trainer does not implement the
    option, so that a stack needs its default value (:data:`flowbench.training.stacked.UNSTACKABLE`). ``maf``: the
    value ``--protocol maf`` sets (:data:`MAF_PROTOCOL`), or :data:`NO_PROTOCOL_VALUE` where it keeps the config's.
    """

    name: str
    default: Any
    types: tuple[type, ...]
    help: str
    group: str
    metavar: str | None = None
    low: float | None = None
    low_open: bool = False
    tagged: bool = True
    resume_may_change: bool = False
    resume_raise_only: bool = False
    training_only: bool = False
    choices: tuple[str, ...] | None = None
    stackable: bool = True
    maf: Any = NO_PROTOCOL_VALUE

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_WHAT, _TRAIN, _OUT = "what to run", "training (MAF protocol)", "output"

OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (
        Option("dataset", "digits", (str,), "dataset name (see `flowbench datasets`)", _WHAT),
        Option("model", "relgrad", (str,), "model name", _WHAT),
        Option(
            "config",
            None,
            (str,),
            "TOML file of run options (keys = these flag names); default configs/<dataset>/<model>.toml when it exists",
            _WHAT,
            "FILE",
            resume_may_change=True,
        ),
        Option("seed", 0, (int,), "random seed (initial weights, shuffling)", _WHAT, low=0, tagged=False),
        Option(
            "seeds",
            None,
            (str,),
            "train several seeds together as one stack (one batched computation, one "
            f"record per seed): a range 0-4 or a list 0,2,5, at most {MAX_SEEDS}; instead of --seed",
            _WHAT,
            "LIST",
            tagged=False,
            resume_may_change=True,
        ),
        Option(
            "device", "auto", (str,), "auto (GPU if present), cpu or cuda", _WHAT, tagged=False, resume_may_change=True
        ),
        Option("tag", None, (str,), "label for this configuration; records go to runs/<dataset>/<model>/<tag>/", _WHAT),
        Option(
            "max_epochs",
            None,
            (int,),
            "epoch cap (default: none, patience alone stops)",
            _TRAIN,
            "N",
            low=1,
            resume_may_change=True,
            training_only=True,
            maf=None,
        ),
        Option(
            "patience",
            30,
            (int,),
            "epochs without validation improvement before stopping (a resume may raise it, never lower it)",
            _TRAIN,
            "N",
            low=1,
            resume_may_change=True,
            resume_raise_only=True,
            training_only=True,
            maf=30,
        ),
        Option(
            "lr",
            None,
            (float, int),
            "Adam learning rate (default: the model's, MAF protocol: 1e-3 MADE/MADE MoG/relgrad, 1e-4 flows)",
            _TRAIN,
            low=0.0,
            low_open=True,
            training_only=True,
        ),
        Option("batch_size", 100, (int,), "minibatch size", _TRAIN, "N", low=1, training_only=True, maf=100),
        Option(
            "weight_decay",
            1e-6,
            (float, int),
            "L2 penalty coefficient: gradient weight_decay·w (MAF: 1e-6)",
            _TRAIN,
            "W",
            low=0.0,
            training_only=True,
            maf=1e-6,
        ),
        Option(
            "compile",
            False,
            (bool,),
            "compile the training objective with torch.compile (faster steps for small "
            "models after a one-off compile of ~30 s; needs a C++ compiler on CPU)",
            _TRAIN,
            tagged=False,  # as device and threads: where and how a run computes, not what (rounding only)
            resume_may_change=True,
        ),
        Option(
            "adam_epoch_step",
            False,
            (bool,),
            "Adam's bias correction counts epochs, not steps: the relgrad "
            "reference code's quirk (jax adam called with the epoch index), with which its published numbers were "
            "made; default off = ordinary Adam",
            _TRAIN,
            training_only=True,
            stackable=False,
        ),
        Option(
            "checkpoint_every_s",
            30.0,
            (float, int),
            "write the resume checkpoint at most every S seconds (and "
            "at the end of training); 0: after every epoch. A killed run redoes the epochs since the last one, with "
            "the same numbers",
            _TRAIN,
            "S",
            low=0.0,
            tagged=False,
            resume_may_change=True,
            training_only=True,
        ),
        Option(
            "max_steps",
            None,
            (int,),
            "a budget of optimiser steps (the NSF protocol); training stops when it is spent",
            _TRAIN,
            "N",
            low=1,
            training_only=True,
            maf=None,
        ),
        Option(
            "lr_schedule",
            "constant",
            (str,),
            "learning-rate schedule: constant (MAF) or cosine (annealed to 0 over --max-steps, as the NSF code does)",
            _TRAIN,
            training_only=True,
            choices=("constant", "cosine"),
            maf="constant",
        ),
        Option(
            "grad_clip",
            None,
            (float, int),
            "clip the gradient to this global L2 norm (NSF: 5)",
            _TRAIN,
            "NORM",
            low=0.0,
            low_open=True,
            training_only=True,
            maf=None,
        ),
        Option(
            "eval_every",
            None,
            (int,),
            "validate every N steps instead of every epoch; patience then counts evaluations (NSF: 250)",
            _TRAIN,
            "N",
            low=1,
            training_only=True,
            maf=None,
        ),
        Option(
            "protocol",
            None,
            (str,),
            "maf: train under the MAF protocol whatever the config file says (Adam at "
            "the model's lr, batch 100, weight decay 1e-6, patience 30 epochs, no step budget, schedule or "
            "clipping; flags still win); nsf: as the NSF configs set it",
            _TRAIN,
            choices=("maf", "nsf"),
        ),
        Option(
            "eval_batch_size",
            2000,
            (int,),
            "batch size for evaluation",
            _TRAIN,
            "N",
            low=1,
            tagged=False,
            resume_may_change=True,
        ),
        Option(
            "match_params",
            None,
            (int, str),
            "size the model (its spec's knob: the hidden width, or relgrad's "
            "depth) so its parameter count matches N, or MODEL as configured for this dataset",
            _TRAIN,
            "N|MODEL",
        ),
        Option(
            "match_knob",
            None,
            (str,),
            "the hyperparameter --match-params solves for (default: the model's own knob; "
            "name one for a plugged-in flow, e.g. hidden_features: a list knob gets the same width in every entry)",
            _TRAIN,
            "NAME",
        ),
        Option("out", "results", (str,), "results folder", _OUT, "DIR", tagged=False, resume_may_change=True),
        Option(
            "data_root",
            None,
            (str,),
            "prepared data folder (default $FLOWBENCH_DATA or data/)",
            _OUT,
            "DIR",
            tagged=False,
            resume_may_change=True,
        ),
        Option(
            "tensorboard",
            None,
            (str,),
            "also log each epoch's train loss, exact train NLL, validation LL and best "
            "validation LL for TensorBoard under DIR/<dataset>/<model>[/<tag>]/seed<k> (needs the tensorboard extra)",
            _OUT,
            "DIR",
            tagged=False,
            resume_may_change=True,
            stackable=False,
        ),
        Option("resume", False, (bool,), "continue from this run's last checkpoint", _OUT, resume_may_change=True),
        Option(
            "force",
            False,
            (bool,),
            "overwrite an existing record, or start again over a checkpoint",
            _OUT,
            resume_may_change=True,
        ),
        Option(
            "keep_checkpoint",
            False,
            (bool,),
            "keep the full training checkpoint (optimizer, RNG; needed to "
            "--resume a finished run to more epochs) after the record is written; by default only the evaluated "
            "model's state is kept (seed<k>.model.pt)",
            _OUT,
            tagged=False,
            resume_may_change=True,
        ),
        Option(
            "quiet", False, (bool,), "no progress bar or per-epoch lines", _OUT, tagged=False, resume_may_change=True
        ),
        Option(
            "threads",
            None,
            (int,),
            "CPU threads for torch. Default: $OMP_NUM_THREADS if set, else 1 for datasets "
            "of fewer than 256 dimensions (all but MNIST) and torch's default otherwise",
            _OUT,
            "N",
            low=1,
            tagged=False,
            resume_may_change=True,
        ),
    )
}

#: Options that may differ between a run and its resumption (they do not change the trajectory).
RESUME_MAY_CHANGE: tuple[str, ...] = tuple(o.name for o in OPTIONS.values() if o.resume_may_change)
#: Of those, the ones a resume may only raise (patience: a lower one might have stopped the run already).
RESUME_RAISE_ONLY: tuple[str, ...] = tuple(o.name for o in OPTIONS.values() if o.resume_raise_only)
#: Options left out of a sweep run's tag: the seed (replicates share a tag) and where/how it runs.
UNTAGGED: tuple[str, ...] = tuple(o.name for o in OPTIONS.values() if not o.tagged)
#: ``--protocol maf``: the MAF paper's training protocol (section 4), over whatever the config file set (the
#: options declared with ``maf=``; the learning rate is the model's own).
MAF_PROTOCOL: dict[str, Any] = {o.name: o.maf for o in OPTIONS.values() if o.maf is not NO_PROTOCOL_VALUE}


def _default(name: str) -> Any:
    """:class:`RunOptions`' default for general option ``name``: its declaration's."""
    return OPTIONS[name].default


def hparam_declarations() -> dict[str, dict[str, Any]]:
    """Every model hyperparameter name → ``{"type": type or None, "models": {model: HParam}}`` across the registry
    (built-ins, plugins) and the references resolved in this process.

    A name shared by several built-in models (``hidden``, ``layers``) is one flag; its type must agree (a test
    checks). A plugged-in model's values are checked against its own spec.
    """
    from flowbench.models import MODELS

    out: dict[str, dict[str, Any]] = {}
    for _, spec, _ in MODELS.every():
        for key, hp in spec.hparams.items():
            entry = out.setdefault(key, {"type": hp.type, "models": {}})
            entry["models"][spec.name] = hp
            if entry["type"] is not hp.type:  # models disagree (a plugged-in one): each model's spec checks its own
                entry["type"] = None
    return out


#: Where :meth:`RunOptions.to_dict` keeps a plugged-in model's or dataset's reference.
_REFS = ("model_ref", "dataset_ref")


@dataclass(frozen=True)
class RunOptions:
    """Fully resolved options of one run. ``hparams`` holds only the model hyperparameters that were set
    (the spec supplies the rest); ``provenance`` is the config file's ``[provenance]`` table, if any.

    The general options' defaults are their declarations' (:data:`OPTIONS`); ``lr`` left None becomes the
    model's learning rate, as :func:`resolve_options` sets it. Build it with :func:`resolve_options` (config
    files, checks) rather than directly."""

    dataset: str = _default("dataset")
    model: str = _default("model")
    config: str | None = _default("config")
    seed: int = _default("seed")
    seeds: str | None = _default("seeds")
    device: str = _default("device")
    tag: str | None = _default("tag")
    max_epochs: int | None = _default("max_epochs")
    patience: int = _default("patience")
    lr: float | None = _default("lr")  # None: the model's (filled in when built)
    batch_size: int = _default("batch_size")
    weight_decay: float = _default("weight_decay")
    compile: bool = _default("compile")
    adam_epoch_step: bool = _default("adam_epoch_step")
    checkpoint_every_s: float = _default("checkpoint_every_s")
    max_steps: int | None = _default("max_steps")
    lr_schedule: str = _default("lr_schedule")
    grad_clip: float | None = _default("grad_clip")
    eval_every: int | None = _default("eval_every")
    protocol: str | None = _default("protocol")
    eval_batch_size: int = _default("eval_batch_size")
    match_params: int | str | None = _default("match_params")
    match_knob: str | None = _default("match_knob")
    out: str = _default("out")
    data_root: str | None = _default("data_root")
    tensorboard: str | None = _default("tensorboard")
    resume: bool = _default("resume")
    force: bool = _default("force")
    keep_checkpoint: bool = _default("keep_checkpoint")
    quiet: bool = _default("quiet")
    threads: int | None = _default("threads")
    hparams: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] | None = None
    #: The reference (``module:ATTR``, ``/abs/file.py:ATTR``) a plugged-in model or dataset was named by; then
    #: ``model``/``dataset`` hold its spec's name, which names the records' folder.
    model_ref: str | None = None
    dataset_ref: str | None = None

    def __post_init__(self) -> None:
        # As resolve_options: an unset learning rate is the model's own (MAF protocol: 1e-3 MADE, 1e-4 flows).
        if self.lr is None:
            from flowbench.models import get_spec  # lazy: the models import torch

            object.__setattr__(self, "lr", get_spec(self.model_key).lr)

    @property
    def model_key(self) -> str:
        """What :func:`flowbench.models.get_spec` resolves in any process: the reference, else the name."""
        return self.model_ref or self.model

    @property
    def dataset_key(self) -> str:
        return self.dataset_ref or self.dataset

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{option: value}`` with the set hyperparameters beside the general options (records, checkpoints);
        a plugged-in model's or dataset's reference as ``model_ref``/``dataset_ref`` where there is one."""
        flat = {name: getattr(self, name) for name in OPTIONS}
        for key in _REFS:
            if getattr(self, key) is not None:
                flat[key] = getattr(self, key)
        flat.update(self.hparams)
        return flat

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with some general options changed (values checked as a config file's would be)."""
        checked = normalize(changes, "run options")
        unknown = [k for k in checked if k not in OPTIONS]
        if unknown:
            raise ConfigError(f"RunOptions.replace takes general options only; got {unknown}")
        return dataclasses.replace(self, **checked)


def _key(raw: str, source: str) -> str:
    """Map a flag-style key (``max-epochs``) or its underscore synonym to the option name."""
    key = str(raw).strip().lstrip("-").replace("-", "_")
    if key not in OPTIONS and key not in hparam_declarations():
        known = ", ".join(k.replace("_", "-") for k in [*OPTIONS, *hparam_declarations()])
        raise ConfigError(f"unknown option {raw!r} in {source}; valid keys (the `flowbench run` flags): {known}")
    return key


def _name(key: str, source: str) -> str:
    """How an error names an option: the flag on the command line, the key (and file) elsewhere."""
    flag = key.replace("_", "-")
    return f"--{flag}" if source == "the command line" else f"option {flag!r} in {source}"


def _check_value(key: str, value: Any, source: str, spec: Any = None) -> Any:
    """Type and bound check of one value; model hyperparameters are checked per model later (specs)."""
    if key not in OPTIONS:
        hp = spec.hparams.get(key) if spec is not None else None
        want = hp.type if hp is not None else hparam_declarations()[key]["type"]
        if hp is not None and isinstance(value, str) and want is not str and source == "the command line":
            return hp.from_text(spec.name, key, value)  # a flag read as text (a list, or a per-model type)
        if want not in (bool, int, float, str):
            return value  # lists and untyped values: the model's spec checks them
        types: tuple[type, ...] = (float, int) if want is float else (want,)
        low, low_open = None, False
    else:
        opt = OPTIONS[key]
        types, low, low_open = opt.types, opt.low, opt.low_open
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(f"{_name(key, source)} must be one of {', '.join(opt.choices)}; got {value!r}")
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:  # bool is an int subclass: `seed = true` is a mistake
        want_text = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{_name(key, source)} must be {want_text}; got {value!r}")
    if float in types and isinstance(value, (int, float)):
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{_name(key, source)} must be a finite number; got {value!r}")
    if low is not None and isinstance(value, (int, float)):
        if value < low or (low_open and value == low):
            if float not in types:
                rel = "a positive integer" if low == 1 else f"an integer ≥ {low:g}"
            else:
                rel = "a positive number" if low_open and low == 0 else f"≥ {low:g}"
            raise ConfigError(f"{_name(key, source)} must be {rel}; got {value!r}")
    return value


def normalize(options: Mapping[str, Any], source: str, spec: Any = None) -> dict[str, Any]:
    """Validate keys and value types of a partial option mapping; returns it with underscore keys.

    ``spec``: the model's spec where it is known, whose own hyperparameter types then apply.
    """
    out: dict[str, Any] = {}
    for raw, value in options.items():
        key = _key(raw, source)
        if key in out:
            raise ConfigError(f"option {key.replace('_', '-')!r} is given twice in {source}")
        out[key] = _check_value(key, value, source, spec) if value is not None else None
    return out


def resolve_references(options: dict[str, Any], base: str | Path | None = None) -> Any:
    """Make ``model``/``dataset`` references in ``options`` absolute (files: relative to ``base``) and resolve
    them, so that their hyperparameters are known; returns the model's spec where a model is given, else None.

    A ``model_ref``/``dataset_ref`` key (a record's or a checkpoint's options) stands for the name beside it.
    """
    from flowbench.data import DATASETS
    from flowbench.models import MODELS

    for key, registry in (("model", MODELS), ("dataset", DATASETS)):
        ref = options.pop(f"{key}_ref", None)
        if ref is not None:
            options[key] = ref
        value = options.get(key)
        if isinstance(value, str) and is_reference(value):
            options[key] = normalize_reference(value, base)
            registry.resolve(options[key])
    for raw in [k for k in options if str(k).lstrip("-").replace("-", "_") == "match_params"]:
        if isinstance(options[raw], str) and is_reference(options[raw]):  # a model to match, relative to `base` too
            options[raw] = normalize_reference(options[raw], base)
    model = options.get("model")
    if not (isinstance(model, str) and model.strip()):
        return None
    spec = MODELS.resolve(model)[0]
    clash = sorted(set(spec.hparams) & set(OPTIONS))
    if clash:  # a flag, a config key and a sweep axis could not tell the two apart
        raise ConfigError(
            f"model {model!r}: hyperparameter(s) {', '.join(clash)} have the names of run options "
            "(`flowbench run --help`); rename them in its spec"
        )
    return spec


def read_toml(path: str | Path, kind: str, hint: str) -> dict[str, Any]:
    """Parse a TOML file; a missing, unreadable or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"{kind} {str(path)!r} {what}; {hint}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{kind} {str(path)!r} is not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{kind} {str(path)!r} is not UTF-8 text ({e}); save it as UTF-8") from e
    except OSError as e:
        raise ConfigError(f"{kind} {str(path)!r} cannot be read: {e.strerror or e}") from e


def _provenance(table: Any, path: str | Path) -> dict[str, Any]:
    """A ``[provenance]`` table, checked: ``verified`` (bool, true only if every value is the paper's) and
    ``source`` (text)."""
    where = f"config file {str(path)!r}, [provenance]"
    if not isinstance(table, dict) or set(table) != {"verified", "source"}:
        raise ConfigError(f"{where} must have exactly the keys verified (true/false) and source (text)")
    if not isinstance(table["verified"], bool) or not isinstance(table["source"], str) or not table["source"]:
        raise ConfigError(f"{where}: verified must be true or false and source a non-empty string")
    return {"verified": table["verified"], "source": table["source"]}


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file (flat keys = run flag names, plus an optional ``[provenance]`` table).

    Returns validated options; the provenance table, if present, under the key ``"_provenance"``.
    """
    path = Path(path)
    raw = read_toml(path, "config file", "pass an existing TOML file to --config")
    prov = raw.pop("provenance", None)
    nested = [k for k, v in raw.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(
            f"config file {str(path)!r} has tables {nested}; use flat keys named like the run flags "
            "(the only table allowed is [provenance])"
        )
    if "config" in raw:
        raise ConfigError(
            f"config file {str(path)!r} sets `config`; a config file cannot name another one — "
            "pass the file you want with --config"
        )
    spec = resolve_references(raw, base=path.resolve().parent)  # file references: relative to the config's folder
    opts = normalize(raw, f"config file {path}", spec)
    if prov is not None:
        opts["_provenance"] = _provenance(prov, path)
    return opts


def default_config_path(dataset: str, model: str) -> Path | None:
    """``configs/<dataset>/<model>.toml`` when it exists, else None (always for a plugged-in model or dataset)."""
    if is_reference(dataset) or is_reference(model):
        return None
    path = CONFIG_DIR / dataset / f"{model}.toml"
    return path if path.is_file() else None


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` → [0, 1, 2, 3, 4]; ``"0,2,5"`` and mixtures such as ``"0-2,7"``; duplicates, negative seeds and
    more than :data:`MAX_SEEDS` seeds refused."""
    how = "give a range such as 0-4 or a list such as 0,2,5 (non-negative integers)"
    ranges: list[tuple[int, int]] = []
    for part in str(text).replace(" ", "").split(","):
        if part.startswith("-"):
            raise ConfigError(f"--seeds {text!r}: seeds are non-negative integers; {how}")
        lo, dash, hi = part.partition("-")
        try:
            ranges.append((int(lo), int(hi) if dash else int(lo)))
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: {how}") from None
        if ranges[-1][1] < ranges[-1][0]:
            raise ConfigError(f"--seeds {text!r}: the range {part} runs backwards; {how}")
    n = sum(hi - lo + 1 for lo, hi in ranges)  # counted before any list is built: 0-10**12 is refused at once
    if n > MAX_SEEDS:
        raise ConfigError(
            f"--seeds {text!r} names {n:,} seeds; one stack trains at most {MAX_SEEDS}, because its seeds train "
            "at once in one process (memory grows with each, and a failure or kill stops them all): give at most "
            f"{MAX_SEEDS} per command (--seeds 0-{MAX_SEEDS - 1}, then {MAX_SEEDS}-{2 * MAX_SEEDS - 1}, ...), or "
            "run them as a sweep, which splits them into stacks that fit in memory"
        )
    seeds = [s for lo, hi in ranges for s in range(lo, hi + 1)]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} names a seed twice")
    return seeds


def parse_match_params(value: int | str | None) -> int | str | None:
    """``--match-params`` is a positive whole parameter count (``5000``) or a registered model name (``maf``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"--match-params must be a parameter count or a model name; got {value!r}")
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        from flowbench.models import MODELS

        if is_reference(text):
            text = normalize_reference(text)
            MODELS.resolve(text)
            return text
        if text not in MODELS:
            raise ConfigError(
                f"--match-params {text!r} is neither a parameter count nor a model; give a positive "
                f"whole number such as 5000, one of {', '.join(MODELS)}, or MODULE:ATTR / "
                "FILE.py:ATTR"
            ) from None
        return text
    if not math.isfinite(number) or number != int(number) or number < 1:
        raise ConfigError(f"--match-params {text!r}: a parameter count must be a positive whole number (e.g. 5000)")
    if number > MAX_MATCH_TARGET:
        raise ConfigError(
            f"--match-params {text!r} is more than {MAX_MATCH_TARGET:,} parameters; no model of the zoo "
            "is meant to be that large"
        )
    return int(number)


def _file_options(explicit: dict[str, Any], use_bundled: bool) -> tuple[dict[str, Any], Path | None]:
    """The config file's options and its path: ``--config``, else the bundled file for the pair, else none."""
    path = explicit.get("config")
    if path is not None:
        opts = load_config(path)
        for key in ("dataset", "model"):
            if key in explicit and key in opts and opts[key] != explicit[key]:
                warnings.warn(
                    f"config file {path} sets {key} = {opts[key]!r}; the command line's --{key} {explicit[key]} wins",
                    stacklevel=3,
                )
        return opts, Path(path)
    if not use_bundled:
        return {}, None
    dataset = explicit.get("dataset", OPTIONS["dataset"].default)
    model = explicit.get("model", OPTIONS["model"].default)
    found = default_config_path(dataset, model)
    if found is None:
        return {}, None
    opts = load_config(found)
    # A bundled config is for exactly this dataset/model pair; it must not switch either.
    for key, want in (("dataset", dataset), ("model", model)):
        if key in opts and opts[key] != want:
            raise ConfigError(f"bundled config {found} sets {key} = {opts[key]!r}; fix the file")
    return opts, found


def _apply_protocol(merged: dict[str, Any], given: dict[str, Any], model_lr: float) -> None:
    """``--protocol maf`` replaces the config file's training settings by the MAF protocol's (flags still win);
    ``nsf`` names the NSF configs' own settings and changes nothing."""
    if merged.get("protocol") == "maf":  # its value was checked against the declared choices
        for key, value in {**MAF_PROTOCOL, "lr": model_lr}.items():
            if key not in given:
                merged[key] = value


def _check_seeds(merged: dict[str, Any], given: dict[str, Any], file_opts: dict[str, Any], path: Path | None) -> None:
    """``--seeds`` is checked now, and a ``--seed`` it would silently replace is refused."""
    if merged["seeds"] is None:
        return
    parse_seeds(merged["seeds"])
    if given.get("seed") is not None:
        where = "" if given.get("seeds") is not None else f" (from config file {path})"
        raise ConfigError(
            f"--seed {given['seed']} and --seeds {merged['seeds']}{where} are both given; --seeds trains "
            "each seed it names and replaces --seed: drop one of them (or add the seed to --seeds)"
        )
    if file_opts.get("seed") is not None and file_opts.get("seeds") is not None:
        raise ConfigError(f"config file {path} sets both seed and seeds; --seeds replaces --seed: keep one of them")


def resolve_options(explicit: Mapping[str, Any] | None = None, *, bundled_config: bool = True) -> RunOptions:
    """The one place run options are completed: defaults < config file < ``explicit`` (non-None values).

    ``explicit`` uses flag names or option names (the flags the user gave, a sweep's values, a test's dict).
    The config file is ``explicit['config']``, else (when ``bundled_config``) the bundled
    ``configs/<dataset>/<model>.toml``. The model's hyperparameters are checked against its spec; ``lr`` left
    unset gets the model's default.
    """
    from flowbench.models import MODELS

    raw = {k: v for k, v in (explicit or {}).items() if v is not None}
    spec = resolve_references(raw)
    if spec is None and raw.get("config") is not None:  # the file may name a plugged-in model whose flags follow
        load_config(raw["config"])
    given = normalize(raw, "the command line", spec)
    file_opts, path = _file_options(given, bundled_config)
    provenance = file_opts.pop("_provenance", None)
    merged = {name: opt.default for name, opt in OPTIONS.items()}
    hparams: dict[str, Any] = {}
    for source in (file_opts, given):
        for key, value in source.items():
            if value is None:
                continue
            (merged if key in OPTIONS else hparams)[key] = value
    merged["config"] = str(path) if path is not None else None
    refs: dict[str, str | None] = {"model_ref": None, "dataset_ref": None}
    spec = MODELS.resolve(merged["model"])[0]
    if is_reference(merged["model"]):  # the spec's name names the records' folder; the reference finds the spec
        refs["model_ref"], merged["model"] = merged["model"], spec.name
    if is_reference(merged["dataset"]):
        from flowbench.data import get_info

        refs["dataset_ref"], merged["dataset"] = merged["dataset"], get_info(merged["dataset"]).name
    if merged["match_knob"] is not None and merged["match_knob"] not in spec.hparams:
        raise ConfigError(
            f"--match-knob {merged['match_knob']!r} is not a hyperparameter of model {spec.name!r}; "
            f"choose one of {', '.join(spec.hparams) or '(it has none)'}"
        )
    _apply_protocol(merged, given, spec.lr)
    _check_seeds(merged, given, file_opts, path)
    if merged["lr_schedule"] == "cosine" and merged["max_steps"] is None:
        raise ConfigError("--lr-schedule cosine anneals over the step budget: give --max-steps too")
    resolved = spec.resolve(hparams)  # every set hyperparameter must apply to this model, with a valid value
    hparams = {k: resolved[k] for k in hparams}  # as the spec reads them: "64,64" and [64, 64] are one value
    if merged["lr"] is None:
        merged["lr"] = spec.lr
    merged["match_params"] = parse_match_params(merged["match_params"])
    return RunOptions(**merged, hparams=hparams, provenance=provenance, **refs)


#: What :func:`unset_value` returns for a key whose default is unknown: equal to no value, itself included.
class _Unknown:
    def __eq__(self, other: object) -> bool:
        return False

    def __ne__(self, other: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "<no known default>"


UNKNOWN_DEFAULT: Any = _Unknown()


def fingerprint_model(fingerprint: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The model of a run's options as :meth:`RunOptions.to_dict` flattened them (records, checkpoints): the key
    that resolves its spec (a plugged-in model's reference, else its name) and its set hyperparameters (the keys
    that are neither general options nor references)."""
    hparams = {k: v for k, v in fingerprint.items() if k not in OPTIONS and k not in _REFS}
    return fingerprint.get("model_ref") or fingerprint["model"], hparams


def fingerprint_display_name(fingerprint: Mapping[str, Any]) -> str | None:
    """The row label (``MADE MoG``, ``MAF (5)``) of a run with these options (:meth:`RunOptions.to_dict`), as its
    record will give it; None when its model no longer resolves (a plug-in not installed, an old option)."""
    from flowbench import models  # lazy: the registry imports torch

    try:
        key, hparams = fingerprint_model(fingerprint)
        return models.display_name(key, **hparams)
    except (FlowbenchError, KeyError, IndexError, ValueError):
        return None


def unset_value(key: str, fingerprint: Mapping[str, Any]) -> Any:
    """The value option or hyperparameter ``key`` has in a run whose options (``fingerprint``, from
    :meth:`RunOptions.to_dict`) do not list it: a general option's declared default (the option did not exist
    yet when an older checkpoint was made, so it ran as the default does), a model hyperparameter's default in
    the spec of the fingerprint's model (only the set ones are listed), None for ``model_ref``/``dataset_ref``;
    :data:`UNKNOWN_DEFAULT`, equal to nothing, for any other key or a model that no longer resolves."""
    if key in OPTIONS:
        return OPTIONS[key].default
    if key in _REFS:
        return None
    from flowbench.models import get_spec

    try:
        hp = get_spec(fingerprint_model(fingerprint)[0]).hparams.get(key)
    except (ConfigError, KeyError, TypeError):
        return UNKNOWN_DEFAULT
    return UNKNOWN_DEFAULT if hp is None or hp.required else hp.default


def coerce_options(options: RunOptions | Mapping[str, Any]) -> RunOptions:
    """``options`` as :class:`RunOptions`; a mapping is resolved over the defaults, without a bundled config."""
    if isinstance(options, RunOptions):
        return options
    return resolve_options(options, bundled_config=False)
