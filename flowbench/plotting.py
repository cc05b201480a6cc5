"""Plotting helpers shared by ``flowbench bench`` and ``flowbench sanity``: a headless matplotlib, one look
for every figure, atomic PNG writes.

matplotlib is imported only inside these functions, so that importing a module that plots costs nothing
until a figure is drawn.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from flowbench.utils import atomic_write

#: rc settings every flowbench figure is drawn with: a light grid and small titles and legends (the titles
#: carry the run's details, so they are long).
STYLE: dict[str, Any] = {
    "axes.grid": True,
    "axes.grid.which": "both",
    "grid.alpha": 0.3,
    "axes.titlesize": 9,
    "legend.fontsize": 8,
    "legend.framealpha": 0.8,
}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed, safe in CI)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure(
    path: str | os.PathLike, nrows: int = 1, ncols: int = 1, *, dpi: int = 110, **subplots_kw: Any
) -> Iterator[tuple[Any, Any]]:
    """``with figure(path, 1, 2, figsize=...) as (fig, axes):`` draw, and the PNG is written on exit.

    Everything inside the block is drawn with :data:`STYLE` and the constrained layout. The PNG is written
    atomically (no half-written file after a kill) and only if the block did not raise; the figure is
    closed either way, so long runs never accumulate open figures.
    """
    plt = pyplot()
    subplots_kw.setdefault("layout", "constrained")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, **subplots_kw)
        try:
            yield fig, axes
            with atomic_write(Path(path), "wb") as f:
                fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
        finally:
            plt.close(fig)


def colormap(name: str, bad: str | None = None) -> Any:
    """A copy of colormap ``name`` whose masked (non-finite) values are drawn in colour ``bad``.

    ``Colormap.with_extremes`` returns a copy, so the registered colormap is left alone; ``set_bad`` on a
    colormap is deprecated (matplotlib ≥ 3.10 warns).
    """
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return cmap.with_extremes(bad=bad) if bad is not None else cmap.copy()
