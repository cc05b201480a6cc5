"""A restricted unpickler for the pickles in the MAF archive; no pandas needed.

``gas/ethylene_CO.pickle`` is a pandas DataFrame pickled by an old pandas, ``mnist/mnist.pkl.gz`` a
(possibly Python 2) pickle of numpy arrays, and ``cifar10/data_batch_1`` … ``cifar10/test_batch`` Python 2
pickles of a dict (``data``: uint8 array, ``labels``: list of ints, ``filenames``, ``batch_label``), read by
:func:`load_cifar_batch` with the narrowest allow-list (numpy's array reconstructor only). Unpickling runs
code named by the file, so a file from the internet goes through :class:`RestrictedUnpickler`: every global the
pickle names is looked up in an allow-list *by its name and top-level package* (module paths
moved between pandas 0.x and 1.x/2.x:
``pandas.core.internals.BlockManager`` → ``pandas.core.internals.managers.BlockManager``,
``pandas.indexes.base._new_Index`` → ``pandas.core.indexes.base._new_Index``, …) and replaced by an inert
stand-in that only records its arguments and state. numpy arrays are rebuilt by numpy's own reconstructors.
Anything else (``os.system``, ``builtins.eval``, …) raises :class:`UnsafePickleError`.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import io
import pickle
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowbench.errors import DataIntegrityError, UnsafePickleError


def _numpy_attr(submodule: str, name: str) -> Any:
    """``numpy._core.<sub>.<name>`` (numpy 2) or ``numpy.core.<sub>.<name>`` (numpy 1)."""
    import importlib

    for base in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{base}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {submodule}.{name}")


class _Stub:
    """Inert stand-in for a pandas class: records constructor arguments and pickled state, runs nothing."""

    pandas_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Stub":
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _FrameStub(_Stub):
    pandas_name = "DataFrame"


class _ManagerStub(_Stub):
    pandas_name = "BlockManager"


class _IndexClassStub(_Stub):
    pandas_name = "Index"


class _BlockStub(_Stub):
    pandas_name = "Block"


@dataclass
class _IndexValue:
    values: np.ndarray
    name: Any = None


def _new_index(cls: Any, d: dict) -> _IndexValue:
    """Stand-in for pandas' ``_new_Index(cls, d)``: keeps the labels only."""
    if not isinstance(d, dict):
        raise DataIntegrityError("unexpected pandas Index pickle layout")
    if "data" in d:
        return _IndexValue(np.asarray(d["data"]), d.get("name"))
    if "start" in d or "stop" in d:  # RangeIndex
        return _IndexValue(np.arange(d.get("start") or 0, d["stop"], d.get("step") or 1), d.get("name"))
    raise DataIntegrityError(f"unexpected pandas Index pickle layout (keys {sorted(d)})")


def _unpickle_block(values: Any, mgr_locs: Any, ndim: int = 2) -> _BlockStub:
    """Stand-in for ``pandas._libs.internals._unpickle_block`` (pandas ≥ 1.3)."""
    b = _BlockStub()
    b.state = {"values": values, "mgr_locs": mgr_locs}
    return b


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError(
            f"pickle asks numpy to rebuild an array of type {subtype!r}; only plain ndarrays are allowed"
        )
    return _numpy_attr("multiarray", "_reconstruct")(subtype, shape, dtype)


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects), allowed for our stand-ins only."""
    if isinstance(cls, type) and issubclass(cls, _Stub) and base is object:
        return cls.__new__(cls)
    raise UnsafePickleError(f"pickle asks copyreg to build {cls!r} from {base!r}; refused")


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode``: how Python 3 writes ``bytes`` at protocol 2; only str → bytes is allowed."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafePickleError(f"pickle calls _codecs.encode with {type(obj).__name__}, {encoding!r}; refused")
    return obj.encode(encoding, errors)


def _numpy_globals() -> dict[str, Any]:
    return {
        "_reconstruct": _safe_reconstruct,
        "ndarray": np.ndarray,
        "dtype": np.dtype,
        "scalar": _numpy_attr("multiarray", "scalar"),
        "_frombuffer": _numpy_attr("numeric", "_frombuffer"),
    }


_PANDAS_CLASSES: dict[str, type] = {
    "DataFrame": _FrameStub,
    "BlockManager": _ManagerStub,
    **{
        n: _IndexClassStub for n in ("Index", "Int64Index", "UInt64Index", "Float64Index", "RangeIndex", "NumericIndex")
    },
    **{n: _BlockStub for n in ("Block", "FloatBlock", "IntBlock", "ObjectBlock", "NumericBlock", "NumpyBlock")},
}
_PANDAS_FUNCTIONS: dict[str, Any] = {"_new_Index": _new_index, "_unpickle_block": _unpickle_block}
_BUILTINS: dict[str, Any] = {"slice": slice, "object": object, "_reconstructor": _safe_reconstructor}


#: the globals a protocol-2 pickle of a plain ndarray names (Python 2's cPickle or Python 3's pickle)
_ARRAY_ONLY = ("_reconstruct", "ndarray", "dtype")


class _Callable:
    """An allow-listed function as the pickle sees it: callable, but a BUILD opcode aimed at it, which would set
    attributes of flowbench's own function (``__defaults__``) for the rest of the process, is refused."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(
            f"the pickle tries to change the allow-listed function {getattr(self._fn, '__name__', self._fn)!r}; the "
            "file is not the expected one and may be malicious: re-fetch the data with `flowbench download --force`"
        )


