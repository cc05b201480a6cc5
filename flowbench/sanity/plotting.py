"""Shared plotting helpers: a headless matplotlib and atomic PNG writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flowbench.utils import atomic_write


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend (no display needed, safe in CI)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG atomically and close it (figures are never left open in long sweeps)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats in compact scientific/fixed notation."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if (abs(v) >= 1e-3 or v == 0) else f"{v:.2e}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
