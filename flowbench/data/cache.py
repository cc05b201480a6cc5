"""The processed cache: one float32 ``.npy`` per split plus ``manifest.json``, under ``ROOT/processed/NAME/``.

A labelled dataset also has one int64 ``.npy`` of class labels per split (``train_labels.npy`` …); the
manifest records its number of ``classes`` (0 or absent: unlabelled), and every check below covers the label
files exactly like the splits (plus: labels in 0..classes-1 where the splits are checked finite).

Nothing on disk is trusted blindly. The manifest is written last (atomically), so its presence means the
``.npy`` files beside it were complete. It records the recipe version, the SHA-256, size and mtime of each
raw source file (a cache whose recipe or raw files changed is *stale* and rebuilt), and for each split its
shape, dtype, byte size and SHA-256, hashed while the file was written.

:func:`check` runs on every load and for ``flowbench datasets``. It always checks what is cheap: each split
file exists, has the recorded byte size, and its ``.npy`` header the recorded shape and dtype. The content
hash (and that every value is finite) is checked whenever a split file is not the one this cache last saw,
i.e. its stat stamp (size, mtime, ctime, inode) differs from the stamp recorded in ``verified.json`` when it
was written or last verified; a successful check records the new stamp. Rewriting a file's bytes in place
changes its stamp (ctime cannot be set back), so same-size corruption is caught, while a load stays O(1)
and lazy. Hashing is cheap anyway (SHA-256 of POWER's 40 MB train split: 0.03–0.07 s on the shared 2-core
machine), so a read-only data root, where no stamp can be recorded, simply verifies on every load.

A cache that fails a check is *broken*; the loader rebuilds it from the raw files (see
:func:`flowbench.data.load_dataset`). Loads are memory-mapped copy-on-write (``mmap_mode="c"``): writable
arrays (torch warns on read-only ones) whose changes never reach the disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from flowbench import __version__
from flowbench.data._common import LABELS, SPLITS, Splits
from flowbench.utils import atomic_write, atomic_write_json

MANIFEST = "manifest.json"
VERIFIED = "verified.json"
FORMAT = 2  # 2: per-split byte size and SHA-256 in the manifest; older caches are stale


def cache_dir(root: Path, name: str) -> Path:
    return Path(root) / "processed" / name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (``np.save`` writes header, then data)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def _save(path: Path, a: np.ndarray) -> dict[str, Any]:
    with atomic_write(path, "wb") as f:
        w = _HashingWriter(f)
        np.save(w, a, allow_pickle=False)
    return {"bytes": w.size, "sha256": w.sha.hexdigest()}


def _keys(classes: int) -> tuple[tuple[str, np.dtype], ...]:
    """(array name, dtype) of the files a cache holds: the splits, then the labels of a labelled dataset."""
    return tuple((k, np.dtype(np.float32)) for k in SPLITS) + (
        tuple((k, np.dtype(np.int64)) for k in LABELS) if classes else ()
    )


def write(
    root: Path, name: str, splits: Splits, recipe_version: int, sources: dict[str, dict], classes: int = 0
) -> dict:
    """Write the splits (and, with ``classes``, the label arrays in ``splits``), then the manifest, then their
    stamps; returns the manifest."""
    d = cache_dir(root, name)
    # invalidate first: a crash mid-write must not leave an old manifest beside new arrays
    for meta in (MANIFEST, VERIFIED):
        (d / meta).unlink(missing_ok=True)
    if not classes:  # labels of an earlier, labelled recipe would only confuse a reader of the folder
        for k in LABELS:
            (d / f"{k}.npy").unlink(missing_ok=True)
    files, stamps = {}, {}
    for k, dtype in _keys(classes):
        path = d / f"{k}.npy"
        if path.is_dir():  # something in the way: os.replace cannot put a file over a folder
            shutil.rmtree(path)
        files[path.name] = _save(path, np.ascontiguousarray(splits[k], dtype=dtype))
        stamps[path.name] = {"sha256": files[path.name]["sha256"], "stamp": _stamp(path.stat())}
    manifest = {
        "format": FORMAT,
        "dataset": name,
        "recipe_version": recipe_version,
        "flowbench_version": __version__,
        "dtype": "float32",
        "classes": classes,
        "shapes": {k: list(splits[k].shape) for k, _ in _keys(classes)},
        "files": files,
        "sources": sources,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(d / MANIFEST, manifest)
    atomic_write_json(d / VERIFIED, stamps)  # we just wrote and checked these bytes: trusted until they change
    return manifest


def read_manifest(root: Path, name: str) -> dict | None:
    """The manifest, or None when it is absent or unreadable (:func:`check` tells which)."""
    try:
        m = json.loads((cache_dir(root, name) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


@dataclass
class CacheState:
    """What :func:`check` found.

    ``kind``: ``absent`` (no manifest), ``stale`` (other recipe version, other number of classes, changed raw
    files or an older cache format: rebuilt silently), ``broken`` (fails a check: ``reason`` says which) or
    ``ok`` (``splits`` holds the memory-mapped arrays, the label arrays of a labelled dataset included).
    """

    kind: str
    reason: str = ""
    manifest: dict | None = None
    splits: Splits = field(default_factory=dict)


class _Broken(Exception):
    pass


def check(root: Path, name: str, recipe_version: int, classes: int | None = None) -> CacheState:
    """Check the cache of ``name`` under ``root`` (see the module docstring) and memory-map it if it is ok.

    ``classes``: the spec's number of classes; a cache written for another number is stale (None: any).
    """
    d = cache_dir(root, name)
    mpath = d / MANIFEST
    if not mpath.exists():
        return CacheState("absent")
    try:
        m = json.loads(mpath.read_text())
        if not isinstance(m, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return CacheState("broken", f"{MANIFEST} is unreadable: {e}")
    if m.get("format") != FORMAT:
        return CacheState("stale", "written by an older flowbench", m)
    if m.get("recipe_version") != recipe_version:
        return CacheState("stale", f"recipe version {m.get('recipe_version')}, current {recipe_version}", m)
    if classes is not None and m.get("classes", 0) != classes:
        return CacheState("stale", f"written for {m.get('classes', 0)} classes, the spec declares {classes}", m)
    try:
        for rel, fp in m["sources"].items():
            raw = Path(root) / rel
            if raw.is_file():  # raw files may be deleted to save space; the cache then stands alone
                st = raw.stat()
                if st.st_size != fp["size"] or st.st_mtime_ns != fp["mtime_ns"]:
                    return CacheState("stale", f"{rel} changed since the cache was built", m)
        return CacheState("ok", "", m, _open_splits(d, m))
    except _Broken as e:
        return CacheState("broken", str(e), m)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # valid JSON, wrong layout
        return CacheState("broken", f"{MANIFEST} is malformed ({type(e).__name__}: {e})", m)


def is_valid(root: Path, name: str, recipe_version: int, classes: int | None = None) -> bool:
    return check(root, name, recipe_version, classes).kind == "ok"


def _open_splits(d: Path, m: dict) -> Splits:
    verified = _read_verified(d)
    classes = m.get("classes", 0)
    if not (isinstance(classes, int) and not isinstance(classes, bool) and classes >= 0):
        raise _Broken(f"{MANIFEST} records {classes!r} classes")
    out, newly = {}, {}
    for k, dtype in _keys(classes):
        if k in SPLITS and np.dtype(m["dtype"]) != dtype:
            raise _Broken(f"{MANIFEST} says the splits are {m['dtype']}, not {dtype}")
        path = d / f"{k}.npy"
        want, shape = m["files"][path.name], tuple(m["shapes"][k])
        try:
            st = path.stat()
        except FileNotFoundError:
            raise _Broken(f"{path.name} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise _Broken(f"{path.name} is not a regular file")
        if st.st_size != want["bytes"]:
            raise _Broken(f"{path.name} has {st.st_size:,} bytes, the manifest says {want['bytes']:,}")
        try:
            a = np.load(path, mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise _Broken(f"{path.name} is not a readable .npy file ({e})") from None
        if a.shape != shape or a.dtype != dtype:
            raise _Broken(f"{path.name} holds {a.dtype} {list(a.shape)}, the manifest says {dtype} {list(shape)}")
        stamp = _stamp(st)
        seen = verified.get(path.name)
        if not (isinstance(seen, dict) and seen.get("sha256") == want["sha256"] and seen.get("stamp") == stamp):
            if sha256_file(path) != want["sha256"]:
                raise _Broken(
                    f"{path.name} was modified: its SHA-256 differs from the one recorded when it was written"
                )
            # only if the manifest itself was rewritten: the writer checks finiteness and label ranges
            if k in SPLITS:
                row = _first_nonfinite_row(a)
                if row is not None:
                    raise _Broken(f"{path.name} holds NaN or inf values (first in row {row})")
            elif a.ndim != 1 or (a.size and (a.min() < 0 or a.max() >= classes)):
                raise _Broken(f"{path.name} holds labels outside 0..{classes - 1}")
            newly[path.name] = {"sha256": want["sha256"], "stamp": stamp}
        out[k] = a
    for split, k in zip(SPLITS, LABELS):
        if k in out and out[k].shape[0] != out[split].shape[0]:
            raise _Broken(f"{k}.npy has {out[k].shape[0]:,} labels for {out[split].shape[0]:,} {split} rows")
    if newly:
        try:
            atomic_write_json(d / VERIFIED, {**verified, **newly})
        except OSError:  # read-only data root: verify again next time
            pass
    return out


def _read_verified(d: Path) -> dict:
    try:
        v = json.loads((d / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


def _first_nonfinite_row(a: np.ndarray, block_bytes: int = 1 << 24) -> int | None:
    """Index of the first row of the 2-D ``a`` holding a NaN or inf; row blocks bound the mask's memory."""
    rows = max(1, block_bytes // max(1, a.itemsize * a.shape[1]))
    for i in range(0, a.shape[0], rows):
        finite = np.isfinite(a[i : i + rows])
        if not finite.all():  # the per-row reduction is slow on narrow rows: only where something is wrong
            return i + int(np.argmin(finite.all(axis=1)))
    return None


def remove(root: Path, name: str) -> None:
    shutil.rmtree(cache_dir(root, name), ignore_errors=True)
