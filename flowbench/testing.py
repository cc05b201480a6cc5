"""The contract checks of flowbench's models and datasets, as a kit you run on your own.

flowbench's own contract tests (``tests/test_models_contract.py``, ``tests/test_datasets_contract.py``) are
these checks run over every registered model and dataset; a researcher runs the same checks on a model or
dataset that lives outside the package, named as anywhere else in flowbench: a registered name, a reference
``package.module:ATTR`` or ``path/to/file.py:ATTR``, or the spec object itself.

* :func:`check_model` builds the model small (float64, size knobs shrunk, parameters perturbed so that
  densities are not trivial, fitted/prepared on correlated data) and runs the checks of
  :func:`model_check_names`: log-det against autograd, normalisation, inverse, gradients, batch
  independence, save/load, float32, seeded determinism, clear input errors, stacking, ...
* :func:`check_dataset` runs the checks of :func:`dataset_check_names` on a dataset's recipe and loader.

Both return a :class:`CheckReport`: one row per check with its status (pass, fail, skip, warn; only fail
makes ``report.ok`` false), the measured figure, the tolerance it was held to and a detail.
``flowbench check-model REF`` and ``flowbench check-dataset REF`` print the same report as a table.

A class-conditional model (``spec.conditional``) is built for :data:`KIT_CLASSES` classes and fed rows
``[x, onehot(y)]`` whose data depend on the label; the transform checks pass the one-hot as ``context``, and
normalisation and samples-match-density hold for every label (the worst label is reported).

Model checks and tolerances (``a + r·|ref|`` is per element, as ``torch.testing.assert_close``):

==========================  =========================================================================
build                       float64 build; log_prob of 5 rows: shape (5,), finite (else the rest skip)
log-det                     log|det| of ``transform`` vs slogdet of autograd's Jacobian, 4 rows: ``1e-9 + 1e-9·|ref|``
normalisation               D ≤ 2: grid (500² or 20,000 cells, ±16σ): ``|∫p − 1| ≤ 0.01``; D > 2: importance
                            sampling, 20,000 draws: ``|∫p − 1| ≤ 0.03 + 4 SE`` and SE ≤ 0.02
samples-match-density       20,000 samples: E tanh(u), E tanh(u²), E tanh(u₀u₁) within 0.03 (+ 4 SE) of
                            the density's
inverse                     round trip of x and of the log-det: ``1e-7 + 1e-7·|ref|`` (skip: no inverse)
sample                      sample(5): (5, D), float64, finite
gradients                   every parameter gets a finite, non-zero gradient (closed-form fits: none requires one)
batch-independence          a row alone = in a batch, eval mode: ``1e-10 + 1e-10·|ref|``
batchnorm-eval-stats        eval batch norm = whole-training-set statistics: ``1e-10 + 1e-10·|ref|`` (skip: none;
                            warn: torch's BatchNorm, whose running averages flowbench leaves alone)
save-load                   state_dict, deepcopy, pickle: ``1e-12 + 1e-12·|ref|`` (unpicklable: warn)
float32                     float32 build gives float32, finite log-probs
determinism                 two builds after seeding random, numpy and torch alike: bit-identical
bad-input                   wrong width, 1-D or NaN input raise InputError saying so; unknown hyperparameters refused
far-from-data               no NaN or +inf log-prob at radius 8 to 1e4, float64 and float32
label                       the display label renders, non-empty
conditional                 class-conditional models: class_log_probs = log_prob with each label, marginal =
                            logsumexp − log K, the label changes the density (skip: not conditional)
stacking                    R = 2 stacked = each run alone (log-probs, gradients, validation): ``1e-9 + 1e-9·|ref|``
                            (skip: closed form, declared unstackable, or vmap cannot evaluate it)
cuda                        CUDA log-probs = CPU's: ``1e-9 + 1e-9·|ref|`` (skip: no CUDA)
==========================  =========================================================================

Dataset checks: spec (attributes typed), raw-files (present), prepare (train/val/test 2-D arrays),
deterministic (two prepares bit-identical), width (one, = D or the fixture's), sizes (= the spec's; not for
fixtures), non-empty, finite, load (float32, bit-identical to the recipe, through the processed cache twice),
overlap (rows shared between splits: a warning).

In your own pytest file::

    import pytest
    from flowbench.testing import check_model, model_check_names, run_model_check

    @pytest.mark.parametrize("check", model_check_names())
    def test_my_flow(check):
        run_model_check("my_flows.py:SPEC", check)    # AssertionError on fail, pytest.skip on skip

or all at once: ``check_model("my_flows.py:SPEC").raise_for_failures()``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import numbers
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from flowbench.data import (
    DATASETS,
    DatasetSpec,
    ImageSpec,
    _fetch_hint,
    cache,
    check_root,
    get_info,
    load_dataset,
    status,
)
from flowbench.data._common import LABELS, SPLITS, to_float32
from flowbench.errors import ConfigError, FlowbenchError, InverseNotAvailable
from flowbench.models import MODELS, ModelSpec, get_spec
from flowbench.models.relgrad import RelgradFlow
from flowbench.models.stacking import split_buffers, stacked_objective, stacked_validation, stacks_natively
from flowbench.plugins import Origin
from flowbench.plugins import _describe as describe
from flowbench.utils import seed_everything

__all__ = [
    "PASS",
    "FAIL",
    "SKIP",
    "WARN",
    "CheckResult",
    "CheckReport",
    "check_model",
    "check_dataset",
    "model_check_names",
    "dataset_check_names",
    "run_model_check",
    "run_dataset_check",
    "describe_checks",
    "parse_hparam_items",
    "train_data",
]

PASS, FAIL, SKIP, WARN = "pass", "fail", "skip", "warn"

#: The importance-sampling estimate of ∫p (D > 2) must have at most this standard error: a noisier one could
#: not tell a missing constant of a few percent from 1, so it fails rather than passes.
MAX_SE = 0.02

#: The size knobs shrunk wherever a model has them with a larger default (and the caller did not set them):
#: small models, fast checks.
SHRINK = {"hidden": 8, "hidden_layers": 2, "components": 3, "layers": 2}

#: K, the number of classes a class-conditional model is checked with.
KIT_CLASSES = 3


# -- results ----------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    """One check's outcome.

    ``figure`` is what was measured (e.g. the largest deviation), ``tolerance`` the bound it was held to (both
    None where a check has no number); ``measured``/``bound`` say the same in words for the table.
    """

    name: str
    status: str
    figure: float | None = None
    tolerance: float | None = None
    detail: str = ""
    measured: str = ""
    bound: str = ""

    @property
    def ok(self) -> bool:
        return self.status != FAIL

    def as_row(self) -> tuple[str, str, float | None, float | None, str]:
        return (self.name, self.status, self.figure, self.tolerance, self.detail)


@dataclass(repr=False)
class CheckReport:
    """The checks run on one model or dataset (``subject``), in order; ``str()`` is the table."""

    subject: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed (skips and warnings are not failures)."""
        return all(r.ok for r in self.results)

    @property
    def rows(self) -> list[tuple[str, str, float | None, float | None, str]]:
        """``(name, status, figure, tolerance, detail)`` per check."""
        return [r.as_row() for r in self.results]

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == FAIL]

    def __getitem__(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no check {name!r} in this report; it has {', '.join(r.name for r in self.results)}")

    def __contains__(self, name: object) -> bool:
        return any(r.name == name for r in self.results)

    def summary(self) -> str:
        counts = {s: sum(r.status == s for r in self.results) for s in (PASS, FAIL, WARN, SKIP)}
        return ", ".join(
            f"{n} {word}"
            for word, n in zip(("passed", "failed", "warned", "skipped"), counts.values())
            if n or word in ("passed", "failed")
        )

    def table(self, width: int = 60) -> str:
        """A plain-text table: check, result, measured figure, tolerance, detail (wrapped at ``width``)."""
        from tabulate import tabulate

        rows = [
            [
                r.name,
                r.status.upper() if r.status == FAIL else r.status,
                r.measured or _fmt(r.figure),
                r.bound or (f"≤ {_fmt(r.tolerance)}" if r.tolerance is not None else ""),
                r.detail,
            ]
            for r in self.results
        ]
        return tabulate(
            rows,
            headers=["check", "result", "measured", "tolerance", "detail"],
            maxcolwidths=[None, None, None, None, width],
            disable_numparse=True,
        )

    def __str__(self) -> str:
        return f"{self.subject}\n{self.table()}\n{self.summary()}"

    def __repr__(self) -> str:
        return f"<CheckReport {self.subject}: {self.summary()}>"

    def raise_for_failures(self) -> None:
        """AssertionError listing every failed check (the pytest helper); nothing when all passed."""
        if self.failures:
            lines = [
                f"  {r.name}: {r.measured or _fmt(r.figure)} (tolerance {r.bound or _fmt(r.tolerance)}): {r.detail}"
                for r in self.failures
            ]
            raise AssertionError(f"{self.subject}: {len(lines)} check(s) failed\n" + "\n".join(lines))


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if isinstance(v, numbers.Integral):
        return str(v)
    return f"{v:.3g}"


class _Skip(Exception):
    """Raised inside a check: it does not apply (the message says why)."""


class _Fail(Exception):
    """Raised inside a check: it failed without a figure (the message says why)."""


def _result(
    name: str,
    ok: bool,
    figure: float | None,
    tolerance: float | None,
    detail: str = "",
    *,
    measured: str = "",
    bound: str = "",
) -> CheckResult:
    return CheckResult(name, PASS if ok else FAIL, figure, tolerance, detail, measured, bound)


def _deviation(got: Tensor, want: Tensor, rtol: float, atol: float) -> tuple[float, float, bool]:
    """(max |got − want|, the bound atol + rtol·|want| at the worst element, all within): assert_close's rule."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise _Fail(f"shape {tuple(got.shape)} where {tuple(want.shape)} was expected")
    if got.numel() == 0:
        return 0.0, atol, True
    both_inf = torch.isinf(got) & torch.isinf(want) & (torch.sign(got) == torch.sign(want))
    diff = torch.where(both_inf, torch.zeros_like(got), (got - want).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    # an infinite reference must not make its own bound infinite: only an equal infinity matches it
    bound = atol + rtol * torch.where(torch.isinf(want), torch.zeros_like(want), want.abs())
    worst = int(torch.argmax(diff - bound))
    return float(diff.max()), float(bound.flatten()[worst]), bool((diff <= bound).all())


def _describe(e: BaseException) -> str:

    return describe(e)


@contextlib.contextmanager
def _own_random_state() -> Iterator[None]:
    """The checks seed the global generators (as flowbench's trainer does); the caller's streams are left as
    they were."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _select(checks: Sequence[str] | str | None, known: Mapping[str, Any], what: str) -> list[str]:
    if checks is None:
        return list(known)
    if isinstance(checks, str):
        checks = [checks]
    unknown = [c for c in checks if c not in known]
    if unknown:
        raise ConfigError(f"unknown {what} check(s) {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    return [c for c in known if c in checks]  # the kit's order: cheap and basic first


def _run_checks(
    subject: str, names: list[str], table: Mapping[str, Callable[[Any], CheckResult]], case: Any
) -> CheckReport:
    report = CheckReport(subject)
    for name in names:
        try:
            res = table[name](case)
        except _Skip as e:
            res = CheckResult(name, SKIP, detail=str(e))
        except InverseNotAvailable as e:
            res = CheckResult(name, SKIP, detail=f"the model has no inverse ({e})")
        except _Fail as e:
            res = CheckResult(name, FAIL, detail=str(e))
        except Exception as e:  # a check of someone else's code: its exception is the finding, not a crash
            res = CheckResult(name, FAIL, detail=f"raised {_describe(e)}")
        res.name = name
        report.results.append(res)
    return report


# == models =================================================================================================
def train_data(dim: int, n: int = 400, dtype: torch.dtype = torch.float64) -> Tensor:
    """The checks' training data: correlated Gaussian rows, offset from the origin (fixed seed)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.5 + torch.eye(dim, dtype=torch.float64)
    return (torch.randn(n, dim, generator=g, dtype=torch.float64) @ a.T + 0.3).to(dtype)


def _model_spec(spec_or_key: Any) -> Any:
    """The ModelSpec: a name or reference is resolved as everywhere in flowbench."""

    if isinstance(spec_or_key, str):
        return get_spec(spec_or_key)
    if isinstance(spec_or_key, ModelSpec):
        return spec_or_key
    return MODELS.coerce(spec_or_key, repr(spec_or_key))  # a zuko/nflows flow, or a function returning a spec


def _hparams(spec: Any, given: Mapping[str, Any] | None, shrink: bool) -> dict[str, Any]:
    """The spec's resolved hyperparameters: ``given``, else the shrunk size knobs, else the defaults."""
    given = dict(given or {})
    out = spec.resolve(given)  # ConfigError for an unknown or bad one
    if shrink:
        for key, small in SHRINK.items():
            default = out.get(key)
            if (
                key in spec.hparams
                and given.get(key) is None
                and isinstance(default, numbers.Real)
                and not isinstance(default, bool)
                and small < default
            ):  # shrink, never grow
                try:
                    out[key] = spec.hparams[key].check(spec.name, key, small)
                except ConfigError:  # the model's own bounds forbid the small value: keep its default
                    pass
    return out


class _ModelCase:
    """Everything a model check needs: the spec, its settings, the data, and fresh models on demand."""

    def __init__(self, spec: Any, dim: int, hparams: dict[str, Any], seed: int, perturb: float):
        self.spec, self.dim, self.hparams, self.seed, self.perturb = spec, dim, hparams, seed, perturb
        self.classes = KIT_CLASSES if getattr(spec, "conditional", False) else 0
        self.data = train_data(dim)  # (N, D): the data columns
        if self.classes:
            # labels in turn, each class's rows shifted along the diagonal: the classes have distinct densities
            labels = torch.arange(self.data.shape[0]) % self.classes
            self.data = self.data + 0.7 * labels[:, None].double()
            self.x = torch.cat([self.data, self.one_hot(labels)], 1)  # the rows the model takes: [x, onehot(y)]
        else:
            self.x = self.data
        self._reference: dict[Any, dict[str, Any]] = {}

    @property
    def width(self) -> int:
        """The columns of the rows the model takes: D, or D + K for a conditional model."""
        return self.dim + self.classes

    def one_hot(self, labels: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(labels.long(), self.classes).double()

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """Rows → (data columns, the labels' one-hot or None)."""
        return (rows[:, : self.dim], rows[:, self.dim :]) if self.classes else (rows, None)

    def with_labels(self, x: Tensor, label: int | None = None) -> Tensor:
        """Data rows as the model takes them: the given label (default: labels in turn) appended where it needs one."""
        if not self.classes:
            return x
        labels = torch.arange(x.shape[0]) % self.classes if label is None else torch.full((x.shape[0],), label)
        return torch.cat([x, self.one_hot(labels).to(x)], 1)

    def labels(self) -> list[int | None]:
        """The labels a density check looks at: every class, or None for an unconditional model."""
        return list(range(self.classes)) if self.classes else [None]

    @staticmethod
    def forward(t: nn.Module, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return t(x) if context is None else t(x, context)

    @staticmethod
    def inverse(t: nn.Module, z: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return t.inverse(z) if context is None else t.inverse(z, context)

    def raw(self, seed: int | None = None) -> nn.Module:
        """A fresh build after seeding every generator with ``seed``, as flowbench's trainer seeds a run."""

        seed_everything(self.seed if seed is None else seed)
        if self.classes:
            return self.spec.build(self.dim, classes=self.classes, **self.hparams)
        return self.spec.build(self.dim, **self.hparams)

    def model(
        self,
        seed: int | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        perturb: bool = True,
        evaluate: bool = True,
    ) -> nn.Module:
        """Built in ``dtype``, parameters perturbed (seeded), initialised on the data; prepared and in eval mode
        unless ``evaluate`` is False."""
        seed = self.seed if seed is None else seed
        m = self.raw(seed).to(dtype)
        if perturb and self.perturb:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(self.perturb * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
        x = self.x.to(dtype)
        m.initialize(x)
        if evaluate:
            m.prepare_for_eval(x)
            m.eval()
        return m

    def transform(self, model: nn.Module) -> nn.Module:
        t = getattr(model, "transform", None)
        if not callable(t):
            raise _Skip("the model has no .transform (not a flowbench Flow): checked through log_prob only")
        return t

    def label(self) -> str:
        return (
            f"model {self.spec.name}, dim {self.dim}, seed {self.seed}, hyperparameters "
            + (", ".join(f"{k}={v}" for k, v in self.hparams.items()) or "none")
            + (f", {self.classes} classes" if self.classes else "")
        )


class _AtLabel:
    """A conditional model at one label, seen as an unconditional density (``log_prob`` and ``sample`` of x)."""

    def __init__(self, model: nn.Module, case: _ModelCase, label: int):
        self.model, self.case, self.label = model, case, label

    def log_prob(self, x: Tensor) -> Tensor:
        return self.model.log_prob(self.case.with_labels(x, self.label))

    def sample(self, n: int) -> Tensor:
        return self.model.sample(n, labels=torch.full((n,), self.label))


def _registrar(table: dict[str, tuple[Callable, str]]) -> Callable[[str, str], Callable]:
    """A decorator factory that records a check function and its one-line description in ``table``."""

    def check(name: str, doc: str) -> Callable:
        def register(fn: Callable) -> Callable:
            table[name] = (fn, doc)
            return fn

        return register

    return check


_MODEL_CHECKS: dict[str, tuple[Callable[[_ModelCase], CheckResult], str]] = {}
_model_check = _registrar(_MODEL_CHECKS)


def model_check_names() -> list[str]:
    """The model checks, in the order they run (``build`` first)."""
    return list(_MODEL_CHECKS)


def dataset_check_names() -> list[str]:
    """The dataset checks, in the order they run."""
    return list(_DATASET_CHECKS)


def describe_checks(kind: str = "model") -> dict[str, str]:
    """check name → one line of what it verifies (``kind``: ``model`` or ``dataset``)."""
    table = _MODEL_CHECKS if kind == "model" else _DATASET_CHECKS
    return {k: doc for k, (_, doc) in table.items()}


@_model_check("build", "builds in float64; log_prob gives one finite value per row")
def _check_build(case: _ModelCase) -> CheckResult:
    model = case.raw()
    if not isinstance(model, nn.Module):
        raise _Fail(f"build returned a {type(model).__name__}, not a torch.nn.Module (a flowbench Flow)")
    missing = [
        m
        for m in ("log_prob", "train_log_prob", "initialize", "prepare_for_eval", "sample")
        if not callable(getattr(model, m, None))
    ]
    if missing:
        raise _Fail(f"the model lacks {', '.join(missing)}; subclass flowbench.models.Flow")
    model = case.model()
    with torch.no_grad():
        lp = model.log_prob(case.x[:5])
    if not isinstance(lp, Tensor) or lp.shape != (5,) or lp.dtype != torch.float64:
        raise _Fail(
            f"log_prob of 5 float64 rows gave {getattr(lp, 'shape', lp)!r} "
            f"({getattr(lp, 'dtype', type(lp).__name__)}), expected shape (5,), float64"
        )
    bad = int((~torch.isfinite(lp)).sum())
    n = sum(p.numel() for p in model.parameters())
    return _result(
        "build",
        bad == 0,
        bad,
        0,
        f"{n:,} parameters" if bad == 0 else f"log_prob of {bad} of 5 training rows is not finite",
        measured=f"{bad} non-finite",
        bound="0",
    )


@_model_check("log-det", "the transform's log|det J| equals slogdet of autograd's Jacobian, row by row")
def _check_logdet(case: _ModelCase) -> CheckResult:
    model = case.model()
    t = case.transform(model)
    xs, ctx = case.split(case.x[:4])
    z, logdet = case.forward(t, xs, ctx)
    if z.shape != xs.shape or logdet.shape != (4,):
        raise _Fail(
            f"transform gave z {tuple(z.shape)} and logdet {tuple(logdet.shape)} for x {tuple(xs.shape)}; "
            f"expected z {tuple(xs.shape)} and logdet (4,)"
        )
    ref = []
    for i in range(xs.shape[0]):
        c = None if ctx is None else ctx[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda v, c=c: case.forward(t, v.unsqueeze(0), c)[0].squeeze(0), xs[i])
        sign, logabs = torch.linalg.slogdet(jac)
        if sign == 0:
            raise _Fail(f"the Jacobian at row {i} is singular: the transform is not invertible there")
        ref.append(logabs)
    dev, tol, ok = _deviation(logdet, torch.stack(ref), rtol=1e-9, atol=1e-9)
    detail = "" if ok else "the returned log-determinant is not log|det ∂z/∂x| (forward's second output)"
    return _result("log-det", ok, dev, tol, detail, measured=f"max |Δ| {_fmt(dev)}", bound="1e-9 + 1e-9·|ref|")


def _proposal(pool: Tensor, m: Tensor, cov: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` draws from, and the log-density of, a mixture: 0.8 a Gaussian kernel density estimate over ``pool``
    (close to the model's density where ``pool`` are its samples, so the weights vary
    little), 0.2 a Gaussian twice as wide as ``pool`` (covers the tails). A valid proposal whatever ``pool`` is:
    a wrong sampler only makes the standard error larger."""
    k, d = pool.shape
    chol = torch.linalg.cholesky(cov)
    # 0.6 × Silverman's bandwidth: undersmoothed, so that the kernels follow narrow modes (MoG flows, splines);
    # it halved the worst standard error over the zoo at D = 3, seeds 0–4
    h = 0.6 * (4 / (d + 2)) ** (1 / (d + 4)) * k ** (-1 / (d + 4))
    wide, p_kde = 2.0, 0.8
    kde = torch.rand(n, generator=g, dtype=torch.float64) < p_kde
    eps = torch.randn(n, d, generator=g, dtype=torch.float64) @ chol.T
    pts = torch.where(kde[:, None], pool[torch.randint(0, k, (n,), generator=g)] + h * eps, m + wide * eps)

    def white(v: Tensor) -> Tensor:  # whitened by cov: N(x; μ, c²·cov) depends on |white(x − μ)| only
        return torch.linalg.solve_triangular(chol, v.T, upper=False).T

    norm = 0.5 * d * math.log(2 * math.pi) + float(torch.log(chol.diagonal()).sum())
    wp, wc = white(pts), white(pool)
    lk = (
        torch.cat(
            [torch.cdist(wp[i : i + 4096] / h, wc / h).square_().mul_(-0.5).logsumexp(1) for i in range(0, n, 4096)]
        )
        - math.log(k)
        - norm
        - d * math.log(h)
    )
    lw = -0.5 * (wp - white(m[None])).pow(2).sum(1) / wide**2 - norm - d * math.log(wide)
    return pts, torch.logaddexp(lk + math.log(p_kde), lw + math.log(1 - p_kde))


def _density_reference(case: _ModelCase, label: int | None = None) -> dict[str, Any]:
    """The model's density (a conditional one's at ``label``) where the normalisation checks look: a grid (D ≤ 2)
    or importance-sampling draws (D > 2, :func:`_proposal`), centred on the model's samples; computed once per
    case and label."""
    if label in case._reference:
        return case._reference[label]
    model = case.model()
    if label is not None:
        model = _AtLabel(model, case, label)
    d = case.dim
    pool = _centring_pool(model, case)
    # robust centre and spread: a perturbed flow's samples can have far outliers, which would stretch a grid or
    # a Gaussian over mostly empty space (the kernel density still puts mass at the outliers themselves)
    m = pool.median(0).values
    spread = ((pool - m).abs().median(0).values * 1.4826).clamp_min(1e-6)
    core = pool[((pool - m) / spread).abs().amax(1) <= 6]
    core = core if core.shape[0] > 2 * d else pool
    cov = torch.atleast_2d(torch.cov(core.T)) + 1e-9 * torch.eye(d, dtype=torch.float64)
    g = torch.Generator().manual_seed(case.seed + 7)
    with torch.no_grad():
        if d <= 2:
            pts, logw, kind, beyond = _asinh_grid(pool, m, spread, d)
        else:
            pts, logq = _proposal(pool, m, cov, 20_000, g)
            logw = -logq
            kind = "importance sampling (20,000 draws; kernel density of samples + wide Gaussian)"
            beyond = 0.0
        logp = torch.cat([model.log_prob(pts[i : i + 50_000]) for i in range(0, pts.shape[0], 50_000)])
    if logp.shape != (pts.shape[0],):
        raise _Fail(f"log_prob of {pts.shape[0]} rows gave shape {tuple(logp.shape)}")
    case._reference[label] = {
        "kind": kind,
        "grid": d <= 2,
        "points": pts,
        "logp": logp.double(),
        "logw": logw,
        "centre": m,
        "scale": spread,
        "model": model,
        "beyond": beyond,
    }
    return case._reference[label]


def _centring_pool(model: Any, case: _ModelCase) -> Tensor:
    """500 of the model's samples where it draws sound ones, else the case's data."""
    pool = case.data
    try:  # centred on what the model generates where it can (any proposal is valid, a close one has a small
        # standard error); a broken sampler is the sample checks' finding, not this one's
        s = model.sample(500)
        if isinstance(s, Tensor) and s.shape == (500, case.dim) and torch.isfinite(s).all():
            pool = s.to(torch.float64)
    except Exception:
        pass
    return pool


def _asinh_grid(pool: Tensor, m: Tensor, spread: Tensor, d: int) -> tuple[Tensor, Tensor, str, float]:
    """The grid of a D ≤ 2 reference: (points, log cell volumes, description, share of ``pool`` beyond it)."""
    # midpoint rule on a grid uniform in t = asinh((x − centre)/spread): fine cells where the mass is,
    # wide ones in the tails, out to ±200 spreads (perturbed flows have heavy tails; ±9 misses ~1%)
    cells = 20_000 if d == 1 else 500
    reach = math.asinh(200.0)
    dt = 2 * reach / cells
    t = torch.linspace(-reach + dt / 2, reach - dt / 2, cells, dtype=torch.float64)
    axes = [float(c) + float(sp) * torch.sinh(t) for c, sp in zip(m, spread)]
    vols = [torch.log(float(sp) * torch.cosh(t) * dt) for sp in spread]  # log cell widths
    if d == 1:
        pts, logw = axes[0][:, None], vols[0]
    else:
        pts, logw = torch.cartesian_prod(*axes), torch.cartesian_prod(*vols).sum(1)
    kind = f"grid {cells}{'²' if d == 2 else ''} uniform in asinh, ±200 spreads"
    beyond = float((((pool - m) / spread).abs() > 200).any(1).double().mean())
    return pts, logw, kind, beyond


def _worst_label(
    case: _ModelCase, one: Callable[[dict[str, Any]], CheckResult], badness: Callable[[CheckResult], float]
) -> CheckResult:
    """``one`` (a density check on one reference) at every label: the first failure, else the worst figure."""
    results = []
    for label in case.labels():
        res = one(_density_reference(case, label))
        if label is not None:
            res.detail = f"label {label} of {case.classes} (the worst): " + res.detail
        results.append(res)
    failed = [r for r in results if r.status == FAIL]
    return failed[0] if failed else max(results, key=badness)


def _unresolved_note(ref: dict[str, Any]) -> str:
    """Where the grid cannot hold the density, say so: the figure then measures the grid, not the model. A
    smooth density puts ≤ 0.1% of its mass in any of the 250,000 cells; a spike narrower than a cell, more."""
    if not ref["grid"]:
        return ""
    peak = float(torch.softmax(ref["logp"] + ref["logw"], 0).max())
    notes = []
    if ref["beyond"] > 0.005:
        notes.append(f"{ref['beyond']:.1%} of 500 samples lie beyond the grid")
    if ref["points"].shape[1] == 2 and peak > 0.003:
        notes.append(f"one cell holds {peak:.1%} of the mass (features narrower than the cells)")
    if not notes:
        return ""
    return (
        "; but " + " and ".join(notes) + ": the grid cannot resolve this density, try another seed or a "
        "smaller perturbation"
    )


@_model_check("normalisation", "∫p = 1: a grid integral (D ≤ 2) or importance sampling with its standard error")
def _check_normalisation(case: _ModelCase) -> CheckResult:
    return _worst_label(case, _normalisation, lambda r: abs(r.figure - 1) if r.figure is not None else math.inf)


def _normalisation(ref: dict[str, Any]) -> CheckResult:
    lw = ref["logp"] + ref["logw"]
    if torch.isnan(lw).any() or torch.isposinf(lw).any():
        raise _Fail("log_prob is NaN or +inf at some evaluation points")
    if ref["grid"]:
        total = float(torch.exp(torch.logsumexp(lw, 0)))
        tol = 0.01
        ok = abs(total - 1) <= tol
        return _result(
            "normalisation",
            ok,
            total,
            tol,
            ref["kind"]
            + (
                ""
                if ok
                else ": the density does not integrate to 1 (a missing normalising constant, or a wrong log-det)"
                + _unresolved_note(ref)
            ),
            measured=f"∫p = {total:.4f}",
            bound=f"|∫p − 1| ≤ {tol}",
        )
    w = torch.exp(lw)
    est = float(w.mean())
    se = float(w.std() / math.sqrt(w.numel()))
    tol = 0.03 + 4 * se
    off = abs(est - 1) > tol
    noisy = se > MAX_SE
    ok = not off and not noisy
    detail = ref["kind"] + f"; tolerance 0.03 + 4 SE, SE ≤ {MAX_SE}"
    if off:
        detail += ": the density does not integrate to 1 (a missing normalising constant, or a wrong log-det)"
    elif noisy:
        detail += (
            ": the standard error is too large to tell ∫p from 1 (heavy tails, or a sampler that does not "
            "follow the density); check in 2-D (dim=2: a grid)"
        )
    return _result(
        "normalisation", ok, est, tol, detail, measured=f"∫p = {est:.4f} ± {se:.4f}", bound=f"|∫p − 1| ≤ {tol:.3g}"
    )


def _stats(v: Tensor, centre: Tensor, scale: Tensor) -> Tensor:
    """Bounded statistics (their sample means have standard error ≤ 1/√n), through tanh: each standardised
    coordinate (location), its square (spread: a sampler of the wrong width moves no odd statistic), and the
    product of the first two (dependence)."""
    u = (v - centre) / scale
    cols = [torch.tanh(u[:, j]) for j in range(u.shape[1])] + [torch.tanh(u[:, j] ** 2) for j in range(u.shape[1])]
    if u.shape[1] >= 2:
        cols.append(torch.tanh(u[:, 0] * u[:, 1]))
    return torch.stack(cols, 1)


@_model_check("samples-match-density", "sample() draws from log_prob's density: bounded statistics agree")
def _check_samples(case: _ModelCase) -> CheckResult:
    return _worst_label(case, lambda ref: _samples(case, ref), lambda r: r.figure if r.figure is not None else math.inf)


def _samples(case: _ModelCase, ref: dict[str, Any]) -> CheckResult:
    model = ref["model"]
    n = 20_000
    samples = model.sample(n)
    if samples.shape != (n, case.dim) or not torch.isfinite(samples).all():
        raise _Fail(f"sample({n}) gave shape {tuple(samples.shape)}, finite: {bool(torch.isfinite(samples).all())}")
    f_ref = _stats(ref["points"], ref["centre"], ref["scale"])
    weights = torch.softmax(ref["logp"] + ref["logw"], 0)
    on_density = (f_ref * weights[:, None]).sum(0)
    se_ref = 0.0
    if not ref["grid"]:  # self-normalised importance sampling: its standard error counts too
        se_ref = float(((weights[:, None] ** 2) * (f_ref - on_density) ** 2).sum(0).sqrt().max())
    from_samples = _stats(samples.double(), ref["centre"], ref["scale"]).mean(0)
    dev = float((from_samples - on_density).abs().max())
    tol = 0.03 + 4 * se_ref
    ok = dev <= tol
    return _result(
        "samples-match-density",
        ok,
        dev,
        tol,
        f"{n:,} samples against {ref['kind'].split(' (')[0]}; tolerance 0.03 + 4 SE"
        + (
            ""
            if ok
            else ": the samples do not follow the density (base sampler or inverse differ from log_prob's)"
            + _unresolved_note(ref)
        ),
        measured=f"max |Δ E tanh| {_fmt(dev)}",
        bound=f"≤ {tol:.3g}",
    )


@_model_check("inverse", "transform.inverse(transform(x)) = x and its log-det is the negative of forward's")
def _check_inverse(case: _ModelCase) -> CheckResult:
    model = case.model()
    t = case.transform(model)
    if not callable(getattr(t, "inverse", None)):
        raise _Skip("the transform has no inverse method")
    x, ctx = case.split(case.x[:16])
    with torch.no_grad():
        z, logdet = case.forward(t, x, ctx)
        x_back, logdet_inv = case.inverse(t, z, ctx)
    d1, b1, ok1 = _deviation(x_back, x, rtol=1e-7, atol=1e-7)
    d2, b2, ok2 = _deviation(logdet_inv, -logdet, rtol=1e-7, atol=1e-7)
    ok = ok1 and ok2
    detail = (
        ""
        if ok
        else ("inverse does not undo forward" if not ok1 else "inverse's log-det is not the negative of forward's")
    )
    return _result(
        "inverse",
        ok,
        max(d1, d2),
        max(b1, b2),
        detail,
        measured=f"max |Δ| {_fmt(max(d1, d2))}",
        bound="1e-7 + 1e-7·|ref|",
    )


@_model_check("sample", "sample(n) gives (n, D) finite rows in the model's dtype")
def _check_sample(case: _ModelCase) -> CheckResult:
    model = case.model()
    s = model.sample(5)
    if not isinstance(s, Tensor):
        raise _Fail(f"sample(5) returned a {type(s).__name__}, not a tensor")
    ok = s.shape == (5, case.dim) and s.dtype == torch.float64 and bool(torch.isfinite(s).all())
    return _result(
        "sample",
        ok,
        None,
        None,
        ""
        if ok
        else f"sample(5) gave shape {tuple(s.shape)}, {s.dtype}, finite: {bool(torch.isfinite(s).all())}; "
        f"expected (5, {case.dim}), torch.float64, finite",
        measured=f"{tuple(s.shape)} {str(s.dtype).replace('torch.', '')}",
    )


@_model_check("gradients", "every trainable parameter gets a finite, non-zero gradient from train_log_prob")
def _check_gradients(case: _ModelCase) -> CheckResult:
    model = case.model()
    model.train()
    params = dict(model.named_parameters())
    if not getattr(model, "trainable", True):
        trained = [k for k, p in params.items() if p.requires_grad]
        return _result(
            "gradients",
            not trained,
            len(trained),
            0,
            "closed-form fit: no parameter requires a gradient"
            if not trained
            else f"trainable = False, yet {', '.join(trained[:5])} require gradients",
            measured=f"{len(trained)} trainable",
            bound="0",
        )
    if not params:
        raise _Fail(
            "a trainable model (trainable = True) without parameters; set trainable = False for a closed-form fit"
        )
    loss = -model.train_log_prob(case.x[:50]).mean()
    loss.backward()
    bad = []
    for k, p in params.items():
        if p.grad is None:
            bad.append(f"{k} (no gradient: unused by the loss?)")
        elif not torch.isfinite(p.grad).all():
            bad.append(f"{k} (non-finite)")
        elif p.grad.abs().sum() == 0:
            bad.append(f"{k} (zero)")
    return _result(
        "gradients",
        not bad,
        len(bad),
        0,
        f"{len(params)} parameter tensors" if not bad else "; ".join(bad[:6]) + (" …" if len(bad) > 6 else ""),
        measured=f"{len(bad)} of {len(params)} without",
        bound="0",
    )


@_model_check("batch-independence", "in eval mode a row's log_prob does not depend on the rest of the batch")
def _check_batch_independence(case: _ModelCase) -> CheckResult:
    model = case.model()
    with torch.no_grad():
        full = model.log_prob(case.x[:6])
        single = torch.cat([model.log_prob(case.x[i : i + 1]) for i in range(6)])
    dev, tol, ok = _deviation(full, single, rtol=1e-10, atol=1e-10)
    return _result(
        "batch-independence",
        ok,
        dev,
        tol,
        "" if ok else "evaluated alone, rows get other log-probs: batch statistics used in eval mode?",
        measured=f"max |Δ| {_fmt(dev)}",
        bound="1e-10 + 1e-10·|ref|",
    )


@_model_check(
    "batchnorm-eval-stats",
    "evaluation batch norm uses the whole training set's statistics (prepare_for_eval), in batches or not",
)
def _check_batchnorm(case: _ModelCase) -> CheckResult:
    model = case.model()
    own = [m for m in model.modules() if hasattr(m, "set_stats_from")]  # flowbench's protocol batch norm
    torch_bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not own and not torch_bn:
        raise _Skip("no batch norm")
    x = case.x
    with torch.no_grad():
        model.train()  # a training-mode pass with the whole set as one batch uses the full-set statistics
        as_one_batch = model.log_prob(x)
        model.prepare_for_eval(x, batch_size=7)  # batching must not change the statistics
        model.eval()
        d1, b1, ok1 = _deviation(model.log_prob(x), as_one_batch, rtol=1e-10, atol=1e-10)
        d2, b2, ok2 = _deviation(model.log_prob(x[:5]), as_one_batch[:5], rtol=1e-10, atol=1e-10)
        model.train()
        differs = not torch.allclose(model.log_prob(x[:5]), as_one_batch[:5])
    ok = ok1 and ok2 and differs
    detail = (
        ""
        if ok
        else "eval-mode log_prob does not use the whole training set's statistics"
        if not (ok1 and ok2)
        else "a training-mode pass on 5 rows gives the full-set values: the batch norm never uses batch statistics"
    )
    res = _result(
        "batchnorm-eval-stats",
        ok,
        max(d1, d2),
        max(b1, b2),
        detail,
        measured=f"max |Δ| {_fmt(max(d1, d2))}",
        bound="1e-10 + 1e-10·|ref|",
    )
    if not ok and not own:  # torch's batch norm keeps running averages: documented, not the protocol's
        res.status = WARN
        res.detail += (
            " (torch's BatchNorm keeps running averages, and flowbench leaves it alone; the MAF "
            "protocol's is flowbench.models.layers.BatchNorm, set by prepare_for_eval)"
        )
    return res


@_model_check("save-load", "state_dict into a fresh build, a deep copy and a pickled model give the same log-probs")
def _check_save_load(case: _ModelCase) -> CheckResult:
    model = case.model()
    x = case.x[:8]
    with torch.no_grad():
        expected = model.log_prob(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = case.raw(case.seed + 1).to(torch.float64)  # another seed: nothing is equal by chance
    fresh.load_state_dict(torch.load(buf))
    fresh.eval()
    devs = []
    with torch.no_grad():
        devs.append(("state_dict", *_deviation(fresh.log_prob(x), expected, rtol=1e-12, atol=1e-12)))
        devs.append(("deepcopy", *_deviation(copy.deepcopy(model).log_prob(x), expected, rtol=1e-12, atol=1e-12)))
    note = ""
    try:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        whole = torch.load(buf, weights_only=False)
    except Exception as e:  # flowbench itself saves state_dicts only: not picklable is a warning
        note = f"the whole model does not pickle ({_describe(e)}); flowbench saves state_dicts, so runs work"
    else:
        with torch.no_grad():
            devs.append(("pickle", *_deviation(whole.log_prob(x), expected, rtol=1e-12, atol=1e-12)))
    bad = [name for name, _, _, ok in devs if not ok]
    dev = max(d for _, d, _, _ in devs)
    tol = max(b for _, _, b, _ in devs)
    res = _result(
        "save-load",
        not bad,
        dev,
        tol,
        f"{', '.join(bad)} changed the log-probs (a buffer not registered, or state kept outside the module?)"
        if bad
        else note,
        measured=f"max |Δ| {_fmt(dev)}",
        bound="1e-12 + 1e-12·|ref|",
    )
    if not bad and note:
        res.status = WARN
    return res


@_model_check("float32", "the float32 build, initialised and prepared, gives finite float32 log-probs")
def _check_float32(case: _ModelCase) -> CheckResult:
    model = case.raw()
    x = case.x.float()
    model.initialize(x)
    model.prepare_for_eval(x)
    model.eval()
    with torch.no_grad():
        lp = model.log_prob(x[:10])
    ok = lp.dtype == torch.float32 and lp.shape == (10,) and bool(torch.isfinite(lp).all())
    bad = int((~torch.isfinite(lp)).sum()) if lp.dtype.is_floating_point else 10
    return _result(
        "float32",
        ok,
        bad,
        0,
        ""
        if ok
        else f"log_prob of 10 float32 rows: shape {tuple(lp.shape)}, {lp.dtype}, {bad} not finite (a float64 "
        "constant or buffer that does not follow .to(dtype)?)",
        measured=f"{str(lp.dtype).replace('torch.', '')}, {bad} non-finite",
        bound="float32, 0",
    )


@_model_check("determinism", "two builds after seeding alike have equal weights, buffers and log-probs")
def _check_determinism(case: _ModelCase) -> CheckResult:
    a, b = case.raw(), case.raw()
    sa, sb = a.state_dict(), b.state_dict()
    if list(sa) != list(sb):
        raise _Fail("two builds have different state_dict keys")
    dev = max(
        (
            float((sa[k].double() - sb[k].double()).abs().max()) if sa[k].numel() else 0.0
            for k in sa
            if sa[k].dtype.is_floating_point
        ),
        default=0.0,
    )
    unequal = [k for k in sa if not torch.equal(sa[k], sb[k])]
    if not unequal:  # also after the data-dependent set-up
        lps = []
        for m in (a, b):
            m.double()
            m.initialize(case.x)
            m.prepare_for_eval(case.x)
            m.eval()
            with torch.no_grad():
                lps.append(m.log_prob(case.x[:10]))
        if not torch.equal(lps[0], lps[1]):
            unequal.append("log_prob after initialize/prepare_for_eval")
            dev = max(dev, float((lps[0] - lps[1]).abs().max()))
    detail = (
        ""
        if not unequal
        else "seeding random, numpy and torch does not fix "
        + ", ".join(unequal[:5])
        + " (a generator the seed does not reach: os.urandom, time, an unseeded Generator?)"
    )
    return _result("determinism", not unequal, dev, 0.0, detail, measured=f"max |Δ| {_fmt(dev)}", bound="0 (equal)")


@_model_check(
    "bad-input", "clear flowbench errors for a wrong shape and NaN input (check_input); unknown hyperparameters refused"
)
def _check_bad_input(case: _ModelCase) -> CheckResult:
    model = case.model()
    d, w = case.dim, case.width
    problems = []
    cases = [
        (torch.zeros(4, w + 1, dtype=torch.float64), f"shape (batch, {w})", f"a ({4}, {w + 1}) input"),
        (torch.zeros(w, dtype=torch.float64), f"shape (batch, {w})", "a 1-D input"),
    ]
    if w > 1:
        cases.append((torch.zeros(4, w - 1, dtype=torch.float64), f"shape (batch, {w})", f"a (4, {w - 1}) input"))
    nan = case.x[:4].clone()
    nan[1, d - 1] = float("nan")
    cases.append((nan, "NaN", "an input with a NaN"))
    if case.classes:  # label columns that are no one-hot
        soft = case.x[:4].clone()
        soft[:, d:] = 1.0 / case.classes
        cases.append((soft, "one-hot", "label columns that are not one-hot"))
    for x, needle, what in cases:
        try:
            with torch.no_grad():
                model.log_prob(x)
        except FlowbenchError as e:
            if needle not in str(e):
                problems.append(f"{what}: message {str(e)!r} does not say {needle!r}")
        except Exception as e:
            problems.append(f"{what} raised {type(e).__name__}, not flowbench's InputError")
        else:
            problems.append(f"{what} was accepted")
    try:
        case.spec.resolve({"no_such_knob": 1})
    except ConfigError as e:
        if "does not accept hyperparameter" not in str(e):
            problems.append(f"an unknown hyperparameter: message {str(e)!r}")
    else:
        problems.append("an unknown hyperparameter was accepted")
    detail = "; ".join(problems)
    if problems and "hyperparameter" not in detail:
        detail += " (call flowbench.models.check_input(x, self.dim) first in log_prob)"
    return _result("bad-input", not problems, len(problems), 0, detail, measured=f"{len(problems)} unclear", bound="0")


@_model_check(
    "far-from-data",
    "log_prob far from the data (up to 1e4) is finite or −inf, never NaN or +inf, in float64 and float32",
)
def _check_far(case: _ModelCase) -> CheckResult:
    g = torch.Generator().manual_seed(case.seed + 3)
    u = torch.randn(50, case.dim, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    pts = case.with_labels(torch.cat([r * u for r in (8.0, 80.0, 800.0, 1e4)]))
    bad = 0
    m32 = case.raw()
    m32.initialize(case.x.float())
    m32.prepare_for_eval(case.x.float())
    m32.eval()
    for m, p in ((case.model(), pts), (m32, pts.float())):
        with torch.no_grad():
            lp = m.log_prob(p)
        bad += int((torch.isnan(lp) | torch.isposinf(lp)).sum())
    return _result(
        "far-from-data",
        bad == 0,
        bad,
        0,
        ""
        if bad == 0
        else "NaN or +inf log-probs: map NaN to −inf (flowbench.models.base.nan_to_neginf), as Flow.log_prob does",
        measured=f"{bad} NaN/+inf of {2 * pts.shape[0]}",
        bound="0",
    )


@_model_check("label", "the display label renders from the hyperparameters")
def _check_label(case: _ModelCase) -> CheckResult:
    label = case.spec.display_name(case.hparams)
    ok = isinstance(label, str) and bool(label.strip())
    return _result("label", ok, None, None, "" if ok else f"display_name gave {label!r}", measured=repr(label))


@_model_check(
    "conditional",
    "class-conditional models: class_log_probs(x)[:, k] = log_prob([x, onehot(k)]), "
    "marginal_log_prob = logsumexp − log K, and the label changes the density",
)
def _check_conditional(case: _ModelCase) -> CheckResult:
    if not case.classes:
        raise _Skip("not class-conditional")
    model = case.model()
    k = case.classes
    x = case.data[:9]
    with torch.no_grad():
        table = model.class_log_probs(x)
        if table.shape != (x.shape[0], k):
            raise _Fail(
                f"class_log_probs of {x.shape[0]} rows gave shape {tuple(table.shape)}, expected ({x.shape[0]}, {k})"
            )
        want = torch.stack([model.log_prob(case.with_labels(x, y)) for y in range(k)], 1)
        marginal = model.marginal_log_prob(x)
    devs = [
        _deviation(table, want, rtol=1e-10, atol=1e-10),
        _deviation(marginal, torch.logsumexp(want, 1) - math.log(k), rtol=1e-10, atol=1e-10),
    ]
    spread = float((want - want[:, :1]).abs().max())  # how much the label moves log p(x | y)
    dev, tol = max(d for d, _, _ in devs), max(b for _, b, _ in devs)
    ok = all(o for _, _, o in devs) and spread > 1e-6
    detail = (
        f"log p(x | y) moves by up to {spread:.3g} nats between labels"
        if ok
        else "the label does not change the density (the label columns are ignored)"
        if spread <= 1e-6
        else "class_log_probs or marginal_log_prob disagree with log_prob at each label"
    )
    return _result("conditional", ok, dev, tol, detail, measured=f"max |Δ| {_fmt(dev)}", bound="1e-10 + 1e-10·|ref|")


_PATH_NAMES = {"relgrad": "relgrad Function", "native": "stacked modules", "vmap": "torch.func.vmap"}


@_model_check(
    "stacking",
    "R = 2 runs evaluated stacked (as the stacked trainer does) equal each run alone: log-probs, gradients, validation",
)
def _check_stacking(case: _ModelCase) -> CheckResult:
    spec = case.spec
    if not spec.trainable:
        raise _Skip("fitted in closed form: never trained in a stack")
    why = spec.unstackable(case.hparams) if spec.unstackable is not None else None
    if why is not None:
        raise _Skip(f"declared unstackable: {why}")
    seeds = (case.seed, case.seed + 1)
    flows = [case.model(s, evaluate=False).train() for s in seeds]
    template = copy.deepcopy(flows[0])
    shared, per_run = split_buffers(flows)
    names = [n for n, _ in template.named_parameters()]
    params = {n: torch.stack([dict(f.named_parameters())[n].detach() for f in flows]).requires_grad_() for n in names}
    g = torch.Generator().manual_seed(case.seed + 5)
    x = case.x[torch.randint(0, case.x.shape[0], (2, 7), generator=g)]  # run r's own minibatch, (R, B, D)
    weights = torch.arange(1.0, 8.0, dtype=torch.float64)  # unequal row weights: each row's gradient counts
    path = _stacking_path(template, per_run)
    lp = _stacked_log_probs(template, shared, per_run, params, x, weights, path)
    devs = _each_run_deviations(flows, params, x, lp, weights)
    note = f"{_PATH_NAMES[path]}; log-probs and gradients"
    if not per_run and (val := _stacked_validation_deviations(case, template, params, shared, flows)) is not None:
        devs += val
        note += ", stacked validation"
    return _stacking_result(devs, note, path)


def _stacking_path(template: nn.Module, per_run: Any) -> str:
    """How flowbench's trainer would evaluate a stack of ``template``: a key of :data:`_PATH_NAMES`."""
    return (
        "relgrad"
        if isinstance(template, RelgradFlow) and template.relative and not per_run
        else "native"
        if stacks_natively(template) and not per_run
        else "vmap"
    )


def _stacked_log_probs(
    template: nn.Module, shared: Any, per_run: Any, params: dict[str, Tensor], x: Tensor, weights: Tensor, path: str
) -> Tensor:
    """The stack's (R, B) training log-probs, their weighted sum back-propagated into ``params``."""
    try:
        lp = stacked_objective(template, shared, run_buffers=per_run)(params, x)
    except Exception as e:
        if path == "vmap":  # flowbench's probe refuses such a stack with this reason: not a wrong result
            raise _Skip(f"cannot be evaluated stacked, so `--seeds` runs one at a time: {_describe(e)}") from e
        raise
    try:
        (lp * weights).sum().backward()
    except Exception as e:  # the probe only evaluates: such a stack would be accepted, then crash in training
        raise _Fail(
            f"evaluated stacked ({_PATH_NAMES[path]}), its gradient raises {_describe(e)}; `--seeds` would "
            "fail mid-training: declare unstackable in the spec"
        ) from e
    return lp


def _each_run_deviations(
    flows: list[nn.Module], params: dict[str, Tensor], x: Tensor, lp: Tensor, weights: Tensor
) -> list[tuple[float, float, bool]]:
    """Each run alone against its slice of the stack: log-probs, then every parameter's gradient."""
    devs = []
    for r, f in enumerate(flows):
        one = f.train_log_prob(x[r])
        (one * weights).sum().backward()
        devs.append(_deviation(lp[r], one, rtol=1e-9, atol=1e-9))
        for n, p in f.named_parameters():
            mine = params[n].grad[r] if params[n].grad is not None else torch.zeros_like(p)
            theirs = p.grad if p.grad is not None else torch.zeros_like(p)
            devs.append(_deviation(mine, theirs, rtol=1e-9, atol=1e-9))
    return devs


def _stacked_validation_deviations(
    case: _ModelCase, template: nn.Module, params: dict[str, Tensor], shared: Any, flows: list[nn.Module]
) -> list[tuple[float, float, bool]] | None:
    """The stack's validation log-probs against each run's own in evaluation mode; None where the model has no
    stacked validation."""
    with torch.no_grad():
        val = case.x[:37]
        got = stacked_validation(
            template,
            {n: p.detach() for n, p in params.items()},
            shared,
            case.x,
            val,
            batch_size=15,
            stats_batch_size=40,
        )
        if got is None:
            return None
        devs = []
        for r, f in enumerate(flows):
            f.prepare_for_eval(case.x, batch_size=40)
            f.eval()
            devs.append(_deviation(got[0][r], f.log_prob(val), rtol=1e-9, atol=1e-9))
    return devs


def _stacking_result(devs: list[tuple[float, float, bool]], note: str, path: str) -> CheckResult:
    """The stacking check's row: the worst deviation, and on failure what the stacking path requires."""
    dev = max(d for d, _, _ in devs)
    tol = max(b for _, b, _ in devs)
    ok = all(o for _, _, o in devs)
    why = (
        "its modules declare stacks = True, so each must take parameters and input with a leading run axis "
        "(R, …) and keep the runs apart"
        if path == "native"
        else "the model reads state outside its parameters "
        "and buffers, or mixes runs; fix it or declare unstackable in its spec"
    )
    return _result(
        "stacking",
        ok,
        dev,
        tol,
        note + ("" if ok else " differ from each run's own: " + why),
        measured=f"max |Δ| {_fmt(dev)}",
        bound="1e-9 + 1e-9·|ref|",
    )


@_model_check("cuda", "on a CUDA device log_prob equals the CPU's and samples stay on the device")
def _check_cuda(case: _ModelCase) -> CheckResult:
    if not torch.cuda.is_available():
        raise _Skip("no CUDA device")
    model = case.model()
    with torch.no_grad():
        expected = model.log_prob(case.x[:10])
        model.cuda()
        got = model.log_prob(case.x[:10].cuda()).cpu()
    dev, tol, ok = _deviation(got, expected, rtol=1e-9, atol=1e-9)
    try:
        where = model.sample(4).device.type
    except InverseNotAvailable:
        where = "cuda"
    ok = ok and where == "cuda"
    return _result(
        "cuda",
        ok,
        dev,
        tol,
        "" if ok else ("samples on " + where if where != "cuda" else "CUDA log-probs differ from the CPU's"),
        measured=f"max |Δ| {_fmt(dev)}",
        bound="1e-9 + 1e-9·|ref|",
    )


def check_model(
    spec_or_key: Any,
    *,
    dim: int = 3,
    hparams: Mapping[str, Any] | None = None,
    seed: int = 0,
    checks: Sequence[str] | str | None = None,
    perturb: float = 0.1,
    shrink: bool = True,
) -> CheckReport:
    """Run the model checks (all, or those named in ``checks``) on a small float64 build.

    Args:
        spec_or_key: a registered name, ``package.module:ATTR``, ``path/to/file.py:ATTR``, or a ModelSpec.
        dim: data dimension D (≤ 2: normalisation on a grid; else importance sampling).
        hparams: hyperparameters; unset size knobs (:data:`SHRINK`) are shrunk unless ``shrink`` is False.
        seed: the seed every build starts from; perturbations and draws are seeded from it too.
        perturb: standard deviation of the noise added to every parameter (0: as built).

    Raises:
        ConfigError: a bad reference or hyperparameter, or an unknown check name.
    """
    spec = _model_spec(spec_or_key)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ConfigError(f"dim must be a positive integer; got {dim!r}")
    names = _select(checks, _MODEL_CHECKS, "model")
    case = _ModelCase(spec, int(dim), _hparams(spec, hparams, shrink), int(seed), float(perturb))
    table = {k: fn for k, (fn, _) in _MODEL_CHECKS.items()}
    with _own_random_state():
        built = _run_checks(case.label(), ["build"], table, case)
        if not built.ok:
            rest = [CheckResult(n, SKIP, detail="the model does not build (see build)") for n in names if n != "build"]
            return CheckReport(built.subject, built.results + rest)
        report = _run_checks(case.label(), [n for n in names if n != "build"], table, case)
    if "build" in names:
        report.results.insert(0, built.results[0])
    return report


def run_model_check(spec_or_key: Any, name: str, **kwargs: Any) -> CheckResult:
    """One model check for a pytest test: AssertionError when it fails, ``pytest.skip`` when it does not
    apply; returns the result otherwise. ``kwargs`` as :func:`check_model`'s."""
    return _as_test(check_model(spec_or_key, checks=[name], **kwargs), name)


def run_dataset_check(spec_or_key: Any, name: str, **kwargs: Any) -> CheckResult:
    """One dataset check for a pytest test (as :func:`run_model_check`); ``kwargs`` as :func:`check_dataset`'s."""
    return _as_test(check_dataset(spec_or_key, checks=[name], **kwargs), name)


def _as_test(report: CheckReport, name: str) -> CheckResult:
    report.raise_for_failures()  # a build failure is reported under "build"
    res = report[name] if name in report else report.results[-1]
    if res.status == SKIP:
        import pytest  # lazy: pytest is a test-time dependency, and the kit also runs from `flowbench check-model`

        pytest.skip(f"{name}: {res.detail}")
    return res


def parse_hparam_items(spec_or_key: Any, items: Sequence[str]) -> dict[str, Any]:
    """``["hidden=16", "batch_norm=false", "hidden_features=64,64"]`` → values typed by the model's spec (its
    ``HParam.from_text``, as ``flowbench run``'s flags); ConfigError when malformed or of the wrong type. Names
    the spec does not have are passed on as text, for ``resolve`` to refuse with the list of those it has."""
    spec = _model_spec(spec_or_key)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"hyperparameter {item!r}: write KEY=VALUE, e.g. hidden=16")
        hp = spec.hparams.get(key)
        out[key] = text.strip() if hp is None else hp.from_text(spec.name, key, text.strip())
    return out


# == datasets ===============================================================================================
def _dataset_spec(spec_or_key: Any) -> tuple[Any, str | None]:
    """(DatasetSpec, the key that loads it, or None for a spec object that is not registered)."""

    if isinstance(spec_or_key, str):
        return get_info(spec_or_key), spec_or_key
    if isinstance(spec_or_key, DatasetSpec):
        if DATASETS.get(spec_or_key.name) is spec_or_key:
            return spec_or_key, spec_or_key.name
        for ref, (spec, _) in DATASETS.referenced.items():
            if spec is spec_or_key:
                return spec, ref
        return spec_or_key, None
    spec = DATASETS.coerce(spec_or_key, repr(spec_or_key))
    return spec, None


class _DatasetCase:
    def __init__(self, spec: Any, key: str | None, root: Path, fixture: bool, width: int | None):
        self.spec, self.key, self.root, self.fixture = spec, key, root, fixture
        self.width = spec.dim if width is None else width
        self._prepared: list[Any] = []

    def prepared(self, i: int = 0) -> dict[str, np.ndarray]:
        """The recipe's output, prepared once per index (0 and 1: the determinism pair)."""
        while len(self._prepared) <= i:
            try:
                self._prepared.append(self.spec.prepare(self.root))
            except Exception as e:
                self._prepared.append(e)
        got = self._prepared[i]
        if isinstance(got, Exception):
            if i == 0:
                raise got
            raise _Fail(f"the second prepare raised {_describe(got)}")
        return got

    def splits(self) -> dict[str, np.ndarray]:
        """The prepared splits, without a labelled dataset's label arrays, for checks that need them (skipped
        where the recipe failed)."""

        try:
            a = self.prepared()
        except Exception:
            raise _Skip("the recipe fails (see prepare)") from None
        if (
            not isinstance(a, dict)
            or set(a) != self.keys()
            or not all(isinstance(a[k], np.ndarray) and a[k].ndim == 2 for k in SPLITS)
        ):
            raise _Skip("the recipe's output is malformed (see prepare)")
        return {k: a[k] for k in SPLITS}

    def keys(self) -> set[str]:
        """What prepare returns: the splits, and the label arrays where the spec declares classes."""

        return set(SPLITS) | (set(LABELS) if self.spec.classes else set())

    def label(self) -> str:
        where = "built in" if self.spec.builtin else f"root {self.root}"
        return f"dataset {self.spec.name}, D {self.spec.dim}, {where}" + (
            " (test fixtures)" if self.fixture and not self.spec.builtin else ""
        )


_DATASET_CHECKS: dict[str, tuple[Callable[[_DatasetCase], CheckResult], str]] = {}
_dataset_check = _registrar(_DATASET_CHECKS)


@_dataset_check("spec", "the DatasetSpec's attributes are present and typed")
def _check_dataset_spec(case: _DatasetCase) -> CheckResult:

    s = case.spec
    problems = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    need(isinstance(s, DatasetSpec), "not a flowbench.data.DatasetSpec")
    need(isinstance(s.dim, int) and s.dim > 0, f"dim {s.dim!r} is not a positive int")
    need(
        isinstance(s.sizes, tuple) and len(s.sizes) == 3 and all(isinstance(n, int) and n > 0 for n in s.sizes),
        f"sizes {s.sizes!r} are not three positive ints",
    )
    need(
        isinstance(s.raw_files, tuple) and all(isinstance(f, str) for f in s.raw_files),
        "raw_files is not a tuple of str",
    )
    need(isinstance(s.source, str) and bool(s.source), "source is empty")
    need(isinstance(s.description, str) and bool(s.description), "description is empty")
    need(isinstance(s.recipe_version, int) and s.recipe_version >= 1, "recipe_version is not an int ≥ 1")
    need(callable(s.prepare), "prepare is not callable")
    need(s.builtin is (not s.raw_files), "builtin disagrees with raw_files")
    need(isinstance(s.classes, int) and s.classes >= 0, f"classes {s.classes!r} is not an int ≥ 0")
    if s.image is None:
        need(s.logit_alpha is None and s.levels is None, "logit_alpha/levels without an image")
    else:
        need(
            isinstance(s.image, ImageSpec) and math.prod(s.image.shape) == s.dim,
            f"image {s.image!r} does not have dim pixels",
        )
        need((s.logit_alpha, s.levels) == (s.image.logit_alpha, s.image.levels), "logit settings disagree")
    return _result(
        "spec", not problems, len(problems), 0, "; ".join(problems), measured=f"{len(problems)} wrong", bound="0"
    )


@_dataset_check("raw-files", "the raw files are under the data root")
def _check_raw_files(case: _DatasetCase) -> CheckResult:
    if case.spec.builtin:
        raise _Skip("built in: no raw files")
    missing = [f for f in case.spec.raw_files if not (case.root / f).is_file()]
    detail = ""
    if missing:
        detail = f"missing under {case.root}: {', '.join(missing)}. {_fetch_hint(case.spec, case.root)}"
    return _result(
        "raw-files",
        not missing,
        len(missing),
        0,
        detail,
        measured=f"{len(case.spec.raw_files) - len(missing)} of {len(case.spec.raw_files)}",
        bound="all present",
    )


@_dataset_check(
    "prepare", "prepare(root) returns train/val/test 2-D arrays (and their labels where the spec declares classes)"
)
def _check_prepare(case: _DatasetCase) -> CheckResult:

    if not case.spec.builtin and any(not (case.root / f).is_file() for f in case.spec.raw_files):
        raise _Skip("raw files missing (see raw-files)")
    a = case.prepared()
    if not isinstance(a, dict) or set(a) != case.keys():
        want = [k for k in (*SPLITS, *LABELS) if k in case.keys()]
        raise _Fail(
            f"prepare returned {type(a).__name__} with keys {sorted(a) if isinstance(a, dict) else '—'}; "
            f"expected a dict with exactly {', '.join(want)}"
        )
    bad = [
        f"{k}: {type(a[k]).__name__} {getattr(a[k], 'shape', '')}"
        for k in SPLITS
        if not isinstance(a[k], np.ndarray) or a[k].ndim != 2
    ]
    shapes = ", ".join(f"{k} {a[k].shape}" for k in SPLITS if isinstance(a[k], np.ndarray))
    return _result(
        "prepare",
        not bad,
        None,
        None,
        shapes if not bad else "not 2-D numpy arrays: " + "; ".join(bad),
        measured=f"{sum(a[k].shape[0] for k in SPLITS if isinstance(a[k], np.ndarray)):,} rows",
    )


@_dataset_check("deterministic", "two prepares give bit-identical splits (same seeds, same order of draws)")
def _check_deterministic(case: _DatasetCase) -> CheckResult:

    a = case.splits()
    a.update({k: np.asarray(v) for k, v in case.prepared().items() if k in LABELS})  # labels must repeat too
    b = case.prepared(1)
    diff = []
    dev = 0.0
    for k in a:
        if not isinstance(b, dict) or k not in b or not isinstance(b[k], np.ndarray) or b[k].shape != a[k].shape:
            diff.append(f"{k}: shape")
            continue
        if a[k].dtype != b[k].dtype:
            diff.append(f"{k}: dtype")
        if not np.array_equal(a[k], b[k], equal_nan=True):
            diff.append(k)
            with np.errstate(invalid="ignore"):
                dev = max(dev, float(np.nanmax(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))))
    return _result(
        "deterministic",
        not diff,
        dev,
        0.0,
        ""
        if not diff
        else f"{', '.join(diff)} differ between two prepares: seed every random draw "
        "(np.random.RandomState(seed), as maf_split does)",
        measured=f"max |Δ| {_fmt(dev)}",
        bound="0 (bit-identical)",
    )


@_dataset_check("width", "every split has one width: D (or the fixture's width)")
def _check_width(case: _DatasetCase) -> CheckResult:
    a = case.splits()
    widths = {k: v.shape[1] for k, v in a.items()}
    ok = set(widths.values()) == {case.width}
    return _result(
        "width",
        ok,
        max(widths.values()),
        case.width,
        ""
        if ok
        else f"widths {widths}, expected {case.width}"
        + (f" (D={case.spec.dim})" if case.width != case.spec.dim else " (the spec's dim)"),
        measured="width " + "/".join(str(w) for w in dict.fromkeys(widths.values())),
        bound=f"= {case.width}",
    )


@_dataset_check("sizes", "the split sizes are the declared ones (real data; test fixtures are smaller)")
def _check_sizes(case: _DatasetCase) -> CheckResult:

    a = case.splits()
    if case.fixture and not case.spec.builtin:
        raise _Skip("test fixtures: not the full-size data")
    got = tuple(a[k].shape[0] for k in SPLITS)
    ok = got == case.spec.sizes
    return _result(
        "sizes",
        ok,
        None,
        None,
        "" if ok else f"prepared {got}, the spec declares {case.spec.sizes}",
        measured="/".join(f"{n:,}" for n in got),
        bound="= " + "/".join(f"{n:,}" for n in case.spec.sizes),
    )


@_dataset_check("non-empty", "every split has rows")
def _check_non_empty(case: _DatasetCase) -> CheckResult:
    a = case.splits()
    empty = [k for k, v in a.items() if v.shape[0] == 0]
    return _result(
        "non-empty",
        not empty,
        min(v.shape[0] for v in a.values()),
        1,
        "" if not empty else f"empty: {', '.join(empty)}",
        measured=f"min {min(v.shape[0] for v in a.values()):,} rows",
        bound="≥ 1",
    )


@_dataset_check("finite", "no NaN or inf in any split")
def _check_finite(case: _DatasetCase) -> CheckResult:
    a = case.splits()
    bad = {k: int((~np.isfinite(v)).sum()) for k, v in a.items()}
    n = sum(bad.values())
    return _result(
        "finite",
        n == 0,
        n,
        0,
        "" if n == 0 else ", ".join(f"{k}: {c}" for k, c in bad.items() if c) + " NaN/inf values",
        measured=f"{n} NaN/inf",
        bound="0",
    )


@contextlib.contextmanager
def _loadable(case: _DatasetCase) -> Iterator[str]:
    """A key ``load_dataset`` resolves to the case's spec: a spec object that is not registered is registered
    for the duration (and removed after)."""

    if case.key is not None:
        yield case.key
        return
    name = case.spec.name
    if name in DATASETS:
        raise _Skip(f"a registered dataset is named {name!r}: pass this spec by reference to check its loading")
    dict.__setitem__(DATASETS, name, case.spec)
    DATASETS.origins[name] = Origin("module", "flowbench.testing (checked spec)")
    try:
        yield name
    finally:
        dict.pop(DATASETS, name, None)
        DATASETS.origins.pop(name, None)


@_dataset_check(
    "load",
    "load_dataset gives the recipe's splits as float32 (through the processed cache, twice) "
    "with the spec's image settings",
)
def _check_load(case: _DatasetCase) -> CheckResult:

    expected = to_float32(case.splits())
    spec = case.spec
    labels = {k: np.asarray(case.prepared()[k]) for k in LABELS if spec.classes}
    problems = []
    dev = 0.0
    with _loadable(case) as key:
        for attempt in ("first", "second"):  # the first load writes the cache, the second memory-maps it
            ds = load_dataset(key, case.root)
            for k in SPLITS:
                got = np.asarray(getattr(ds, k))
                if got.dtype != np.float32:
                    problems.append(f"{attempt} load: {k} is {got.dtype}")
                if got.shape != expected[k].shape or not np.array_equal(got, expected[k]):
                    problems.append(f"{attempt} load: {k} differs from the recipe's output")
                    if got.shape == expected[k].shape:
                        dev = max(dev, float(np.max(np.abs(got.astype(np.float64) - expected[k]))))
            for k in labels:
                got = getattr(ds, k)
                if got is None or got.dtype != np.int64 or not np.array_equal(got, labels[k]):
                    problems.append(f"{attempt} load: {k} differ from the recipe's (or are not int64)")
            if ds.classes != spec.classes:
                problems.append(f"{attempt} load: {ds.classes} classes, the spec declares {spec.classes}")
            if (ds.logit_alpha, ds.levels) != (spec.logit_alpha, spec.levels) or ds.image_shape != (
                spec.image.shape if spec.image else None
            ):
                problems.append(f"{attempt} load: image settings differ from the spec's")
        st = status(key, case.root)
        if spec.builtin:
            if st != "built-in" or cache.cache_dir(case.root, spec.name).exists():
                problems.append(f"built in, yet status {st!r} or a processed cache exists")
        elif st != "prepared" or not isinstance(ds.train, np.memmap):
            problems.append(
                f"after two loads the status is {st!r} and train is {type(ds.train).__name__}, not "
                "a memory-mapped cache"
            )
    return _result(
        "load",
        not problems,
        dev,
        0.0,
        "; ".join(dict.fromkeys(problems))
        or ("built in: no cache" if spec.builtin else f"cache {cache.cache_dir(case.root, spec.name)}"),
        measured=f"max |Δ| {_fmt(dev)}",
        bound="0 (bit-identical)",
    )


def _rows(a: np.ndarray) -> set[bytes]:
    a = np.ascontiguousarray(a)
    return set(a.view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).ravel().tolist())


@_dataset_check(
    "overlap",
    "no row appears in two splits (shared rows leak training data into the test score; "
    "a warning, since real data can repeat rows)",
)
def _check_overlap(case: _DatasetCase) -> CheckResult:

    a = to_float32(case.splits())  # identical as the model sees them
    train, val, test = (_rows(a[k]) for k in ("train", "val", "test"))
    counts = {"train∩val": len(train & val), "train∩test": len(train & test), "val∩test": len(val & test)}
    n = sum(counts.values())
    res = _result(
        "overlap",
        True,
        n,
        0,
        "" if n == 0 else ", ".join(f"{k} {c:,}" for k, c in counts.items() if c) + " identical rows",
        measured=f"{n:,} shared rows",
        bound="0",
    )
    if n:
        res.status = WARN
    return res


def check_dataset(
    spec_or_key: Any,
    root: str | Path | None = None,
    *,
    fixture: bool = False,
    width: int | None = None,
    checks: Sequence[str] | str | None = None,
) -> CheckReport:
    """Run the dataset checks (all, or those named in ``checks``) on a dataset's recipe and loader.

    Args:
        spec_or_key: a registered name, ``package.module:ATTR``, ``path/to/file.py:ATTR``, or a DatasetSpec.
        root: the data root with the raw files (``None``: ``$FLOWBENCH_DATA`` or ``data``); the ``load`` check
            writes the processed cache there, as any load does.
        fixture: the raw files are small test fixtures: split sizes are not compared with the spec's.
        width: the width the splits must have (default the spec's dim; fixtures may have fewer columns).

    Raises:
        ConfigError: a bad reference, a data root that is a file, or an unknown check name.
    """

    spec, key = _dataset_spec(spec_or_key)
    names = _select(checks, _DATASET_CHECKS, "dataset")
    case = _DatasetCase(spec, key, check_root(root), fixture, width)
    table = {k: fn for k, (fn, _) in _DATASET_CHECKS.items()}
    with _own_random_state():
        return _run_checks(case.label(), names, table, case)
