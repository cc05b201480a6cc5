"""Sweeps: a grid of ``flowbench run`` options expanded into runs, executed locally or on Ray.

``load_sweep(path)`` parses and validates a sweep file (``configs/sweeps/*.toml``) into a :class:`Sweep`
whose ``runs`` are the expanded grid; ``run_sweep(sweep, out, executor=...)`` runs those without a record (or
with a non-finite one, which the run replaces) and returns a :class:`SweepReport`. Selection of the best
configuration by validation log-likelihood (as in Papamakarios et al. 2017 and Gresele et al. 2020, appendix
H.3) happens in ``flowbench table --select best-val``.
"""

from __future__ import annotations

from flowbench.sweep.runner import Progress, RunState, SweepReport, plan, run_sweep, summary
from flowbench.sweep.spec import Sweep, SweepRun, expand, load_sweep, make_tag, parse_sweep

__all__ = [
    "Sweep",
    "SweepRun",
    "SweepReport",
    "RunState",
    "Progress",
    "load_sweep",
    "parse_sweep",
    "expand",
    "make_tag",
    "plan",
    "run_sweep",
    "summary",
]
