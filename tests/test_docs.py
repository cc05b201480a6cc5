"""The development page's map of the package stays true: every module and subpackage of flowbench has its line."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_development_layout_names_every_module_and_subpackage():
    page = (ROOT / "docs" / "manual" / "development.md").read_text()
    after = page.split("```text\nflowbench/\n", 1)[1]
    layout = after[: re.search(r"^\S", after, re.MULTILINE).start()]  # up to configs/, the next top-level entry
    named = set(re.findall(r"^  (\S+)", layout, re.MULTILINE))
    package = ROOT / "flowbench"
    modules = {p.name for p in package.glob("*.py") if not p.name.startswith("__")}
    subpackages = {p.name + "/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert modules | subpackages <= named, f"not in development.md's layout: {sorted((modules | subpackages) - named)}"
    gone = {n for n in named if n.endswith((".py", "/")) and not (package / n.rstrip("/")).exists()}
    assert not gone, f"in development.md's layout but not in flowbench/: {sorted(gone)}"
