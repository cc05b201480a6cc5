"""How a model declares itself: one :class:`ModelSpec` at the end of its family module.

Everything that needs to know about a model reads its spec: ``flowbench run``'s hyperparameter flags,
config-file and sweep-grid validation, which options apply to which model, ``--match-params``, the default
learning rate, parameter counting, and the table's row order and labels. The registry
(:mod:`flowbench.models`) is one line per model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from flowbench.errors import ConfigError

__all__ = ["ANY", "HParam", "ModelSpec", "conditional_spec"]

_TYPES = (bool, int, float, str)

#: ``HParam(kind=ANY)``: an untyped hyperparameter (a peer library's argument without annotation or default):
#: any bool, int, float, str or list of numbers; command-line text is read as a literal (see :meth:`HParam.check`).
ANY: type = object

_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _number(text: str) -> int | float | None:
    """``text`` as an int (``"64"``) or a float (``"0.1"``, ``"1e-3"``), else None."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def _split_list(text: str) -> list[str] | None:
    """The items of ``"64,64"``, ``"[64, 64]"`` or ``"(64, 64)"`` (a trailing comma allowed), else None."""
    t = text.strip()
    bracketed = len(t) >= 2 and (t[0], t[-1]) in (("[", "]"), ("(", ")"))
    if bracketed:
        t = t[1:-1].strip()
        if not t:
            return []
    elif "," not in t:
        return None
    items = [i.strip() for i in t.split(",")]
    if items and items[-1] == "":  # "64," is a list of one, as in Python
        items.pop()
    return items if items and all(items) else None


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its default, type, allowed values and help text.

    Kinds of value:

    - scalar: the type is that of the default (bool, int, float or str), e.g. ``HParam(100, "hidden units")``.
    - list: a default that is a tuple (or list) of ints or of floats, e.g. zuko's ``hidden_features=(64, 64)``;
      :attr:`type` is ``tuple``, :attr:`item` the item type. Values are tuples; :meth:`check` also takes a list
      (TOML, JSON) and command-line text ``"64,64"`` or ``"[64, 64]"``.
    - required: ``HParam(None, help, kind=int, required=True)`` has no default (:meth:`ModelSpec.resolve` asks
      for it); ``kind`` is bool, int, float, str, ``tuple`` (with ``item``) or :data:`ANY` (also what a missing
      ``kind`` means): an untyped value, a number, bool, text or list of numbers, whose command-line text is read
      as a literal (``"64"`` → 64, ``"0.1"`` → 0.1, ``"true"`` → True, ``"64,64"`` → (64, 64)).

    ``choices`` restricts a value to a list; ``low``/``high`` bound a number, or each item of a list (inclusive;
    ``low_open`` makes the lower bound strict). ``aliases`` maps an accepted spelling to its canonical value.
    """

    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    aliases: Mapping[str, str] = field(default_factory=dict)
    kind: type | None = None
    item: type | None = None
    required: bool = False

    def __post_init__(self) -> None:
        d = self.default
        if self.required:
            if d is not None:
                raise TypeError(f"a required HParam has no default; got default {d!r}")
            kind = ANY if self.kind is None else self.kind
            if kind not in (*_TYPES, tuple, ANY):
                raise TypeError(f"HParam kind must be bool, int, float, str, tuple or ANY; got {kind!r}")
            if kind is tuple and self.item not in (int, float):
                raise TypeError("a required list HParam needs item=int or item=float")
            object.__setattr__(self, "kind", kind)
        elif isinstance(d, (tuple, list)):
            nums = [v for v in d if isinstance(v, numbers.Real) and not isinstance(v, bool)]
            if len(nums) != len(d) or (not d and self.item is None):
                raise TypeError(f"a list HParam default must be a non-empty tuple of ints or of floats; got {d!r}")
            item = self.item or (int if all(isinstance(v, numbers.Integral) for v in d) else float)
            if item not in (int, float) or (item is int and not all(isinstance(v, numbers.Integral) for v in d)):
                raise TypeError(f"HParam item must be int or float, matching the default {d!r}")
            object.__setattr__(self, "default", tuple(map(item, d)))
            object.__setattr__(self, "kind", tuple)
            object.__setattr__(self, "item", item)
        elif type(d) not in _TYPES:
            raise TypeError(f"HParam default must be bool, int, float or str; got {d!r}")
        elif self.kind not in (None, type(d)):
            if not (self.kind is float and type(d) is int):
                raise TypeError(f"HParam default {d!r} is not a {getattr(self.kind, '__name__', self.kind)}")
            object.__setattr__(self, "default", float(d))
            object.__setattr__(self, "kind", float)
        else:
            object.__setattr__(self, "kind", type(d))

    @property
    def type(self) -> type:
        """bool, int, float or str for scalars; ``tuple`` for lists (items: :attr:`item`); :data:`ANY` untyped."""
        return self.kind  # set by __post_init__: the default's type unless declared

    @property
    def cli_type(self) -> type:
        """How the command line reads the flag: ``bool`` as ``--x/--no-x``; ``int``/``float`` as argparse
        ``type=``; ``str`` for everything else, whose text :meth:`check` parses (lists, untyped) or keeps (str)."""
        return self.kind if self.kind in (bool, int, float) else str

    @property
    def default_text(self) -> str:
        """The default as help text shows it: ``64,64`` for lists, ``required`` when there is none."""
        if self.required:
            return "required"
        return ",".join(map(str, self.default)) if self.kind is tuple else str(self.default)

    def check(self, model: str, key: str, value: Any) -> Any:
        """``value`` converted to this hyperparameter's type, or a ConfigError that says what is allowed.

        Scalars take values of their type only (an int for a float). Lists and untyped values also take the
        command line's text (see the class docstring); :meth:`from_text` reads text for every kind.
        """
        flag = _flag(key)
        want = self.kind
        if want is tuple:
            return self._check_list(model, flag, value)
        if want is ANY:
            return self._check_any(model, flag, value)
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
            raise ConfigError(f"model {model!r}: {flag} {value!r} is not allowed; choose one of {self.choices_text()}")
        self._check_bounds(model, flag, value, value)
        return value

    def from_text(self, model: str, key: str, text: str) -> Any:
        """Command-line text → checked value, for every kind (``"64"`` for an int, ``"no"`` for a bool, …).

        For a flag read as ``str`` where another model's same-named hyperparameter has another type.
        """
        if self.kind in (tuple, ANY, str):
            return self.check(model, key, text)
        t = str(text).strip()
        value: Any = None
        if self.kind is bool:
            value = True if t.lower() in (*_TRUE, "1") else False if t.lower() in (*_FALSE, "0") else None
        else:
            n = _number(t)
            value = n if self.kind is float or isinstance(n, int) else None
        if value is None:
            raise ConfigError(
                f"model {model!r}: {_flag(key)} {text!r} has the wrong type; expected "
                f"{self.kind.__name__}{' (true or false)' if self.kind is bool else ''}"
            )
        return self.check(model, key, value)

    def choices_text(self) -> str:
        names = list(self.choices or ()) + [f"{a} (= {c})" for a, c in self.aliases.items()]
        return ", ".join(map(str, names))

    # -- lists and untyped values ---------------------------------------------------------------------------
    def _check_bounds(self, model: str, flag: str, value: Any, shown: Any) -> None:
        """``low``/``high`` of a number (``shown`` is what the message quotes: the whole list for an item)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return
        what = f"{flag} entries" if shown is not value else flag
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            rel = ">" if self.low_open else "≥"
            raise ConfigError(f"model {model!r}: {what} must be {rel} {self.low:g}; got {shown!r}")
        if self.high is not None and value > self.high:
            raise ConfigError(f"model {model!r}: {what} must be ≤ {self.high:g}; got {shown!r}")

    def _check_list(self, model: str, flag: str, value: Any) -> tuple:
        item = self.item
        noun = "integers" if item is int else "numbers"
        example = ",".join(map(str, self.default)) if self.default else ("64,64" if item is int else "0.5,0.5")
        how = f"write it as {example} or [{example.replace(',', ', ')}]"
        if isinstance(value, str):
            parts = _split_list(value)
            if parts is None and value.strip() and "," not in value:
                parts = [value.strip()]  # one entry: "64" is (64,)
            items = [_number(p) for p in parts or []]
            if (
                parts is None
                or not value.strip()
                or any(v is None or (item is int and not isinstance(v, int)) for v in items)
            ):
                raise ConfigError(f"model {model!r}: {flag} {value!r} is not a list of {noun}; {how}")
        elif isinstance(value, (tuple, list)):
            items = list(value)
            if any(
                isinstance(v, bool) or not isinstance(v, numbers.Integral if item is int else numbers.Real)
                for v in items
            ):
                raise ConfigError(f"model {model!r}: {flag} {value!r} is not a list of {noun}; {how}")
        else:
            raise ConfigError(
                f"model {model!r}: {flag} {value!r} has the wrong type; expected a list of {noun} ({how})"
            )
        out = tuple(map(item, items))
        for v in out:
            if not math.isfinite(v):
                raise ConfigError(f"model {model!r}: {flag} entries must be finite numbers; got {value!r}")
            if self.choices is not None and v not in self.choices:
                raise ConfigError(
                    f"model {model!r}: {flag} entries must be one of {self.choices_text()}; got {value!r}"
                )
            self._check_bounds(model, flag, v, out)
        return out

    def _check_any(self, model: str, flag: str, value: Any) -> Any:
        if isinstance(value, str):
            value = _literal(value)
        if isinstance(value, (tuple, list)):
            if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"model {model!r}: {flag} {value!r}: a list must hold numbers only")
            value = tuple(int(v) if isinstance(v, numbers.Integral) else float(v) for v in value)
            items = value
        elif isinstance(value, bool) or isinstance(value, str):
            items = ()
        elif isinstance(value, numbers.Integral):
            value = int(value)
            items = (value,)
        elif isinstance(value, numbers.Real):
            value = float(value)
            items = (value,)
        else:
            raise ConfigError(
                f"model {model!r}: {flag} {value!r} has the wrong type; expected a number, true/false, "
                "text or a list of numbers"
            )
        if any(not math.isfinite(v) for v in items):
            raise ConfigError(f"model {model!r}: {flag} must be finite; got {value!r}")
        if self.choices is not None and value not in self.choices and value not in self.aliases:
            raise ConfigError(f"model {model!r}: {flag} {value!r} is not allowed; choose one of {self.choices_text()}")
        for v in items:
            self._check_bounds(model, flag, v, value if isinstance(value, tuple) else v)
        return value


