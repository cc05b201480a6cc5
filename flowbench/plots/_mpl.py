"""matplotlib set-up for flowbench's figures: a headless backend, one palette, atomic PNG writes."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from flowbench.utils import atomic_write

#: Colour-blind-safe qualitative palette (Okabe & Ito 2008; black before sky blue so that six models never
#: share a hue, yellow last: faint on white), then tab10 for the ninth model onwards.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#000000",
    "#56B4E9",
    "#F0E442",
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed; safe in CI and on clusters)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed (figures are never left open in long reports)."""
    buf = io.BytesIO()
    # No "Software" stamp: the same figure gives the same bytes whatever the matplotlib version.
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    path = Path(path)
    data = png_bytes(fig, dpi)
    with atomic_write(path, "wb") as f:
        f.write(data)
    return path
