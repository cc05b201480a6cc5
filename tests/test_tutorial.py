"""The tutorial (docs/your-own-flow.md) stays true: its flow passes the check kit, its sweep file expands to
the runs it describes, and the line count the README quotes is the file's."""

from __future__ import annotations

from pathlib import Path

from flowbench import testing
from flowbench.sweep import load_sweep

FOLDER = Path(__file__).resolve().parents[1] / "docs" / "tutorial" / "myflows"


def test_the_tutorial_flow_passes_the_check_kit():
    report = testing.check_model(f"{FOLDER / 'flow.py'}:SPEC")
    assert report.ok, report.table()
    assert report["log-det"].status == "pass" and report["stacking"].status == "pass"


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
