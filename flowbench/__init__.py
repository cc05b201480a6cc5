"""flowbench: density estimation with normalizing flows, benchmarked the way the papers did it.

Reproduces the protocols of Papamakarios et al. 2017 (MAF) and Gresele et al. 2020 (relative gradient).
"""

from __future__ import annotations

__version__ = "0.1.0"