#: What a damaged pickle raises besides UnpicklingError: a corrupt length field asks for a huge allocation
#: (MemoryError), an index out of the memo (KeyError/IndexError), deep nesting (RecursionError).
_BROKEN = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    MemoryError,
    OverflowError,
    RecursionError,
)


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals (numpy arrays; pandas DataFrame parts if ``allow_pandas``).

    ``arrays_only``: nothing but what rebuilding a plain ndarray needs (no numpy scalars, no copyreg or
    builtins): the CIFAR-10 batches hold nothing else (dicts, lists, ints and strings need no globals).
    """

    def __init__(
        self, file: io.BufferedIOBase, *, allow_pandas: bool, encoding: str = "ASCII", arrays_only: bool = False
    ) -> None:
        super().__init__(file, encoding=encoding)
        self.allow_pandas = allow_pandas and not arrays_only
        self.arrays_only = arrays_only
        self._numpy = {k: v for k, v in _numpy_globals().items() if not arrays_only or k in _ARRAY_ONLY}

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed(module, name)
        return _Callable(found) if isinstance(found, types.FunctionType) else found

    def _allowed(self, module: str, name: str) -> Any:
        # Python 2 names (copy_reg, __builtin__) are mapped the way pickle's fix_imports would.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        top = module.split(".")[0]
        if top == "numpy" and name in self._numpy:
            return self._numpy[name]
        if top in ("builtins", "copyreg") and name in _BUILTINS and not self.arrays_only:
            return _BUILTINS[name]
        if module == "_codecs" and name == "encode":
            return _codecs_encode
        if top == "pandas" and self.allow_pandas:
            if name in _PANDAS_CLASSES:
                return _PANDAS_CLASSES[name]
            if name in _PANDAS_FUNCTIONS:
                return _PANDAS_FUNCTIONS[name]
        raise UnsafePickleError(
            f"the pickle references the global {module}.{name}, which flowbench's restricted unpickler does not "
            "allow (it rebuilds only numpy arrays"
            + (" and pandas DataFrame columns" if self.allow_pandas else "")
            + (" and plain dicts, lists, ints and strings" if self.arrays_only else "")
            + "). The file is not the expected one and may be malicious: do not open it with plain pickle; "
            "re-fetch the data with `flowbench download --force`"
        )


def _load(data: bytes, allow_pandas: bool, arrays_only: bool = False) -> Any:
    """Default encoding first; Python 2 pickles of numpy arrays need ``latin1``."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), allow_pandas=allow_pandas, arrays_only=arrays_only).load()
    except UnicodeDecodeError:
        return RestrictedUnpickler(
            io.BytesIO(data), allow_pandas=allow_pandas, encoding="latin1", arrays_only=arrays_only
        ).load()


