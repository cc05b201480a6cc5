"""How a model declares itself: one :class:`ModelSpec` at the end of its family module.

Everything that needs to know about a model reads its spec: ``flowbench run``'s hyperparameter flags,
config-file and sweep-grid validation, which options apply to which model, ``--match-params``, the default
learning rate, parameter counting, and the table's row order and labels. The registry
(:mod:`flowbench.models`) is one line per model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from flowbench.errors import ConfigError

__all__ = ["HParam", "ModelSpec"]

_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its default, type (that of the default), allowed values and help text.

    ``choices`` restricts a value to a list; ``low``/``high`` bound a number (inclusive; ``low_open`` makes the
    lower bound strict). ``aliases`` maps an accepted spelling to its canonical value.
    """

    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    aliases: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if type(self.default) not in _TYPES:
            raise TypeError(f"HParam default must be bool, int, float or str; got {self.default!r}")

    @property
    def type(self) -> type:
        return type(self.default)

    def check(self, model: str, key: str, value: Any) -> Any:
        """``value`` converted to this hyperparameter's type, or a ConfigError that says what is allowed."""
        flag = "--" + key.replace("_", "-")
        want = self.type
        bad = ConfigError(f"model {model!r}: {flag} {value!r} has the wrong type; expected {want.__name__}")
        if want is bool:
            if not isinstance(value, bool):
                raise bad
        elif want is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise bad
            value = int(value)
        elif want is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise bad
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"model {model!r}: {flag} must be a finite number; got {value!r}")
        elif not isinstance(value, str):
            raise bad
        if self.choices is not None and value not in self.choices and value not in self.aliases:
            raise ConfigError(
                f"model {model!r}: {flag} {value!r} is not allowed; choose one of {self.choices_text()}"
            )
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            rel = ">" if self.low_open else "≥"
            raise ConfigError(f"model {model!r}: {flag} must be {rel} {self.low:g}; got {value!r}")
        if self.high is not None and value > self.high:
            raise ConfigError(f"model {model!r}: {flag} must be ≤ {self.high:g}; got {value!r}")
        return value

    def choices_text(self) -> str:
        names = list(self.choices or ()) + [f"{a} (= {c})" for a, c in self.aliases.items()]
        return ", ".join(map(str, names))


@dataclass(frozen=True)
class ModelSpec:
    """A model family member, declared once.

    Attributes:
        name: registry name (``maf``), used on the command line, in configs and record paths.
        build: ``build(dim, **hparams) -> Flow``; its keyword arguments are exactly :attr:`hparams`' names.
        hparams: name → :class:`HParam`, in the order the help and records list them.
        label: table row label, a ``str.format`` template over the resolved hyperparameters (``MAF ({layers})``).
        paper: the reference the model follows.
        lr: default Adam learning rate under the MAF protocol.
        match_knob: the hyperparameter ``--match-params`` solves for (None: the model has no size knob).
        count: closed-form parameter count ``count(dim, hparams) -> int``; None builds the model and counts.
        trainable: False for closed-form fits (the Gaussian), which skip gradient training.
        unstackable: ``unstackable(hparams) -> str | None``: why runs with these hyperparameters cannot train
            in a stack (:mod:`flowbench.training.stacked`), or None where they can.
    """

    name: str
    build: Callable[..., Any]
    hparams: Mapping[str, HParam]
    label: str
    paper: str
    lr: float
    match_knob: str | None = None
    count: Callable[[int, Mapping[str, Any]], int] | None = None
    trainable: bool = True
    unstackable: Callable[[Mapping[str, Any]], str | None] | None = None

    def __post_init__(self) -> None:
        if self.match_knob is not None and self.match_knob not in self.hparams:
            raise ValueError(f"{self.name}: match_knob {self.match_knob!r} is not one of its hyperparameters")

    def defaults(self) -> dict[str, Any]:
        return {k: h.default for k, h in self.hparams.items()}

    def resolve(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overridden by ``given`` (``None`` values mean "use the default"), each value checked."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.hparams))
        if unknown:
            flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
            takes = ", ".join("--" + k.replace("_", "-") for k in self.hparams) or "no hyperparameters"
            raise ConfigError(
                f"{flags} does not apply to model {self.name!r}: it does not accept hyperparameter(s) "
                f"{', '.join(unknown)} (it takes {takes}); remove {'it' if len(unknown) == 1 else 'them'} from the command line, "
                "the config file or the sweep grid"
            )
        out = self.defaults()
        for key, value in given.items():
            if value is not None:
                out[key] = self.hparams[key].check(self.name, key, value)
        return out

    def display_name(self, hparams: Mapping[str, Any] | None = None) -> str:
        return self.label.format(**self.resolve(hparams))