def _literal(text: str) -> Any:
    """Command-line text of an untyped value: a number, a bool, a list of numbers, else the text itself."""
    t = text.strip()
    if t.lower() in _TRUE:
        return True
    if t.lower() in _FALSE:
        return False
    n = _number(t)
    if n is not None:
        return n
    parts = _split_list(t)
    if parts is not None:
        items = [_number(p) for p in parts]
        if all(v is not None for v in items):
            return tuple(items)
    return text


@dataclass(frozen=True)
class ModelSpec:
    """A model family member, declared once.

    Attributes:
        name: registry name (``maf``), used on the command line, in configs and record paths.
        build: ``build(dim, **hparams) -> Flow``; its keyword arguments are exactly :attr:`hparams`' names.
        hparams: name → :class:`HParam`, in the order the help and records list them; some may be lists or
            required (no default: :meth:`resolve` refuses to go on without them).
        label: table row label, a ``str.format`` template over the resolved hyperparameters (``MAF ({layers})``).
        paper: the reference the model follows.
        lr: default Adam learning rate under the MAF protocol.
        match_knob: the hyperparameter ``--match-params`` solves for (None: the model has no size knob).
        count: closed-form parameter count ``count(dim, hparams) -> int``; None builds the model and counts.
        trainable: False for closed-form fits (the Gaussian), which skip gradient training.
        unstackable: ``unstackable(hparams) -> str | None``: why runs with these hyperparameters cannot train
            in a stack (:mod:`flowbench.training.stacked`), or None where they can.
        conditional: a class-conditional model (MAF paper Table 2, named ``<name>-cond``): ``build(dim, *,
            classes, **hparams)`` returns a :class:`~flowbench.models.base.ConditionalFlow` whose rows are
            ``[x, onehot(y)]``, and ``count(dim, hparams, classes)`` takes the number of classes K too.
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
    conditional: bool = False

    def __post_init__(self) -> None:
        if self.match_knob is not None and self.match_knob not in self.hparams:
            raise ValueError(f"{self.name}: match_knob {self.match_knob!r} is not one of its hyperparameters")

    def defaults(self) -> dict[str, Any]:
        """name → default (None for a required hyperparameter)."""
        return {k: h.default for k, h in self.hparams.items()}

    def required(self) -> list[str]:
        """The hyperparameters without a default, which every run must set."""
        return [k for k, h in self.hparams.items() if h.required]

    def resolve(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overridden by ``given`` (``None`` values mean "use the default"), each value checked.

        Raises ConfigError for an unknown name, a bad value, and a required hyperparameter left unset.
        """
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.hparams))
        if unknown:
            flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
            takes = ", ".join("--" + k.replace("_", "-") for k in self.hparams) or "no hyperparameters"
            raise ConfigError(
                f"{flags} does not apply to model {self.name!r}: it does not accept hyperparameter(s) "
                f"{', '.join(unknown)} (it takes {takes}); remove {'it' if len(unknown) == 1 else 'them'} from the "
                "command line, "
                "the config file or the sweep grid"
            )
        out = self.defaults()
        for key, value in given.items():
            if value is not None:
                out[key] = self.hparams[key].check(self.name, key, value)
        missing = [k for k in self.required() if out[k] is None]
        if missing:
            flags = ", ".join(_flag(k) for k in missing)
            one = len(missing) == 1
            raise ConfigError(
                f"model {self.name!r} needs {flags}: {'it has' if one else 'they have'} no default; give "
                f"{'it' if one else 'them'} on the command line (e.g. {_flag(missing[0])} VALUE), in the config "
                "file or in the sweep grid"
            )
        return out

    def display_name(self, hparams: Mapping[str, Any] | None = None) -> str:
        return self.label.format(**self.resolve(hparams))


def conditional_spec(
    spec: ModelSpec, build: Callable[..., Any], count: Callable[[int, Mapping[str, Any], int], int] | None = None
) -> ModelSpec:
    """The class-conditional version of ``spec`` (MAF paper Table 2): named ``<name>-cond``, with the same label
    (the table puts it in its "cond." column), hyperparameters, learning rate and matching knob.

    ``build(dim, *, classes, **hparams)`` builds it; ``count(dim, hparams, classes)`` is its parameter count
    (None: built and counted).
    """
    return replace(spec, name=f"{spec.name}-cond", build=build, count=count, conditional=True)
