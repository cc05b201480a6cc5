"""The tutorial (docs/your-own-flow.md) stays true: its flow passes the check kit, its sweep file expands to
the runs it describes, and the line count the README quotes is the file's."""

from __future__ import annotations

import sys
from pathlib import Path

from flowbench import testing
from flowbench.sweep import load_sweep

FOLDER = Path(__file__).resolve().parents[1] / "docs" / "tutorial" / "myflows"


def test_the_tutorial_flow_passes_the_check_kit_as_the_tutorial_shows():
    report = testing.check_model(f"{FOLDER / 'flow.py'}:SPEC")
    assert report.ok, report.table()
    assert report["log-det"].status == "pass" and report["stacking"].status == "pass"
    # The output the tutorial shows: the same checks in the same order with the same results (the cuda row is
    # the machine's), and the summary line.
    doc = (FOLDER.parents[1] / "your-own-flow.md").read_text()
    block = doc.split("flowbench check-model flow.py:SPEC\n```\n\n```text\n")[1].split("```")[0]
    names = {r.name for r in report.results}
    shown = [ln.split()[:2] for ln in block.splitlines() if ln.split() and ln.split()[0] in names]
    ran = [[r.name, r.status] for r in report.results]
    assert [r for r in shown if r[0] != "cuda"] == [r for r in ran if r[0] != "cuda"]
    if report["cuda"].status == "skip":  # the tutorial's machine had no GPU
        line = report.summary()
        assert line in block and doc.count(line) == 2  # and the zuko section's count, the same kit


def test_the_tutorial_sweep_and_its_numbers():
    sweep = load_sweep(FOLDER / "sweep.toml")
    runs = {(r.model, r.tag) for r in sweep.runs}
    assert (
        runs
        == {
            ("my-coupling", "layers=4,max-epochs=30"),
            ("my-coupling", "layers=8,max-epochs=30"),
            ("maf", "max-epochs=30"),
        }
        and len(sweep.runs) == 9
    )
    assert sweep.refs == {"my-coupling": f"{FOLDER / 'flow.py'}:SPEC"}
    lines = len((FOLDER / "flow.py").read_text().splitlines())
    readme = (FOLDER.parents[2] / "README.md").read_text()
    doc = (FOLDER.parents[1] / "your-own-flow.md").read_text()
    assert f"takes a {lines}-line flow" in readme and f"a {lines}-line flow" in doc and f"in {lines} lines" in doc


def test_the_tutorial_package_declares_its_flow_as_a_plugin(monkeypatch):
    # docs/tutorial is an installable package (`pip install ./docs/tutorial`, section 9): its entry point must
    # name the package it ships and a spec whose name is the entry point's, or flowbench refuses the plugin.
    import importlib

    from flowbench.config import tomllib

    meta = tomllib.loads((FOLDER.parent / "pyproject.toml").read_text())
    ((name, target),) = meta["project"]["entry-points"]["flowbench.models"].items()
    module, attr = target.split(":")
    assert meta["tool"]["setuptools"]["packages"] == [module.split(".")[0]] == [FOLDER.name]
    assert (FOLDER / "__init__.py").is_file()
    monkeypatch.syspath_prepend(str(FOLDER.parent))
    try:
        spec = getattr(importlib.import_module(module), attr)
    finally:  # the file-reference tests load flow.py under its own name
        for m in [m for m in sys.modules if m == FOLDER.name or m.startswith(FOLDER.name + ".")]:
            del sys.modules[m]
    assert spec.name == name == "my-coupling"
    doc = (FOLDER.parents[1] / "your-own-flow.md").read_text()
    assert f'{name} = "{target}"' in doc and "pip install ./docs/tutorial" in doc
