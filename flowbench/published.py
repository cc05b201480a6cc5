"""Published test log-likelihoods (nats, ± 2 SE over test points) that ``flowbench table`` shows beside ours.

Transcribed from the primary sources (the same tables, with their caveats, are in the documentation's
``docs/sources/published-results.md``):

- ``maf``: Papamakarios, Pavlakou, Murray, "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017
  (arXiv 1705.07057v4), Tables 1 and 2. MNIST and CIFAR-10 are in logit space.
- ``relgrad``: Gresele et al., "Relative gradient optimization of the Jacobian term in unsupervised deep
  learning", NeurIPS 2020 (arXiv 2006.15090): the "Ours" row of Table 1 as printed in the authors'
  repository README (github.com/fissoreg/relative-gradient-jacobian, commit d2e03ca, "Results").
- ``beyond``: later records on the tabular sets: NAF (Huang et al., ICML 2018, arXiv 1804.00779), TAN (Oliva
  et al., ICML 2018, arXiv 1801.09819), FFJORD (Grathwohl et al., ICLR 2019, arXiv 1810.01367), RQ-NSF
  (Durkan et al., NeurIPS 2019, arXiv 1906.04032, Table 1). Their error bars are partly spreads over runs,
  not ± 2 SE.

A trailing ``?`` in the tables below marks a number from a single secondary source (unverified).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COND_NOTE", "PublishedResult", "SOURCES", "PUBLISHED", "published", "UNVERIFIED_NOTE"]

UNVERIFIED_NOTE = "unverified: from a single secondary source"
#: What a class-conditional column reports (MAF's experiments.py, evaluate_logprob; the paper's v4 erratum).
COND_NOTE = (
    "class-conditional model p(x | y); the number is log p(x) = logsumexp_y log p(x | y) − log 10 over the "
    "ten labels (uniform label prior), ± 2 SE over test points, as MAF's code computes it (arXiv v4 erratum: "
    "earlier versions misreported these columns)"
)


@dataclass(frozen=True)
class PublishedResult:
    """One published cell: ``mean ± se2`` printed with ``decimals`` decimals, as in the source."""

    source: str  # key in SOURCES
    model: str  # row label, equal to flowbench.models.display_name for our models
    dataset: str  # flowbench dataset name
    mean: float
    se2: float
    decimals: int
    unverified: bool = False
    note: str | None = None


#: Source key → (short label for the table, full citation).
SOURCES: dict[str, tuple[str, str]] = {
    "maf": ("MAF paper", "Papamakarios, Pavlakou, Murray (NeurIPS 2017), arXiv 1705.07057v4, Tables 1-2"),
    "relgrad": ("relgrad paper", "Gresele et al. (NeurIPS 2020), arXiv 2006.15090, authors' README"),
    "beyond": (
        "later work",
        "NAF (Huang et al. 2018), TAN (Oliva et al. 2018), FFJORD (Grathwohl et al. 2019), RQ-NSF (Durkan et al. 2019)",
    ),
}

_MAF_TABULAR = """
model          | power        | gas          | hepmass       | miniboone     | bsds300
Gaussian       | -7.74 ± 0.02 | -3.58 ± 0.75 | -27.93 ± 0.02 | -37.24 ± 1.07 | 96.67 ± 0.25?
MADE           | -3.08 ± 0.03 | 3.56 ± 0.04  | -20.98 ± 0.02 | -15.59 ± 0.50 | 148.85 ± 0.28
MADE MoG       | 0.40 ± 0.01  | 8.47 ± 0.02  | -15.15 ± 0.02 | -12.27 ± 0.47 | 153.71 ± 0.28
Real NVP (5)   | -0.02 ± 0.01 | 4.78 ± 1.80  | -19.62 ± 0.02 | -13.55 ± 0.49 | 152.97 ± 0.28
Real NVP (10)  | 0.17 ± 0.01  | 8.33 ± 0.14  | -18.71 ± 0.02 | -13.84 ± 0.52 | 153.28 ± 1.78
MAF (5)        | 0.14 ± 0.01  | 9.07 ± 0.02  | -17.70 ± 0.02 | -11.75 ± 0.44 | 155.69 ± 0.28
MAF (10)       | 0.24 ± 0.01  | 10.08 ± 0.02 | -17.73 ± 0.02 | -12.24 ± 0.45 | 154.93 ± 0.28
MAF MoG (5)    | 0.30 ± 0.01  | 9.59 ± 0.02  | -17.39 ± 0.02 | -11.68 ± 0.44 | 156.36 ± 0.28
"""

# Logit space (MAF paper, Table 2). The conditional columns (``<dataset>-cond``) report log p(x) of a model of
# p(x | y): logsumexp_y log p(x | y) − log 10 over the ten labels (MAF's experiments.evaluate_logprob); the paper's
# v4 erratum says earlier versions computed them wrongly. They come from a single secondary source: "?".
_MAF_IMAGES = """
model          | mnist           | mnist-cond       | cifar10    | cifar10-cond
Gaussian       | -1366.9 ± 1.4   | -1344.7 ± 1.8?   | 2367 ± 29  | 2030 ± 41?
MADE           | -1380.8 ± 4.8   | -1361.9 ± 1.9?   | 147 ± 20   | 187 ± 20?
MADE MoG       | -1038.5 ± 1.8   | -1030.3 ± 1.7?   | -397 ± 21  | -119 ± 20?
Real NVP (5)   | -1323.2 ± 6.6   | -1326.3 ± 5.8?   | 2576 ± 27  | 2642 ± 26?
Real NVP (10)  | -1370.7 ± 10.1  | -1371.3 ± 43.9?  | 2568 ± 26  | 2475 ± 25?
MAF (5)        | -1300.5 ± 1.7   | -1302.9 ± 1.7?   | 2936 ± 27  | 2983 ± 26?
MAF (10)       | -1313.1 ± 2.0   | -1316.8 ± 1.8?   | 3049 ± 26  | 3058 ± 26?
MAF MoG (5)    | -1100.3 ± 1.6   | -1092.3 ± 1.7?   | 2911 ± 26  | 2936 ± 26?
"""

_RELGRAD = """
model              | power         | gas           | hepmass          | miniboone        | bsds300        | mnist
Relgrad dense flow | 0.065 ± 0.013 | 6.978 ± 0.020 | -21.958 ± 0.019 | -13.372 ± 0.450 | 151.12 ± 0.28 | -1375.2 ± 1.4
"""

_BEYOND = """
model                   | power       | gas          | hepmass       | miniboone     | bsds300
NAF DDSF (5)            | 0.62 ± 0.01 | 11.91 ± 0.13 | -15.09 ± 0.40 | -8.86 ± 0.15  | 157.73 ± 0.04
TAN                     | 0.60 ± 0.01 | 12.06 ± 0.02 | -13.78 ± 0.02 | -11.01 ± 0.48 | 159.80 ± 0.07
FFJORD                  | 0.46 ± 0.01 | 8.59 ± 0.12  | -14.92 ± 0.08 | -10.43 ± 0.04 | 157.40 ± 0.19
RQ-NSF (C)              | 0.64 ± 0.01? | 13.09 ± 0.02? | -14.75 ± 0.03? | -9.67 ± 0.47? | 157.54 ± 0.28?
RQ-NSF (AR)             | 0.66 ± 0.01? | 13.09 ± 0.02? | -14.01 ± 0.03? | -9.22 ± 0.48? | 157.31 ± 0.28?
"""

_NOTES = {
    ("relgrad", "mnist"): "not on MAF's MNIST data (pixels /255, unseeded noise, other validation split)",
    ("beyond", None): "NAF/FFJORD error bars are spreads over runs, not ± 2 SE",
    ("maf", "mnist-cond"): COND_NOTE,
    ("maf", "cifar10-cond"): COND_NOTE,
}


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _parse(source: str, table: str) -> list[PublishedResult]:
    lines = [ln for ln in table.strip().splitlines() if ln.strip()]
    header = [c.strip() for c in lines[0].split("|")]
    out = []
    for line in lines[1:]:
        cells = [c.strip() for c in line.split("|")]
        model = cells[0]
        for dataset, cell in zip(header[1:], cells[1:]):
            unverified = cell.endswith("?")
            mean_s, se_s = (s.strip() for s in cell.rstrip("?").split("±"))
            note = _NOTES.get((source, dataset)) or _NOTES.get((source, None))
            out.append(
                PublishedResult(source, model, dataset, float(mean_s), float(se_s), _decimals(mean_s), unverified, note)
            )
    return out


#: Every published cell.
PUBLISHED: tuple[PublishedResult, ...] = tuple(
    _parse("maf", _MAF_TABULAR) + _parse("maf", _MAF_IMAGES) + _parse("relgrad", _RELGRAD) + _parse("beyond", _BEYOND)
)


def published(sources: list[str] | tuple[str, ...]) -> list[PublishedResult]:
    """The cells of the given sources (keys of :data:`SOURCES`), in source order."""
    from flowbench.errors import ConfigError

    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ConfigError(f"unknown published source(s) {unknown}; choose from {', '.join(SOURCES)} or 'none'")
    return [r for s in sources for r in PUBLISHED if r.source == s]