@contextlib.contextmanager
def _named(source: str | None) -> Iterator[None]:
    """Prefix the message of any DataIntegrityError (UnsafePickleError included) with the file it came from."""
    try:
        yield
    except DataIntegrityError as e:
        if source is None:
            raise
        raise type(e)(f"{source}: {e}") from e


def load_numpy_pickle(data: bytes, source: str | None = None) -> Any:
    """Unpickle ``data`` allowing numpy arrays (and tuples, lists, dicts, scalars) only.

    ``source`` (the file's path) starts every error message, so a refusal names the file.
    """
    with _named(source):
        try:
            return _load(data, allow_pandas=False)
        except _BROKEN as e:
            raise DataIntegrityError(f"not a readable pickle of numpy arrays ({type(e).__name__}: {e})") from e


#: the keys of a CIFAR-10 batch (https://www.cs.toronto.edu/~kriz/cifar.html, python version)
CIFAR_KEYS = ("batch_label", "labels", "data", "filenames")


def load_cifar_batch(data: bytes, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (uint8 ``data`` (N, D), int64 ``labels`` (N,)) of one pickled CIFAR-10 batch.

    Accepted, and nothing else: a dict whose keys are among :data:`CIFAR_KEYS` as str or bytes (Python 2
    strings load as str, or as bytes where a Python 3 pickle wrote bytes), ``data`` a 2-D uint8 ndarray,
    ``labels`` a list of ints (one per row), ``filenames`` a list of str/bytes, ``batch_label`` a str/bytes.
    MAF reads these files with ``pickle.load(f, encoding='latin1')`` (``datasets/cifar10.py``).
    ``source`` (the file's path) starts every error message.
    """
    with _named(source):
        try:
            obj = _load(data, allow_pandas=False, arrays_only=True)
        except _BROKEN as e:
            raise DataIntegrityError(f"not a readable CIFAR-10 batch pickle ({type(e).__name__}: {e})") from e
        if not isinstance(obj, dict):
            raise DataIntegrityError(f"the pickle holds a {type(obj).__name__}, expected the dict of a CIFAR-10 batch")
        d: dict[str, Any] = {}
        for k, v in obj.items():
            key = k.decode("latin1") if isinstance(k, bytes) else k
            if not isinstance(key, str) or key not in CIFAR_KEYS or key in d:
                raise DataIntegrityError(f"unexpected key {k!r} in a CIFAR-10 batch (expected {', '.join(CIFAR_KEYS)})")
            d[key] = v
        x, labels = d.get("data"), d.get("labels")
        if not (isinstance(x, np.ndarray) and type(x) is np.ndarray and x.dtype == np.uint8 and x.ndim == 2):
            what = f"{x.dtype} {list(x.shape)} array" if isinstance(x, np.ndarray) else type(x).__name__
            raise DataIntegrityError(f"a CIFAR-10 batch's 'data' must be a 2-D uint8 array; got {what}")
        # bool is an int subclass, and not a class label
        if not (isinstance(labels, list) and all(type(v) is int and 0 <= v < 2**63 for v in labels)):
            raise DataIntegrityError("a CIFAR-10 batch's 'labels' must be a list of ints (class labels, ≥ 0)")
        if len(labels) != x.shape[0]:
            raise DataIntegrityError(f"a CIFAR-10 batch has {x.shape[0]} images and {len(labels)} labels")
        names = d.get("filenames", [])
        if not (isinstance(names, list) and all(isinstance(v, (str, bytes)) for v in names)):
            raise DataIntegrityError("a CIFAR-10 batch's 'filenames' must be a list of strings")
        if not isinstance(d.get("batch_label", ""), (str, bytes)):
            raise DataIntegrityError("a CIFAR-10 batch's 'batch_label' must be a string")
        return x, np.asarray(labels, dtype=np.int64)


@dataclass
class Frame:
    """The numeric content of a pickled DataFrame: column labels and a (rows, columns) float64 array."""

    columns: list[str]
    values: np.ndarray


def _labels(index: Any) -> list:
    if isinstance(index, _IndexValue):
        return [x.decode("latin1") if isinstance(x, bytes) else x for x in index.values.tolist()]
    raise DataIntegrityError(f"unexpected DataFrame axis object {type(index).__name__}")


def _positions(locs: Any, n: int) -> np.ndarray:
    if isinstance(locs, slice):
        return np.arange(n)[locs]
    return np.asarray(locs, dtype=np.int64).reshape(-1)


def _frame_from_stub(obj: Any) -> Frame:
    if not isinstance(obj, _FrameStub):
        raise DataIntegrityError(f"the pickle holds a {type(obj).__name__}, expected a pandas DataFrame")
    st = obj.state
    mgr = st.get("_mgr", st.get("_data")) if isinstance(st, dict) else st
    if not isinstance(mgr, _ManagerStub):
        raise DataIntegrityError("unsupported pandas DataFrame pickle layout (no BlockManager)")
    blocks: list[tuple[Any, np.ndarray]] = []
    if isinstance(mgr.state, tuple) and len(mgr.state) >= 3:  # __getstate__ layouts (pandas 0.x)
        axes_array, block_values, block_items = mgr.state[:3]
        extra = mgr.state[3] if len(mgr.state) > 3 else None
        if isinstance(extra, dict) and "0.14.1" in extra:  # pandas ≥ 0.14.1: values + positional mgr_locs
            axes_array = extra["0.14.1"]["axes"]
            columns = _labels(axes_array[0])
            for b in extra["0.14.1"]["blocks"]:
                blocks.append((b["values"], _positions(b["mgr_locs"], len(columns))))
        else:  # pandas 0.13 layout: each block names its columns
            columns = _labels(axes_array[0])
            for vals, items in zip(block_values, block_items):
                blocks.append((vals, np.array([columns.index(c) for c in _labels(items)], dtype=np.int64)))
    elif len(mgr.args) >= 2:  # pandas ≥ 1.3: BlockManager(blocks, axes), blocks from _unpickle_block
        block_objs, axes_array = mgr.args[0], mgr.args[1]
        columns = _labels(axes_array[0])
        for b in block_objs:
            if not isinstance(b, _BlockStub) or not isinstance(b.state, dict):
                raise DataIntegrityError(f"unexpected DataFrame block object {type(b).__name__}")
            blocks.append((b.state["values"], _positions(b.state["mgr_locs"], len(columns))))
    else:
        raise DataIntegrityError("unsupported pandas DataFrame pickle layout (BlockManager without state)")
    n_rows = None
    for vals, _ in blocks:
        if isinstance(vals, _BlockStub):
            vals = vals.state["values"]
        if isinstance(vals, np.ndarray) and vals.ndim == 2:
            n_rows = vals.shape[1]
            break
    if n_rows is None:
        n_rows = len(_labels(axes_array[1])) if len(axes_array) > 1 else 0
    out = np.empty((n_rows, len(columns)), dtype=np.float64)
    filled = np.zeros(len(columns), dtype=bool)
    for vals, pos in blocks:
        if isinstance(vals, _BlockStub):
            vals = vals.state["values"]
        vals = np.asarray(vals)
        if vals.ndim == 1:
            vals = vals[None, :]
        if vals.dtype.kind not in "fiub" or vals.shape != (len(pos), n_rows):
            raise DataIntegrityError(
                f"DataFrame block for columns {[columns[i] for i in pos]} has dtype {vals.dtype} and shape "
                f"{vals.shape}; expected numeric ({len(pos)}, {n_rows})"
            )
        out[:, pos] = vals.T
        filled[pos] = True
    if not filled.all():
        raise DataIntegrityError(
            f"DataFrame pickle lacks data for columns {[c for c, f in zip(columns, filled) if not f]}"
        )
    return Frame([str(c) for c in columns], out)


def load_dataframe_pickle(data: bytes, source: str | None = None) -> Frame:
    """Rebuild the numeric columns of a pickled pandas DataFrame (pandas 0.x–1.x layouts) without pandas.

    ``source`` (the file's path) starts every error message, so a refusal names the file.
    """
    with _named(source):
        try:
            obj = _load(data, allow_pandas=True)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
            raise DataIntegrityError(f"not a readable DataFrame pickle ({type(e).__name__}: {e})") from e
        try:
            return _frame_from_stub(obj)
        except (TypeError, KeyError, IndexError, AttributeError) as e:
            raise DataIntegrityError(f"unsupported pandas DataFrame pickle layout ({type(e).__name__}: {e})") from e
