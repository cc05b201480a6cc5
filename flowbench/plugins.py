"""Models and datasets from outside the package: references and installed plugins.

A model (or dataset) is named in one of three ways wherever flowbench takes a name:

* a registered name: a built-in (``maf``) or one an installed plugin declares through the entry-point group
  ``flowbench.models`` (``flowbench.datasets``);
* ``package.module:ATTR``: an importable module (the working directory is searched last, as ``python -m`` does);
* ``path/to/file.py:ATTR``: a Python file, imported under a private module name with its folder on the path.

ATTR (dotted for nested attributes) is the spec, or something the caller turns into one (a callable
returning a spec; for models a zuko or nflows flow, :mod:`flowbench.models.adapters`). :class:`Registry` holds
one kind's built-ins and plugins, loads plugins on first use, and resolves references; every failure a user
can cause is a :class:`~flowbench.errors.ConfigError` that says what to do. A plugin that fails to load
never breaks another command: it is reported once, in one line on stderr, and its name becomes an error
only when it is asked for.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from flowbench.errors import ConfigError

__all__ = ["Origin", "Registry", "is_reference", "normalize_reference", "load_reference", "reference_parts"]


@dataclass(frozen=True)
class Origin:
    """Where a spec came from: ``kind`` is ``built-in``, ``plugin``, ``module`` or ``file``.

    ``detail``: the plugin's distribution and version, the module, or the file's absolute path; ``sha256``:
    a file reference's content hash (a record can tell that the file changed since).
    """

    kind: str
    detail: str = ""
    reference: str | None = None
    sha256: str | None = None

    def text(self) -> str:
        return self.kind if not self.detail else f"{self.kind}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in {
                "kind": self.kind,
                "detail": self.detail,
                "reference": self.reference,
                "sha256": self.sha256,
            }.items()
            if v
        }


BUILTIN = Origin("built-in")


def is_reference(text: str) -> bool:
    """True for ``module:ATTR`` and ``file.py:ATTR``; a registered name has no colon."""
    return isinstance(text, str) and ":" in text


def reference_parts(text: str) -> tuple[str, str, bool]:
    """``(target, attr, is_file)`` of a reference; ConfigError when it cannot be one."""
    target, _, attr = text.rpartition(":")
    target, attr = target.strip(), attr.strip()
    example = "mypkg.flows:MY_SPEC or path/to/flow.py:MY_SPEC"
    if not target or not attr:
        raise ConfigError(f"{text!r} is not a reference; write MODULE:ATTR or FILE.py:ATTR, e.g. {example}")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise ConfigError(
            f"{text!r}: {attr!r} is not an attribute name; write MODULE:ATTR or FILE.py:ATTR, e.g. {example}"
        )
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if not is_file and not all(part.isidentifier() for part in target.split(".")):
        raise ConfigError(f"{text!r}: {target!r} is neither a module name nor a .py file; e.g. {example}")
    return target, attr, is_file


def normalize_reference(text: str, base: str | Path | None = None) -> str:
    """A reference with a file's path made absolute (relative to ``base``, default the working directory),
    so that it means the same file in every process that runs it; names and module references unchanged."""
    if not is_reference(text):
        return text
    target, attr, is_file = reference_parts(text)
    if not is_file:
        return f"{target}:{attr}"
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = Path(base if base is not None else os.getcwd()) / path
    return f"{os.path.normpath(path)}:{attr}"


def _describe(e: BaseException) -> str:
    where = ""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if isinstance(e, SyntaxError) and e.lineno:
        where = f" (line {e.lineno})"
    elif tb is not None:
        where = f" ({Path(tb.tb_frame.f_code.co_filename).name}, line {tb.tb_lineno})"
    return f"{type(e).__name__}: {e}{where}"


def _import_file(path: Path, what: str, ref: str) -> Any:
    if not path.exists():
        raise ConfigError(
            f"{what} {ref!r}: no such file {path}; check the path (relative paths are taken from "
            "the working directory, or from the folder of the config or sweep file that names them)"
        )
    if not path.is_file():
        raise ConfigError(f"{what} {ref!r}: {path} is not a file; name a .py file")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"flowbench_user_{resolved.stem if resolved.stem.isidentifier() else 'file'}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{what} {ref!r}: {path} cannot be imported as Python; name a .py file")
    module = importlib.util.module_from_spec(spec)
    folder = str(resolved.parent)
    if folder not in sys.path:  # as for a script: the file may import the modules beside it
        sys.path.append(folder)
    sys.modules[name] = module  # before executing: dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ConfigError(f"{what} {ref!r}: importing {path} failed: {_describe(e)}; fix the file and try again") from e
    return module


def _import_module(target: str, what: str, ref: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # like `python -m`, but after everything installed
        sys.path.append(cwd)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise ConfigError(
                f"{what} {ref!r}: no module named {e.name!r}; install the package that provides "
                "it, run from the folder that holds it, or name a file instead "
                "(path/to/file.py:ATTR)"
            ) from e
        raise ConfigError(f"{what} {ref!r}: importing {target} failed: {_describe(e)}; install what it needs") from e
    except Exception as e:
        raise ConfigError(
            f"{what} {ref!r}: importing {target} failed: {_describe(e)}; fix the module and try again"
        ) from e


def load_reference(text: str, what: str = "model") -> tuple[Any, Origin]:
    """The object a reference names, and where it came from. ``what`` names the kind in error messages."""
    target, attr, is_file = reference_parts(text)
    sha = None
    if is_file:
        path = Path(target).expanduser()
        module = _import_file(path, what, text)
        try:
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            sha = None
        origin = Origin("file", str(path.resolve()), text, sha)
    else:
        module = _import_module(target, what, text)
        origin = Origin("module", target, text)
    obj = module
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = target if i == 0 else f"{target}:{'.'.join(attr.split('.')[:i])}"
            public = [n for n in dir(obj) if not n.startswith("_")][:12]
            hint = f"; it has {', '.join(public)}" if public else ""
            raise ConfigError(f"{what} {text!r}: {owner} has no attribute {part!r}{hint}") from None
    return obj, origin


class Registry(dict):
    """Registered specs of one kind (name → spec): built-ins, then installed plugins (loaded on first use).

    A dict, so tests and users can add to it; every read loads the plugins first. ``coerce(obj, ref)``
    turns a loaded object into a spec (with a ``name``) or raises ConfigError.
    """

    def __init__(self, kind: str, group: str, builtins: dict[str, Any], coerce: Callable[[Any, str], Any]):
        super().__init__(builtins)
        self.kind = kind
        self.group = group
        self.coerce = coerce
        self.origins: dict[str, Origin] = {name: BUILTIN for name in builtins}
        self.broken: dict[str, str] = {}  # name -> why it cannot be used (plugin import error, clash)
        self.referenced: dict[str, tuple[Any, Origin]] = {}  # normalized reference -> (spec, origin)
        self._builtins = dict(builtins)
        self._loaded = False

    def reset(self) -> None:
        """Forget plugins and resolved references (they are found again on next use): for tests, and for a
        long-lived process whose installed packages changed."""
        dict.clear(self)
        dict.update(self, self._builtins)
        self.origins = {name: BUILTIN for name in self._builtins}
        self.broken.clear()
        self.referenced.clear()
        self._loaded = False

    # -- plugins --------------------------------------------------------------------------------------
    def _ensure(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            from importlib.metadata import entry_points

            eps = list(entry_points(group=self.group))
        except Exception as e:  # a broken environment must not break flowbench
            print(f"flowbench: warning: cannot list the {self.group} plugins: {_describe(e)}", file=sys.stderr)
            return
        seen: dict[str, str] = {}
        for ep in eps:
            dist = getattr(ep, "dist", None)
            who = f"{dist.metadata['Name']} {dist.version}" if dist is not None else ep.value
            label = f"plugin {ep.name!r} ({who}, {ep.value})"
            if ep.name in seen:
                self._break(
                    ep.name,
                    f"{self.kind} {ep.name!r} is declared by two plugins, {seen.get(ep.name)} and "
                    f"{label}; uninstall one, or rename it in its entry points ({self.group})",
                )
                continue
            seen[ep.name] = label
            if dict.__contains__(self, ep.name):
                self._break(
                    ep.name,
                    f"{label} reuses the name of the built-in {self.kind} {ep.name!r}; rename it in "
                    f"its entry points ({self.group}) and its spec",
                    keep=True,
                )
                continue
            try:
                spec = self.coerce(ep.load(), f"{ep.value}")
            except ConfigError as e:
                self._break(ep.name, f"{label} is not usable: {e}")
                continue
            except Exception as e:
                self._break(ep.name, f"{label} failed to load: {_describe(e)}")
                continue
            name = getattr(spec, "name", None)
            if name != ep.name:
                self._break(
                    ep.name,
                    f"{label} declares the {self.kind} {name!r} under the entry-point name "
                    f"{ep.name!r}; make the two names equal",
                )
                continue
            dict.__setitem__(self, name, spec)
            self.origins[name] = Origin("plugin", who, ep.value)

    def _break(self, name: str, why: str, keep: bool = False) -> None:
        print(f"flowbench: warning: {why}", file=sys.stderr)
        if keep:  # a built-in keeps its name; the clash is reported, the plugin is not loaded
            self.broken.setdefault(f"{name} (plugin)", why)
            return
        self.broken[name] = why
        if dict.__contains__(self, name) and self.origins.get(name, BUILTIN).kind == "plugin":
            dict.__delitem__(self, name)

    # -- dict reads load plugins first ----------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        self._ensure()
        return dict.__contains__(self, key)

    def __getitem__(self, key: str) -> Any:
        self._ensure()
        return dict.__getitem__(self, key)

    def __iter__(self) -> Iterator[str]:
        self._ensure()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._ensure()
        return dict.__len__(self)

    def keys(self):  # noqa: ANN201 - dict's own view types
        self._ensure()
        return dict.keys(self)

    def values(self):  # noqa: ANN201
        self._ensure()
        return dict.values(self)

    def items(self):  # noqa: ANN201
        self._ensure()
        return dict.items(self)

    def get(self, key: str, default: Any = None) -> Any:
        self._ensure()
        return dict.get(self, key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self._ensure()
        dict.__setitem__(self, key, value)
        self.origins.setdefault(key, BUILTIN)

    # -- resolution ---------------------------------------------------------------------------------
    def resolve(self, key: str) -> tuple[Any, Origin]:
        """The spec a name or reference stands for, and its origin."""
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"a {self.kind} must be a name or a reference (MODULE:ATTR, FILE.py:ATTR); got {key!r}")
        if key in self:
            return self[key], self.origins.get(key, BUILTIN)
        if key in self.broken:
            raise ConfigError(self.broken[key])
        if not is_reference(key):
            raise ConfigError(
                f"unknown {self.kind} {key!r}; choose one of {', '.join(self)}, or name your own as "
                f"MODULE:ATTR or FILE.py:ATTR (see `flowbench {self.kind}s`)"
            )
        ref = normalize_reference(key)
        if ref in self.referenced:
            return self.referenced[ref]
        obj, origin = load_reference(ref, self.kind)
        spec = self.coerce(obj, ref)
        name = spec.name
        registered = dict.get(self, name)
        if registered is not None and registered is not spec:
            where = self.origins.get(name, BUILTIN).text()
            raise ConfigError(
                f"the {self.kind} at {key!r} is named {name!r}, which is the {where} {self.kind}'s "
                "name; give your spec another name (its records would mix with that one's)"
            )
        for other, (other_spec, _) in self.referenced.items():
            if other_spec.name == name and other_spec is not spec:
                raise ConfigError(
                    f"{key!r} and {other!r} both declare the {self.kind} {name!r}; give them different "
                    "names (their records would share a folder)"
                )
        self.referenced[ref] = (spec, origin)
        return spec, origin

    def every(self) -> list[tuple[str, Any, Origin]]:
        """``(name, spec, origin)`` of the registered specs, then of the references resolved in this process."""
        rows = [(name, spec, self.origins.get(name, BUILTIN)) for name, spec in self.items()]
        rows += [(ref, spec, origin) for ref, (spec, origin) in self.referenced.items()]
        return rows
