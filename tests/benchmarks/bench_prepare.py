"""Benchmark (not a test): time the preparation of full-size synthetic raw files, then the cached load.

Generates raw files of the real sizes and formats in a temporary folder (POWER 2,049,280 × 8; GAS a
1,052,065 × 19 DataFrame pickle in the pandas 1.x layout, written without pandas; HEPMASS CSVs with 700,272
and 349,974 rows; MINIBOONE 36,488 × 43; BSDS300 1,000,000 / 50,000 / 250,000 × 63; MNIST 50k/10k/10k ×
784 in a gzipped pickle), then for each dataset times ``prepare_dataset`` (recipe + checksums + cache
write) and ``load_dataset`` (memory-mapped cache). Goal: all six < 5 min on 2 cores, a load < 1 s.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_prepare.py [--keep DIR] [--datasets power,gas]
"""

from __future__ import annotations

import argparse
import gzip
import pickle
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ALL = ["power", "gas", "hepmass", "miniboone", "bsds300", "mnist"]


def gen_power(root: Path, rng) -> None:
    n = 2_049_280
    d = np.column_stack(
        [
            rng.gamma(2, 0.5, n),
            rng.gamma(2, 0.1, n),
            240 + rng.randn(n),
            rng.gamma(2, 2, n),
            rng.randint(0, 40, (n, 3)).astype(float),
            np.tile(np.arange(1440.0), n // 1440 + 1)[:n],
        ]
    )
    (root / "power").mkdir(parents=True)
    np.save(root / "power" / "data.npy", d)


def _fake_pandas():
    """Classes and functions named like pandas 1.5's, so that ``pickle`` writes its DataFrame layout."""
    mods = {}
    for name in [
        "pandas",
        "pandas.core",
        "pandas.core.frame",
        "pandas.core.internals",
        "pandas.core.internals.managers",
        "pandas._libs",
        "pandas._libs.internals",
        "pandas.core.indexes",
        "pandas.core.indexes.base",
        "pandas.core.indexes.range",
    ]:
        mods[name] = sys.modules[name] = types.ModuleType(name)

    def reg(mod, obj):
        obj.__module__, obj.__qualname__ = mod, obj.__name__
        setattr(mods[mod], obj.__name__, obj)
        return obj

    def _unpickle_block(values, mgr_locs, ndim):  # noqa: ARG001
        raise NotImplementedError

    def _new_Index(cls, d):  # noqa: ARG001
        raise NotImplementedError

    reg("pandas._libs.internals", _unpickle_block)
    reg("pandas.core.indexes.base", _new_Index)

    class Index:
        pass

    class RangeIndex:
        pass

    class Block:
        def __init__(self, values, locs):
            self.values, self.locs = values, locs

        def __reduce__(self):
            return _unpickle_block, (self.values, self.locs, 2)

    class BlockManager:
        def __init__(self, blocks, axes):
            self.blocks, self.axes = blocks, axes

        def __reduce__(self):
            return BlockManager, (tuple(self.blocks), self.axes)

    class Axis:
        def __init__(self, cls, d):
            self.cls, self.d = cls, d

        def __reduce__(self):
            return _new_Index, (self.cls, self.d)

    class DataFrame:
        def __init__(self, mgr=None):
            self.mgr = mgr

        def __reduce__(self):
            return (
                DataFrame,
                (),
                {
                    "_mgr": self.mgr,
                    "_typ": "dataframe",
                    "_metadata": [],
                    "attrs": {},
                    "_flags": {"allows_duplicate_labels": True},
                },
            )

    reg("pandas.core.indexes.base", Index)
    reg("pandas.core.indexes.range", RangeIndex)
    reg("pandas.core.internals.managers", BlockManager)
    reg("pandas.core.frame", DataFrame)
    return DataFrame, BlockManager, Block, Axis, Index, RangeIndex


def gen_gas(root: Path, rng) -> None:
    n = 1_052_065
    DataFrame, BlockManager, Block, Axis, Index, RangeIndex = _fake_pandas()
    base = rng.randn(n, 8)
    twins = 1.5 * base + 0.05 * rng.randn(n, 8)  # corr > 0.98 with base: the loop drops 8 columns
    sensors = np.empty((n, 16))
    sensors[:, 0::2], sensors[:, 1::2] = base, twins
    cols = ["Time", "Meth", "Eth"] + [f"S{i}" for i in range(16)]
    values = np.vstack([np.linspace(0, 4e4, n)[None], rng.randint(0, 600, (2, n)).astype(float), sensors.T])
    mgr = BlockManager(
        [Block(values, np.arange(19))],
        [
            Axis(Index, {"data": np.array(cols, dtype=object), "name": None}),
            Axis(RangeIndex, {"start": 0, "stop": n, "step": 1, "name": None}),
        ],
    )
    (root / "gas").mkdir(parents=True)
    with open(root / "gas" / "ethylene_CO.pickle", "wb") as f:
        pickle.dump(DataFrame(mgr), f, protocol=4)


def gen_hepmass(root: Path, rng) -> None:
    (root / "hepmass").mkdir(parents=True)
    for name, n, extra in [("1000_train.csv", 700_272, False), ("1000_test.csv", 349_974, True)]:
        x = rng.randn(n, 27)
        x[:, [5, 9, 13, 17, 21, 25]] = rng.randint(0, 3, (n, 6))  # discrete features: dropped by the rule
        label = np.tile([1.0, 0.0], n // 2 + 1)[:n]
        cols = [label[:, None], x] + ([np.full((n, 1), 1000.0)] if extra else [])
        header = ["# label"] + [f"f{i}" for i in range(27)] + (["mass"] if extra else [])
        with open(root / "hepmass" / name, "w") as f:
            f.write(",".join(header) + "\n")
            np.savetxt(f, np.hstack(cols), fmt="%.6g", delimiter=",")


def gen_miniboone(root: Path, rng) -> None:
    (root / "miniboone").mkdir(parents=True)
    np.save(root / "miniboone" / "data.npy", rng.randn(36_488, 43))


def gen_bsds300(root: Path, rng) -> None:
    import h5py

    (root / "BSDS300").mkdir(parents=True)
    with h5py.File(root / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for key, n in [("train", 1_000_000), ("validation", 50_000), ("test", 250_000)]:
            f.create_dataset(key, data=rng.uniform(-0.5, 0.5, (n, 63)).astype(np.float32))


def gen_mnist(root: Path, rng) -> None:
    parts = [
        ((rng.randint(0, 256, (n, 784)) / 256).astype(np.float32), rng.randint(0, 10, n))
        for n in (50_000, 10_000, 10_000)
    ]
    (root / "mnist").mkdir(parents=True)
    with gzip.open(root / "mnist" / "mnist.pkl.gz", "wb", compresslevel=1) as f:
        pickle.dump(tuple(parts), f, protocol=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(ALL))
    ap.add_argument("--keep", type=Path, default=None, help="generate into (and keep) this folder")
    args = ap.parse_args()
    from flowbench.data import DATASETS, load_dataset, prepare_dataset

    names = args.datasets.split(",")
    root = args.keep or Path(tempfile.mkdtemp(prefix="flowbench-bench-"))
    rng = np.random.RandomState(0)
    rows = []
    try:
        for n in names:
            t0 = time.perf_counter()
            if not any((root / f).exists() for f in DATASETS[n].raw_files):  # --keep: reuse generated files
                globals()[f"gen_{n}"](root, rng)
            t_gen = time.perf_counter() - t0
            t0 = time.perf_counter()
            ds = prepare_dataset(n, root)
            t_prep = time.perf_counter() - t0
            del ds
            t0 = time.perf_counter()
            ds = load_dataset(n, root)
            _ = float(ds.train[-1].sum())  # touch the last row
            t_load = time.perf_counter() - t0
            rows.append((n, ds.dim, len(ds.train), len(ds.val), len(ds.test), t_gen, t_prep, t_load))
            print(
                f"{n:10s} D={ds.dim:4d} {len(ds.train):>9,d}/{len(ds.val):>7,d}/{len(ds.test):>7,d}  "
                f"generate {t_gen:6.1f} s  prepare {t_prep:6.1f} s  load {t_load:.3f} s",
                flush=True,
            )
        print(f"total prepare {sum(r[6] for r in rows):.1f} s, max load {max(r[7] for r in rows):.3f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
