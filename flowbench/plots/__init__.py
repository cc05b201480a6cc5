"""Figures and reports from run records: training curves, samples, and a one-page report.

- :mod:`flowbench.plots.curves`: validation LL and training loss against epoch (``flowbench plot curves``);
- :mod:`flowbench.plots.samples`: samples of a recorded model beside test data (``flowbench plot samples``);
- :mod:`flowbench.plots.report`: table, curves, samples and run status on one page (``flowbench report``);

Records are read only through :mod:`flowbench.plots._records`; how a run ended is :mod:`flowbench.status`'s.
Importing this package does not import
matplotlib or torch; the submodules do.
"""
