"""Markdown tables of the sanity tasks' results (pseudo_inverse.md, invertibility.md)."""

from __future__ import annotations

from typing import Any


def _cell(v: Any) -> str:
    if isinstance(v, float):
        text = f"{v:.3g}" if (abs(v) >= 1e-3 or v == 0) else f"{v:.2e}"
    else:
        text = "—" if v is None else str(v)
    # An unescaped "|" (e.g. in "min |W_k|") would split the cell and shift the rest of the row.
    return text.replace("|", r"\|")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats in compact scientific/fixed notation, pipes escaped."""
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
