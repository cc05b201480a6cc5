"""The processed cache: one float32 ``.npy`` per split plus ``manifest.json``, under ``ROOT/processed/NAME/``.

The manifest is written last (atomically), so its presence means the ``.npy`` files beside it are complete.
It records the shapes, the recipe version and the SHA-256, size and mtime of each raw source file; a cache
whose recipe version or raw files changed is rebuilt. Loads are memory-mapped copy-on-write (``mmap_mode="c"``):
instant, and writable arrays (torch warns on read-only ones) whose changes never reach the disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from flowbench import __version__
from flowbench.data._common import SPLITS, Splits
from flowbench.errors import DataIntegrityError
from flowbench.utils import atomic_save_npy, atomic_write_json

MANIFEST = "manifest.json"


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


def write(root: Path, name: str, splits: Splits, recipe_version: int, sources: dict[str, dict]) -> dict:
    """Write the splits and then the manifest; returns the manifest (as :func:`read_manifest` would)."""
    d = cache_dir(root, name)
    manifest_path = d / MANIFEST
    # invalidate first: a crash mid-write must not leave an old manifest beside new arrays
    manifest_path.unlink(missing_ok=True)
    for k in SPLITS:
        atomic_save_npy(d / f"{k}.npy", np.ascontiguousarray(splits[k], dtype=np.float32))
    manifest = {
        "dataset": name,
        "recipe_version": recipe_version,
        "flowbench_version": __version__,
        "dtype": "float32",
        "shapes": {k: list(splits[k].shape) for k in SPLITS},
        "sources": sources,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(manifest_path, manifest)
    return manifest


def read_manifest(root: Path, name: str) -> dict | None:
    p = cache_dir(root, name) / MANIFEST
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_valid(root: Path, name: str, recipe_version: int, manifest: dict | None = None) -> bool:
    """Manifest present, same recipe, arrays present; raw files (if still there) unchanged in size and mtime."""
    m = manifest if manifest is not None else read_manifest(root, name)
    if not m or m.get("recipe_version") != recipe_version:
        return False
    d = cache_dir(root, name)
    if not all((d / f"{k}.npy").is_file() for k in SPLITS):
        return False
    for rel, fp in m.get("sources", {}).items():
        raw = Path(root) / rel
        if raw.is_file():  # raw files may be deleted to save space; the cache then stands alone
            st = raw.stat()
            if st.st_size != fp.get("size") or st.st_mtime_ns != fp.get("mtime_ns"):
                return False
    return True


def load(root: Path, name: str, manifest: dict) -> Splits:
    """Memory-map the splits and check them against the manifest's shapes."""
    d = cache_dir(root, name)
    out = {}
    for k in SPLITS:
        a = np.load(d / f"{k}.npy", mmap_mode="c", allow_pickle=False)
        if list(a.shape) != manifest["shapes"][k] or a.dtype != np.float32:
            raise DataIntegrityError(
                f"{name}: cached {k}.npy in {d} is {a.dtype} {list(a.shape)}, manifest says float32 "
                f"{manifest['shapes'][k]}; "
                f"delete {d} (or run `flowbench download --dataset {name} --force`)"
            )
        out[k] = a
    return out


def remove(root: Path, name: str) -> None:
    shutil.rmtree(cache_dir(root, name), ignore_errors=True)
