"""Bring your own flow: zuko and nflows flow classes, and flow factory functions, as flowbench models.

:func:`spec_for` turns what ``--model REF`` points at into a :class:`~flowbench.models.spec.ModelSpec`:

- a zuko flow class (a subclass of zuko's ``LazyDistribution``: ``zuko.flows:MAF``, ``NSF``, ``NAF``,
  ``RealNVP``, …; zuko, Rozet et al., https://github.com/probabilists/zuko). Its hyperparameters are the keyword
  arguments of its constructor and those it forwards through ``**kwargs`` (MAF forwards ``hidden_features`` to
  ``MaskedAutoregressiveTransform``, which forwards it to ``MaskedMLP``): the forwarding calls are read from
  the installed zuko's source, so the arguments are those of the version that runs. ``features`` is the data
  dimension and ``context`` is 0 (density estimation).
- an nflows flow class (a subclass of ``nflows.flows.Flow``: ``MaskedAutoregressiveFlow``, ``SimpleRealNVP``;
  Durkan et al., https://github.com/bayesiains/nflows): the same, ``features`` the data dimension. Arguments
  without a default (MaskedAutoregressiveFlow's ``hidden_features``, ``num_layers``, ``num_blocks_per_layer``)
  are required hyperparameters: a run must set them.
- a factory function whose first parameter is the dimension (``features``, ``dim`` or ``num_features``) and
  that returns a flowbench :class:`~flowbench.models.base.Flow`, a zuko flow or an nflows flow; its other
  parameters are the hyperparameters (those without a default are required; their annotation, if any, types
  them), and a factory that passes ``**kwargs`` on (``def make(features, **kw): return zuko.flows.MAF(features,
  **kw)``) also takes the hyperparameters of what it calls. A flowbench Flow subclass whose constructor starts
  with the dimension is such a factory too.

Only arguments whose default is a bool, int, float, str or a tuple of numbers (``hidden_features=(64, 64)``)
become hyperparameters (or, for classes and factories, those without a default, as required ones). The rest
(an activation class or function, ``None``, a dict of network options, a tensor) keep their default: to set
one, write a factory function with a plain argument for it (``def make(features, passes: int = 2): return
zuko.flows.NSF(features, passes=passes)``) or your own ModelSpec.

The built flow is a :class:`PeerFlow`: the peer's module is registered as ``peer`` (``state_dict``, ``.to()``,
the optimiser and ``torch.func.functional_call`` see its parameters under ``peer.<its own names>``), and the
log-density is the peer's own computation. Batch norm inside a peer keeps the peer's behaviour (batch
statistics in training, running averages in evaluation): flowbench's whole-training-set statistics
(``prepare_for_eval``) apply only to flowbench's own batch-norm layers and leave these alone.

Cost: a training step of zuko's MAF through the adapter runs at 0.97–1.03× the throughput of the same flow in a
plain zuko loop (D = 6 and 64, batch 100, one CPU thread; ``tests/benchmarks/adapter_overhead.py``): the loss
is the peer's own ``log_prob`` behind a shape check.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import math
import re
import sys
import textwrap
import typing
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from flowbench.errors import ConfigError
from flowbench.models.base import Flow, Transform
from flowbench.models.spec import ANY, HParam, ModelSpec
from flowbench.models.stacking import stack_probe

__all__ = ["spec_for", "wrap", "PeerFlow", "ZukoFlow", "NflowsFlow", "DIM_NAMES"]

#: Names of a factory's (or class's) dimension parameter.
DIM_NAMES = ("features", "dim", "num_features")
#: Hyperparameters that ``--match-params`` solves for by default, first found wins.
_KNOBS = ("hidden_features", "hidden", "hidden_units", "hidden_size", "width")
#: Default learning rate: the MAF protocol's, 1e-4 for every flow (Papamakarios et al. 2017, section 4).
LR = 1e-4
#: How deep :func:`_collect` follows ``**kwargs`` (zuko: NSF → MAF → MaskedAutoregressiveTransform → MaskedMLP).
_MAX_DEPTH = 8

#: One spec per adapted object, so that two references to one class (``zuko.flows:MAF``,
#: ``zuko.flows.autoregressive:MAF``) give the same spec, not two specs clashing over one name.
_SPECS: dict[Any, ModelSpec] = {}


def spec_for(obj: Any, ref: str) -> ModelSpec | None:
    """The spec of a zuko or nflows flow class or of a flow factory function; None for anything else.

    ``ref`` is how the user named ``obj`` (for messages). Raises ConfigError for a flow class that cannot be
    built for a dataset (no ``features`` argument).
    """
    try:
        cached = _SPECS.get(obj)
    except TypeError:  # unhashable: not a class or function
        return None
    if cached is not None:
        return cached
    lib = _library(obj)
    if lib is not None:
        spec = _class_spec(obj, lib, ref)
    elif _is_factory(obj):
        spec = _factory_spec(obj)
    else:
        return None
    _SPECS[obj] = spec
    return spec


# -- recognising peers -------------------------------------------------------------------------------------
def _zuko_lazy() -> type | None:
    """zuko's LazyDistribution, where zuko is imported (a zuko object was made by an imported zuko)."""
    flows = sys.modules.get("zuko.flows")
    return getattr(flows, "LazyDistribution", None) if flows is not None else None


