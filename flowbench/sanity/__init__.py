"""Sanity tasks: the 1-D studies of the sources (JacNet, pseudo-invertible pairs), the 2-D toy densities and
a 1-D invertibility comparison. Each task module exposes ``run_*(..., out=DIR)`` returning a metrics dict and
writing JSON (+ PNG/Markdown) under ``out``; ``flowbench sanity`` is the command line for them.
"""
