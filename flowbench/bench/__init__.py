"""Speed benchmarks (`flowbench bench`): the relative-gradient cost curve (Gresele et al. 2020, Fig. 1 and
appendix H.1), relative vs ordinary optimisation, and training throughput.

- :mod:`flowbench.bench.gradients` — time and memory of one exact-NLL gradient: relative / ordinary /
  autodiff, plus a plain-MLP floor.
- :mod:`flowbench.bench.optim` — full-batch gradient descent, relative vs ordinary, shared initialisations.
- :mod:`flowbench.bench.train` — training samples/s and time per epoch for one model and dataset shape.
"""
