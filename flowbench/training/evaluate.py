"""Evaluation: per-example log-likelihoods in batches and the MAF error bar (2·std/sqrt(N)).

Papamakarios et al. 2017, section 4: average test log-likelihood ± 2 standard errors over the test points;
for images also the pixel-space log-likelihood and bits/pixel (see ``Dataset.pixel_log_prob``).

Non-finite per-point values (−inf: a density below float range far from the data; ``Flow.log_prob`` never
returns NaN for a finite row) are counted. The test mean stays the protocol's mean over *all* points, so one
−inf point makes it −inf (reported as such, ``n_nonfinite_test`` > 0, and footnoted in the table); the mean
and 2 SE over the finite points are recorded beside it as ``test_ll_finite``/``test_ll_finite_2se``.
Validation uses the mean over the finite points plus their count (:func:`finite_mean`), so a −inf point
does not end training.

Every evaluation also scores the *exact training NLL* (:func:`training_nll`): ``log_prob`` of the evaluated
state, in evaluation mode, on a fixed subsample of the training set (:func:`train_subsample`). It is the
training curve a reader can set beside the validation LL: the running training loss is a mean over states
that changed during the epoch, in training mode (batch statistics, dropout), and for relgrad it leaves
Σ log|det W| out by design (Gresele et al. 2020, section 4), ~27 nats on POWER.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from scipy.special import logsumexp
from torch import Tensor

from flowbench.data.base import Dataset
from flowbench.jacobian import jacobian_spectral_norm
from flowbench.models.base import Flow

__all__ = [
    "class_log_probs",
    "summarize_conditional",
    "log_prob_batches",
    "mean_2se",
    "finite_mean",
    "evaluate_test",
    "evaluate_test_points",
    "summarize_test",
    "spectral_norm_summary",
    "TRAIN_NLL_POINTS",
    "train_subsample",
    "training_nll",
]

#: At most this many training points are scored by every evaluation's exact training NLL; fewer where the
#: validation set is smaller (digits: 161), so the training curve is as precise as the validation curve beside it
#: and costs at most what a validation pass does. The same points at every evaluation: no jitter along the
#: curve, only a fixed offset from the whole training set's NLL.
TRAIN_NLL_POINTS = 1000
#: Seed of the subsample's own generator (the same points for every seed of a configuration).
TRAIN_NLL_SEED = 0


@torch.no_grad()
def log_prob_batches(
    flow: Flow, x: Tensor, batch_size: int = 2000, fn: Callable[[Tensor], Tensor] | None = None
) -> np.ndarray:
    """``flow.log_prob`` (or ``fn``, a method of ``flow``) of every row of ``x`` in batches (bounded memory), as
    float64 numpy, in evaluation mode.

    A flow already in evaluation mode is not switched again: a switch drops what it cached for evaluation
    (relgrad's Σ log|det W|, an O(D³) recomputation), and nothing steps a flow's weights in evaluation mode.
    """
    fn = flow.log_prob if fn is None else fn
    was_training = flow.training
    if was_training:
        flow.eval()
    try:
        parts = [fn(x[i : i + batch_size]).double().cpu() for i in range(0, x.shape[0], batch_size)]
    finally:
        if was_training:
            flow.train()
    return torch.cat(parts).numpy() if parts else np.zeros(0)


def validation_ll(flow: Flow, train_x: Tensor, val_x: Tensor, batch_size: int = 2000) -> tuple[float, int]:
    """The MAF protocol's validation score: batch norms from the whole training set, then (LL over the finite
    validation points, count of −inf points); the flow is left in evaluation mode."""
    flow.eval()
    flow.prepare_for_eval(train_x)
    return finite_mean(log_prob_batches(flow, val_x, batch_size))


def train_subsample(train_x: Tensor, n: int = TRAIN_NLL_POINTS) -> Tensor:
    """The rows of ``train_x`` on which :func:`training_nll` is scored (the trainers pass
    ``n = min(TRAIN_NLL_POINTS, validation points)``): the first ``n`` of ``torch.randperm(N)`` drawn by a
    generator seeded :data:`TRAIN_NLL_SEED`, in the data's order; all rows when ``N ≤ n``. The generator is its
    own, so the run's random streams (initialisation, shuffling, dropout) and its trajectory are untouched, every
    seed of a configuration is scored on the same points, and a resumed run draws them again."""
    total = train_x.shape[0]
    if total <= n:
        return train_x
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(TRAIN_NLL_SEED))[:n].sort().values
    return train_x[idx.to(train_x.device)]


def training_nll(flow: Flow, subsample: Tensor, batch_size: int = 2000) -> tuple[float, int]:
    """(exact NLL over the finite points of ``subsample``, count of −inf points): ``−log_prob`` in evaluation
    mode, of the state validation has just prepared (batch norms from the whole training set), so it is
    comparable with the validation LL. No O(D³) work beyond validation's: relgrad's log|det W| stays cached."""
    ll, n_bad = finite_mean(log_prob_batches(flow, subsample, batch_size))
    return -ll, n_bad


def mean_2se(values: np.ndarray) -> tuple[float, float]:
    """Mean and twice the standard error, ``2·std/sqrt(N)`` with numpy's ddof=0 as in the MAF code; with a
    non-finite value among them, their mean (−inf, or NaN for +inf and −inf) and no error bar (NaN)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        return math.nan, math.nan
    if not np.isfinite(values).all():
        with np.errstate(invalid="ignore"):  # inf − inf in the sum: NaN, said by the value itself
            return float(values.mean()), math.nan
    return float(values.mean()), float(2.0 * values.std() / math.sqrt(n))