def _nflows_types() -> tuple[type | None, type | None]:
    """nflows' (Flow, Distribution), where nflows is imported."""
    flows, dists = sys.modules.get("nflows.flows.base"), sys.modules.get("nflows.distributions.base")
    return getattr(flows, "Flow", None), getattr(dists, "Distribution", None)


def _library(obj: Any) -> str | None:
    """ "zuko" or "nflows" for a flow class of theirs (or a subclass of one), else None."""
    if not isinstance(obj, type):
        return None
    lazy = _zuko_lazy()
    if lazy is not None and issubclass(obj, lazy):
        return "zuko"
    nflow, _ = _nflows_types()
    if nflow is not None and issubclass(obj, nflow):
        return "nflows"
    return None


def _is_factory(obj: Any) -> bool:
    """A function (or a flowbench Flow subclass) whose first parameter is the data dimension."""
    if isinstance(obj, type):
        if not issubclass(obj, Flow):
            return False
        fn, owner = _init_of(obj)
    elif inspect.isfunction(obj) or inspect.ismethod(obj):
        fn, owner = obj, None
    else:
        return False
    try:
        params = _params(fn, owner)
    except (TypeError, ValueError):
        return False
    first = params[0] if params else None
    return (
        first is not None
        and first.name in DIM_NAMES
        and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD)
    )


def _version(lib: str) -> str:
    try:
        return version(lib)
    except Exception:  # an uninstalled checkout: the module may still say
        return str(getattr(sys.modules.get(lib), "__version__", "?"))


# -- specs ----------------------------------------------------------------------------------------------
def _safe_name(text: str) -> str:
    """A records-folder name: lower-case letters, digits and ``- _ .``."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-_.")
    return name or "flow"


def _class_spec(cls: type, lib: str, ref: str) -> ModelSpec:
    init, owner = _init_of(cls)
    names = [p.name for p in _params(init, owner)]
    dim_name = next((n for n in DIM_NAMES if n in names), None)
    if dim_name is None:
        raise ConfigError(
            f"model {ref!r}: the {lib} class {cls.__qualname__} takes no `features` argument (the data dimension), "
            "so flowbench cannot build it for a dataset; write a factory function `def make(features): return "
            f"{cls.__name__}(...)` and pass FILE.py:make"
        )
    fixed = {"context": 0} if "context" in names else {}  # density estimation: no conditioning variables
    hparams = _collect(init, owner, bound={dim_name, *fixed}, top=True)
    ours = cls.__module__.split(".")[0] == lib
    name = _safe_name(f"{lib}-{cls.__name__}" if ours else cls.__name__)
    label = f"{lib} {cls.__name__}" if ours else f"{cls.__name__} ({lib})"
    depth = next((k for k in ("transforms", "num_layers") if k in hparams), None)
    if depth is not None:  # the depth in the label, like the MAF paper's "MAF (5)"
        label += f" ({{{depth}}})"
    ref_text = _reference(cls)
    after = f"not those of {ref_text}" if ref_text else "not those of the paper it follows"
    if lib == "zuko":
        paper = (
            f"zuko {_version('zuko')} {cls.__name__} (the architecture and defaults of zuko, {after}: no batch norm)"
        )
    else:
        paper = (
            f"nflows {_version('nflows')} {cls.__name__} (the architecture and defaults of nflows, {after}; "
            "batch norm only where its arguments turn it on)"
        )

    def build(dim: int, **hp: Any) -> Flow:
        return _construct(cls, name, {dim_name: dim, **fixed, **_changed(hparams, hp)}, dim)

    build.__doc__ = f"{cls.__module__}.{cls.__qualname__}({dim_name}=dim, **hparams) as a flowbench Flow."
    return ModelSpec(
        name=name,
        build=build,
        hparams=hparams,
        label=label,
        paper=paper,
        lr=LR,
        match_knob=_knob(hparams),
        unstackable=_stack_check(build),
    )


def _factory_spec(fn: Callable) -> ModelSpec:
    """A factory ``fn(dim, **hparams)``: a function, or a flowbench Flow subclass (its ``__init__``'s)."""
    func, owner = _init_of(fn) if isinstance(fn, type) else (fn, None)
    # context: zuko's conditioning features, which density estimation has none of (where it is forwarded)
    hparams = _collect(func, owner, bound={_params(func, owner)[0].name, "context"}, top=True)
    qual = f"{fn.__module__}.{fn.__qualname__}"
    doc = (inspect.getdoc(fn) or "").strip().split("\n\n")[0].replace("\n", " ")
    name = _safe_name(fn.__name__)

    def build(dim: int, **hp: Any) -> Flow:
        return _construct(fn, name, _changed(hparams, hp), dim, positional=True)

    build.__doc__ = f"{qual}(dim, **hparams) as a flowbench Flow."
    return ModelSpec(
        name=name,
        build=build,
        hparams=hparams,
        label=fn.__name__.replace("{", "{{").replace("}", "}}"),
        paper=f"user factory {qual}" + (f": {doc}" if doc else ""),
        lr=LR,
        match_knob=_knob(hparams),
        unstackable=_stack_check(build),
    )


def _changed(hparams: Mapping[str, HParam], values: Mapping[str, Any]) -> dict[str, Any]:
    """The values to pass: those set away from their defaults, as a user calling the peer would. A forwarded
    argument is not passed where the peer does not forward it (zuko's MaskedAutoregressiveTransform for one
    feature is an ElementWiseTransform, which takes no ``residual``)."""
    return {k: v for k, v in values.items() if hparams[k].required or v != hparams[k].default}


def _construct(make: Callable, name: str, kwargs: dict[str, Any], dim: int, positional: bool = False) -> Flow:
    """``make(**kwargs)`` (a factory: ``make(dim, **kwargs)``) wrapped; its failures are the user's to fix."""
    try:
        peer = make(dim, **kwargs) if positional else make(**kwargs)
    except Exception as e:  # whatever the peer raises for bad arguments (assert, ValueError, TypeError, …)
        args = ", ".join([*([str(dim)] if positional else []), *(f"{k}={v!r}" for k, v in kwargs.items())])
        raise ConfigError(
            f"model {name!r}: {getattr(make, '__qualname__', make)}({args}) failed: "
            f"{type(e).__name__}: {e}; check its hyperparameters"
        ) from e
    return wrap(peer, dim, name)


def _knob(hparams: Mapping[str, HParam]) -> str | None:
    """The first of :data:`_KNOBS` that is a size: an int, a list of ints or untyped."""
    for k in _KNOBS:
        hp = hparams.get(k)
        if hp is not None and (hp.type in (int, ANY) or (hp.type is tuple and hp.item is int)):
            return k
    return None


#: The data dimension :func:`_stack_check` tries a model at (small: the probe builds two models).
_PROBE_DIM = 3
_PROBED: dict[tuple, str | None] = {}


def _stack_check(build: Callable[..., Flow]) -> Callable[[Mapping[str, Any]], str | None]:
    """The spec's ``unstackable``: why runs with these hyperparameters cannot train in a stack, or None.

    Settings known to break a stack are named first (:func:`_unstackable`); otherwise two runs are evaluated
    at once through vmap (:func:`flowbench.models.stacking.stack_probe`) at a small dimension, once per
    hyperparameters in a process. zuko 1.6: MAF, NSF, NCSF, RealNVP, NICE and GMM stack; NAF, UNAF, SOSPF, BPF,
    GF and CNF do not (their transforms differentiate or integrate inside, through autograd Functions vmap
    cannot batch). A model that cannot be built at that dimension is left to the stacked trainer's own probe
    at the data's dimension.
    """

    def unstackable(hp: Mapping[str, Any]) -> str | None:
        why = _unstackable(hp)
        if why is not None:
            return why
        try:
            key = (build, tuple(sorted(hp.items())))
            hash(key)
        except TypeError:  # an unhashable value: probe, do not cache
            key = None
        if key is None or key not in _PROBED:
            try:
                why = stack_probe(lambda: build(_PROBE_DIM, **hp), _PROBE_DIM)
            except Exception:  # not buildable at this dimension: the trainer's probe tries the data's
                why = None
            if key is None:
                return why
            _PROBED[key] = why
        return _PROBED[key]

    return unstackable


def _unstackable(hp: Mapping[str, Any]) -> str | None:
    """Settings under which a stack (vmap over the runs) would not train each run as alone.

    Dropout: one random stream serves the whole stack, so a run's masks would depend on stacking. Batch norm
    (nflows): its running averages are updated in place, once for the whole stack, which vmap refuses.
    """
    for k, v in hp.items():
        if "dropout" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return (
                f"--{k.replace('_', '-')} {v} draws each run's dropout masks from one shared random stream "
                f"(set --{k.replace('_', '-')} 0 to stack)"
            )
        if "batch_norm" in k and v is True:
            return (
                f"--{k.replace('_', '-')}: the peer's batch norm updates its running averages in place, once "
                "for the whole stack (run the seeds one by one)"
            )
    return None


# -- hyperparameters from signatures ---------------------------------------------------------------------
def _init_of(cls: type) -> tuple[Callable, type]:
    """The ``__init__`` a class runs and the class that defines it (zuko classes also define ``__new__``,
    whose signature ``inspect.signature(cls)`` would report)."""
    for c in cls.__mro__:
        if "__init__" in vars(c):
            return vars(c)["__init__"], c
    return object.__init__, object  # pragma: no cover - every class has object's


def _signature(fn: Callable) -> inspect.Signature:
    try:
        return inspect.signature(fn, eval_str=True)  # real types, not "int" strings (PEP 563 modules)
    except Exception:
        return inspect.signature(fn)


def _params(fn: Callable, owner: type | None) -> list[inspect.Parameter]:
    """Parameters of ``fn``, less ``self`` where it is ``owner``'s method."""
    params = list(_signature(fn).parameters.values())
    return params[1:] if owner is not None and params else params


def _collect(
    fn: Callable,
    owner: type | None,
    bound: set[str],
    top: bool = False,
    depth: int = 0,
    out: dict[str, HParam] | None = None,
    seen: set | None = None,
) -> dict[str, HParam]:
    """``fn``'s representable keyword parameters, then those of whatever it passes its ``**kwargs`` to.

    ``bound``: names a caller already sets (the dimension, ``context``, the arguments an outer class passes
    explicitly: NSF's ``univariate``), which are not the user's. Only ``top`` (the class or factory itself)
    turns parameters without a default into required hyperparameters.
    """
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if fn in seen or depth > _MAX_DEPTH:
        return out
    seen.add(fn)
    docs = _arg_docs(owner if owner is not None else fn)
    where = owner.__name__ if owner is not None else getattr(fn, "__qualname__", "the factory")
    var_kw = None
    for p in _params(fn, owner):
        if p.kind is p.VAR_KEYWORD:
            var_kw = p.name
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in bound or p.name in out:
            continue
        hp = _hparam(p, docs.get(p.name) or f"argument {p.name} of {where}", top)
        if hp is not None:
            out[p.name] = hp
    if var_kw is not None:
        for callee, callee_owner, given in _forwards(fn, owner, var_kw):
            _collect(callee, callee_owner, bound | given, False, depth + 1, out, seen)
    return out


def _hparam(p: inspect.Parameter, help: str, required_ok: bool) -> HParam | None:
    """The HParam of one parameter, or None where its default is not a plain value (a class, None, a dict)."""
    if p.default is p.empty:
        if not required_ok:
            return None
        kind, item = _kind(p.annotation)
        return HParam(None, help, kind=kind, item=item, required=True)
    d = p.default
    if type(d) in (bool, str):
        return HParam(d, help)
    if type(d) is int:
        return HParam(d, help, kind=float if _kind(p.annotation)[0] is float else None)
    if type(d) is float:
        return HParam(d, help) if math.isfinite(d) else None
    if (
        isinstance(d, (tuple, list))
        and d
        and all(type(v) in (int, float) for v in d)
        and all(math.isfinite(v) for v in d)
    ):
        return HParam(tuple(d), help)
    return None


_SCALARS = {"bool": bool, "int": int, "float": float, "str": str}


def _kind(annotation: Any) -> tuple[type, type | None]:
    """(kind, item) of a required parameter from its annotation: a scalar, a sequence of ints/floats, else ANY."""
    if isinstance(annotation, str):  # an annotation eval_str could not evaluate
        text = annotation.replace(" ", "")
        if text in _SCALARS:
            return _SCALARS[text], None
        m = re.fullmatch(r"(?:typing\.)?(?:tuple|Tuple|list|List|Sequence)\[(int|float)(?:,\.\.\.)?\]", text)
        return (tuple, _SCALARS[m[1]]) if m else (ANY, None)
    if annotation in (bool, int, float, str):
        return annotation, None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if (
        origin in (tuple, list, Sequence)
        and args
        and args[0] in (int, float)
        and all(a in (args[0], Ellipsis) for a in args)
    ):
        return tuple, args[0]
    return ANY, None


def _forwards(fn: Callable, owner: type | None, var_kw: str) -> list[tuple[Callable, type | None, set[str]]]:
    """Where ``fn`` passes ``**var_kw``: ``(callee, its class or None, names the call sets itself)`` per call.

    Read from ``fn``'s source (``super().__init__(...)``, ``Name(...)``, ``a.b.Name(...)``); where there is no
    source, from the docstring's ``kwargs: Keyword arguments passed to :class:`X```.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        target = _docstring_target(owner if owner is not None else fn, fn)
        return [(*_callable_of(target), set())] if target is not None else []
    local = _local_imports(tree)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not any(
            k.arg is None and isinstance(k.value, ast.Name) and k.value.id == var_kw for k in node.keywords
        ):
            continue
        target = _call_target(node.func, fn, owner, local)
        if target is None:
            continue
        callee, callee_owner = _callable_of(target) if not isinstance(target, tuple) else target
        if callee is None:
            continue
        given = {k.arg for k in node.keywords if k.arg is not None}
        positional = [
            p for p in _params(callee, callee_owner) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if any(isinstance(a, ast.Starred) for a in node.args):  # *args: those without a default are filled
            given |= {p.name for p in positional if p.default is p.empty}
        else:
            given |= {p.name for p in positional[: len(node.args)]}
        out.append((callee, callee_owner, given))
    return out


def _local_imports(tree: ast.AST) -> dict[str, Any]:
    """Names bound by ``import``/``from … import`` inside a function (a factory that imports zuko itself)."""
    out: dict[str, Any] = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "level", 0):
            continue
        for alias in node.names:
            try:
                if isinstance(node, ast.Import):
                    module = importlib.import_module(alias.name)
                    out[alias.asname or alias.name.split(".")[0]] = (
                        module if alias.asname else importlib.import_module(alias.name.split(".")[0])
                    )
                else:
                    out[alias.asname or alias.name] = getattr(importlib.import_module(node.module), alias.name)
            except (ImportError, AttributeError):
                continue  # the factory will fail to import it too, and say so when it is built
    return out


def _call_target(func: ast.expr, fn: Callable, owner: type | None, local: Mapping[str, Any]) -> Any:
    """What a call's ``func`` expression names: ``super().__init__`` → (parent __init__, parent); a name or
    dotted name → the object it refers to in ``fn``'s module; anything else → None."""
    if (
        isinstance(func, ast.Attribute)
        and func.attr == "__init__"
        and isinstance(func.value, ast.Call)
        and isinstance(func.value.func, ast.Name)
        and func.value.func.id == "super"
        and owner is not None
    ):
        mro = owner.__mro__
        for c in mro[mro.index(owner) + 1 :]:
            if "__init__" in vars(c):
                return vars(c)["__init__"], c
        return None
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    scope = {**getattr(fn, "__globals__", {}), **local}
    obj = scope.get(func.id, getattr(builtins, func.id, None))
    for attr in reversed(parts):
        obj = getattr(obj, attr, None)
    return obj


def _callable_of(obj: Any) -> tuple[Callable | None, type | None]:
    """(function to inspect, its class) for a class (its ``__init__``) or a plain function."""
    if isinstance(obj, type):
        if obj.__module__ in ("builtins", "torch.nn.modules.module"):
            return None, None  # nothing of the user's past nn.Module / object
        return _init_of(obj)
    if inspect.isfunction(obj):
        return obj, None
    return None, None


def _docstring_target(doc_of: Any, fn: Callable) -> Any:
    m = re.search(r"kwargs:[^\n]*?:(?:class|func):`~?([\w.]+)`", inspect.getdoc(doc_of) or "")
    if m is None:
        return None
    path = m[1]
    obj = getattr(fn, "__globals__", {}).get(path.rsplit(".", 1)[-1])
    if obj is None and "." in path:
        module, _, attr = path.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            obj = None
    return obj


_ROLE = re.compile(r":\w+:`~?([^`]*)`")


def _arg_docs(obj: Any) -> dict[str, str]:
    """name → description from a Google-style ``Arguments:``/``Args:`` section, Sphinx roles removed."""
    doc = inspect.getdoc(obj) or ""
    out: dict[str, str] = {}
    section = None  # indent of the section header while inside it
    arg_indent, cur = None, None
    for line in doc.splitlines():
        text = line.strip()
        indent = len(line) - len(line.lstrip())
        if re.fullmatch(r"(Arguments|Args|Parameters|Keyword Arguments):", text):
            section, arg_indent, cur = indent, None, None
            continue
        if section is None or not text:
            continue
        if indent <= section:
            section = None
            continue
        m = re.match(r"\*{0,2}(\w+)(?: \([^)]*\))?: ?(.*)", text)
        if m and (arg_indent is None or indent == arg_indent):
            arg_indent, cur = indent, m[1]
            out[cur] = m[2]
        elif cur is not None:
            out[cur] += " " + text
    return {k: _ROLE.sub(r"\1", v).strip() for k, v in out.items() if v.strip()}


def _reference(cls: type) -> str | None:
    """The paper a peer class cites: zuko's ``References: | Title (Authors, Year)``, nflows' ``Reference: > …``."""
    doc = inspect.getdoc(cls) or ""
    m = re.search(r"References?:\s*\n((?:[ \t]*[|>][^\n]*\n?)+)", doc)
    if m is None:
        return None
    lines = [re.sub(r"^\s*[|>]\s*", "", x).strip() for x in m[1].splitlines()]
    lines = [x for x in lines if x and not x.startswith("http")]
    if not lines:
        return None
    if not doc[m.start(1) :].lstrip().startswith("|"):  # nflows: one reference over several lines
        return " ".join(lines).rstrip(".")
    key = re.sub(r"\W", "", cls.__name__).lower()  # RealNVP shares NICE's docstring, which cites both papers
    return next((x for x in lines if key in re.sub(r"\W", "", x).lower()), lines[0])


# -- the flows ------------------------------------------------------------------------------------------
def wrap(peer: Any, dim: int, name: str = "model") -> Flow:
    """A built zuko or nflows flow as a flowbench Flow (a flowbench Flow is returned as it is).

    ConfigError where ``peer`` is none of these or models another dimension than ``dim``.
    """
    if isinstance(peer, Flow):
        if getattr(peer, "dim", dim) != dim:
            raise ConfigError(f"model {name!r}: the factory built a flow for dimension {peer.dim}, not {dim}")
        return peer
    lazy = _zuko_lazy()
    if lazy is not None and isinstance(peer, lazy):
        return ZukoFlow(peer, dim, name)
    nflow, ndist = _nflows_types()
    if ndist is not None and isinstance(peer, ndist):
        return NflowsFlow(peer, dim, name)
    raise ConfigError(
        f"model {name!r}: the factory returned a {type(peer).__name__}, not a flow; return a "
        "flowbench Flow, a zuko flow (LazyDistribution) or an nflows Flow"
    )


class _View(nn.Module):
    """A part of the peer (its transform or base density): holds a reference to the peer, not registered, so
    the peer's tensors live only under ``PeerFlow.peer`` (one state_dict entry each)."""

    def __init__(self, peer: nn.Module):
        super().__init__()
        self.__dict__["_peer"] = peer  # bypasses nn.Module.__setattr__: no submodule, same object on .to()/copy


class PeerFlow(Flow):
    """A flow built by another library. ``peer`` is its module; ``transform`` and ``base`` are views of it (the
    data → latent map and the base density, for the Jacobian tests and whoever needs them); ``_log_prob``
    and ``sample`` are the peer's own."""

    def __init__(self, peer: nn.Module, transform: Transform, base: nn.Module, dim: int):
        super().__init__(transform, base, dim)
        self.peer = peer


class _ZukoTransform(_View, Transform):
    def _flow(self) -> Any:
        dist = self._peer()
        return dist if hasattr(dist, "transform") and hasattr(dist, "base") else None  # a NormalizingFlow

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dist = self._flow()
        if dist is None:  # a density with no transform (zuko GMM): identity
            return x, x.new_zeros(x.shape[:-1])
        z, ladj = dist.transform.call_and_ladj(x)
        return z, _sum_to(ladj, x.dim() - 1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        dist = self._flow()
        if dist is None:
            return z, z.new_zeros(z.shape[:-1])
        x, ladj = dist.transform.inv.call_and_ladj(z)
        return x, _sum_to(ladj, z.dim() - 1)


class _ZukoBase(_View):
    def _dist(self) -> Any:
        dist = self._peer()
        return dist.base if hasattr(dist, "transform") and hasattr(dist, "base") else dist

    def log_prob(self, z: Tensor) -> Tensor:
        return _sum_to(self._dist().log_prob(z), z.dim() - 1)

    def sample(self, n: int) -> Tensor:
        return self._dist().sample((n,))


def _sum_to(t: Tensor, ndim: int) -> Tensor:
    """Sum the rightmost dimensions of a log-density or log-det until it has ``ndim`` (elementwise transforms
    return one per feature)."""
    return t.flatten(ndim).sum(-1) if t.dim() > ndim else t


class ZukoFlow(PeerFlow):
    """A zuko ``LazyDistribution`` (unconditional: called with no context) as a flowbench Flow."""

    def __init__(self, peer: nn.Module, dim: int, name: str = "model"):
        with torch.no_grad():
            dist = peer()
        if tuple(dist.event_shape) != (dim,) or tuple(dist.batch_shape) != ():
            raise ConfigError(
                f"model {name!r}: the zuko flow models events of shape {tuple(dist.event_shape)} "
                f"(batch shape {tuple(dist.batch_shape)}), not vectors of dimension {dim}; build it "
                f"with features={dim} and an unconditional base"
            )
        super().__init__(peer, _ZukoTransform(peer), _ZukoBase(peer), dim)

    def _log_prob(self, x: Tensor) -> Tensor:
        return self.peer().log_prob(x)  # zuko's NormalizingFlow.log_prob: exactly what a zuko loop computes

    def sample(self, n: int) -> Tensor:
        with torch.no_grad():
            return self.peer().sample((n,))


class _NflowsTransform(_View, Transform):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = getattr(self._peer, "_transform", None)
        return t(x) if t is not None else (x, x.new_zeros(x.shape[0]))

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        t = getattr(self._peer, "_transform", None)
        return t.inverse(z) if t is not None else (z, z.new_zeros(z.shape[0]))


class _NflowsBase(_View):
    def _dist(self) -> nn.Module:
        return getattr(self._peer, "_distribution", self._peer)

    def log_prob(self, z: Tensor) -> Tensor:
        return self._dist().log_prob(z)

    def sample(self, n: int) -> Tensor:
        return self._dist().sample(n)


class NflowsFlow(PeerFlow):
    """An nflows ``Flow`` (or any nflows ``Distribution``) as a flowbench Flow, unconditional."""

    def __init__(self, peer: nn.Module, dim: int, name: str = "model"):
        modes = {m: m.training for m in peer.modules()}
        peer.eval()  # the check below must not touch batch-norm averages or ActNorm's data-dependent init
        try:
            with torch.no_grad():
                p = next(iter(peer.parameters()), None)
                out = peer.log_prob(
                    torch.zeros(
                        2, dim, dtype=p.dtype if p is not None else None, device=p.device if p is not None else None
                    )
                )
        except Exception as e:
            raise ConfigError(
                f"model {name!r}: the nflows flow cannot evaluate {dim}-dimensional data "
                f"({type(e).__name__}: {e}); build it with features={dim}"
            ) from e
        finally:
            for m, mode in modes.items():
                m.train(mode)
        if tuple(out.shape) != (2,):
            raise ConfigError(
                f"model {name!r}: the nflows flow returns log-densities of shape {tuple(out.shape)} "
                f"for 2 rows of dimension {dim}; build it with features={dim}"
            )
        super().__init__(peer, _NflowsTransform(peer), _NflowsBase(peer), dim)

    def _log_prob(self, x: Tensor) -> Tensor:
        return self.peer.log_prob(x)

    def sample(self, n: int) -> Tensor:
        """The peer's own steps (base sample, inverse transform) in evaluation mode, with the noise in the
        parameters' dtype: nflows' StandardNormal draws float32 noise whatever the flow's dtype, so a float64 flow
        could not sample through ``peer.sample``."""
        modes = {m: m.training for m in self.peer.modules()}
        self.peer.eval()  # nflows' batch norm inverts only with its running averages (evaluation mode)
        try:
            with torch.no_grad():
                if getattr(self.peer, "_transform", None) is None:
                    return self.peer.sample(n)
                z = self.base.sample(n)
                p = next(self.peer.parameters(), None)
                if p is not None:
                    z = z.to(dtype=p.dtype, device=p.device)
                return self.transform.inverse(z)[0]
        finally:
            for m, mode in modes.items():
                m.train(mode)