def finite_mean(values: np.ndarray) -> tuple[float, int]:
    """``(mean over the finite values, number of non-finite values)``; the mean is NaN when none is finite.

    The validation score: early stopping compares epochs by it, and the count goes into the history, so an
    epoch whose score leaves points out says so.
    """
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    n_bad = int(values.size - ok.sum())
    return (float(values[ok].mean()) if ok.any() else math.nan), n_bad


@torch.no_grad()
def class_log_probs(flow: Flow, rows: Tensor, classes: int, batch_size: int = 2000) -> np.ndarray:
    """(N, K) matrix of log p(x_i | y = k) of a class-conditional flow, as MAF's ``evaluate_logprob`` forms it: the
    model evaluated once per label on every point (``rows`` are ``[x, onehot(y)]``; their own labels are
    replaced): :meth:`~flowbench.models.base.ConditionalFlow.class_log_probs` in batches, float64."""
    return log_prob_batches(flow, rows[:, : rows.shape[1] - classes], batch_size, fn=flow.class_log_probs)


def summarize_conditional(class_lp: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """A class-conditional model's test figures from its (N, K) ``class_lp`` and the true ``labels``:
    per-point log p(x) = logsumexp_y log p(x | y) − log K (a uniform label prior: the number MAF's Table 2
    reports for its conditional columns, ``experiments.evaluate_logprob``), and the record's fields beside it:
    mean log p(x | y) at the true label and the accuracy of argmax_y p(x | y) (MAF's ``experiments.evaluate``),
    each ± 2 SE over test points."""

    n, k = class_lp.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        marginal = logsumexp(class_lp, axis=1) - math.log(k)
    labels = np.asarray(labels, dtype=np.int64)
    at_label = class_lp[np.arange(n), labels]
    correct = (class_lp.argmax(axis=1) == labels).astype(np.float64)
    cond, cond_2se = mean_2se(at_label) if np.isfinite(at_label).all() else (float(at_label.mean()), math.nan)
    acc, acc_2se = mean_2se(correct)
    return marginal, {
        "conditional": True,
        "test_ll_conditional": cond,
        "test_ll_conditional_2se": cond_2se,
        "test_accuracy": acc,
        "test_accuracy_2se": acc_2se,
    }


def evaluate_test(flow: Flow, data: Dataset, test_x: Tensor, batch_size: int = 2000) -> dict[str, Any]:
    """Test log-likelihood (nats) ± 2 SE; for image data also pixel-space LL and bits/pixel."""
    return evaluate_test_points(flow, data, test_x, batch_size)[0]


def evaluate_test_points(
    flow: Flow, data: Dataset, test_x: Tensor, batch_size: int = 2000
) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`evaluate_test`'s record fields and the per-point test log-likelihoods they summarise. A
    class-conditional flow (rows ``[x, onehot(y)]``) is scored as MAF Table 2's conditional columns: log p(x)
    under a uniform label prior, with log p(x | y) and the accuracy beside it (:func:`summarize_conditional`)."""
    classes = int(getattr(flow, "classes", 0) or 0)
    if not classes:
        logp = log_prob_batches(flow, test_x, batch_size)
        return summarize_test(logp, data), logp
    logp, cond = summarize_conditional(class_log_probs(flow, test_x, classes, batch_size), data.test_labels)
    return {**summarize_test(logp, data), **cond}, logp


def summarize_test(logp: np.ndarray, data: Dataset) -> dict[str, Any]:
    """The record's test fields from the per-point test log-likelihoods ``logp`` (see :func:`evaluate_test`)."""
    finite = np.isfinite(logp)
    n_bad = int(logp.size - finite.sum())
    # With a non-finite point the protocol's mean over all points is −inf (its 2 SE undefined); the finite
    # points' go beside it.
    mean, err2se = mean_2se(logp)
    out: dict[str, Any] = {"test_ll": mean, "test_ll_2se": err2se, "n_test": int(logp.size), "n_nonfinite_test": n_bad}
    if n_bad:
        out["test_ll_finite"], out["test_ll_finite_2se"] = mean_2se(logp[finite])
    if data.image:
        pixel = data.pixel_log_prob(logp, data.test)
        pmean, perr2se = mean_2se(pixel)
        out["test_ll_pixel"] = pmean
        out["test_ll_pixel_2se"] = perr2se
        if data.levels is not None:
            out["bits_per_pixel"] = float(data.bits_per_pixel(pmean))
            # bits/pixel is affine in log p, so its error bar is the pixel LL's scaled by 1/(D ln 2).
            out["bits_per_pixel_2se"] = perr2se / (data.dim * math.log(2))
    return out


def spectral_norm_summary(flow: Flow, x: Tensor, n_iter: int = 20) -> tuple[dict[str, Any] | None, str | None]:
    """Spectral norm of the flow's Jacobian ∂z/∂x at the rows of ``x`` (power iteration).

    Returns ``(summary, note)``: the summary is None (with a note saying why) when the computation fails
    for this model.
    """
    was_training = flow.training
    flow.eval()
    classes = int(getattr(flow, "classes", 0) or 0)
    method = "auto"
    if classes:  # a class-conditional flow: ∂z/∂x at each point's own label (rows are [x, onehot(y)])
        x, context = x[:, : x.shape[1] - classes], x[:, x.shape[1] - classes :]
        method = "batched"  # the label rows go with the batch; vmap would see one row's x against all labels

        def fn(inp: Tensor) -> Tensor:
            return flow.transform(inp, context)[0]
    else:

        def fn(inp: Tensor) -> Tensor:
            return flow.transform(inp)[0]

    try:
        norms = jacobian_spectral_norm(fn, x, n_iter=n_iter, method=method).detach().double().cpu().numpy()
    except Exception as e:  # a model whose transform torch.func cannot trace must not lose the whole run
        return None, f"jacobian spectral norm failed: {type(e).__name__}: {e}"
    finally:
        flow.train(was_training)
    if norms.size == 0 or not np.all(np.isfinite(norms)):
        return None, "jacobian spectral norm was not finite"
    return {
        "n_points": int(norms.size),
        "n_iter": n_iter,
        "mean": float(norms.mean()),
        "median": float(np.median(norms)),
        "max": float(norms.max()),
    }, None
