"""Monotonic rational-quadratic splines with identity tails (the elementwise map of neural spline flows).

On ``[−B, B]`` the map is a spline of K monotonic rational-quadratic pieces through K + 1 knots
``(x_k, y_k)`` with derivatives ``d_k > 0`` at the knots (Gregory & Delbourgo 1982). In bin k, with
``ξ = (x − x_k)/w_k``, bin width ``w_k``, height ``h_k`` and slope ``s_k = h_k/w_k``:

    y = y_k + h_k [s_k ξ² + d_k ξ(1 − ξ)] / [s_k + (d_{k+1} + d_k − 2 s_k) ξ(1 − ξ)],
    dy/dx = s_k² [d_{k+1} ξ² + 2 s_k ξ(1 − ξ) + d_k (1 − ξ)²] / [s_k + (d_{k+1} + d_k − 2 s_k) ξ(1 − ξ)]².

Outside ``[−B, B]`` the map is the identity; the boundary derivatives are fixed to 1 so that value and
slope are continuous there. The inverse solves a quadratic ``a ξ² + b ξ + c = 0`` per element, taking the
root in the form ``ξ = 2c / (−b − sqrt(b² − 4ac))``, which does not cancel catastrophically as
``(−b + sqrt(·))/(2a)`` does when ``a`` is small (a nearly linear bin).

Unconstrained network outputs become valid spline parameters as in the authors' code: widths and heights
by a softmax, floored at ``min_bin_width``/``min_bin_height`` (as fractions of 2B); interior derivatives
by ``min_derivative + softplus``.

References:
    Durkan, Bekasov, Murray, Papamakarios. "Neural Spline Flows", NeurIPS 2019, section 3 and appendix A
    (arXiv:1906.04032; code: bayesiains/nsf, nde/transforms/splines/rational_quadratic.py, and nflows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowbench.errors import ConfigError

__all__ = ["MIN_BIN_HEIGHT", "MIN_BIN_WIDTH", "MIN_DERIVATIVE", "rational_quadratic_spline", "spline_param_count"]

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3


def spline_param_count(bins: int) -> int:
    """Unconstrained parameters per transformed coordinate: K widths, K heights, K − 1 interior derivatives."""
    return 3 * bins - 1


def _knots(unnormalized: Tensor, bound: float, min_size: float) -> tuple[Tensor, Tensor]:
    """Knot positions (…, K + 1) on [−B, B] and bin sizes (…, K), each bin at least ``min_size``·2B."""
    k = unnormalized.shape[-1]
    frac = min_size + (1 - min_size * k) * torch.softmax(unnormalized, dim=-1)
    cum = F.pad(torch.cumsum(frac, dim=-1), (1, 0))
    knots = 2 * bound * cum - bound
    # exact end knots: the cumulative sum of a softmax is 1 only up to rounding
    knots = torch.cat(
        [
            knots.new_full(knots.shape[:-1] + (1,), -bound),
            knots[..., 1:-1],
            knots.new_full(knots.shape[:-1] + (1,), bound),
        ],
        dim=-1,
    )
    return knots, knots[..., 1:] - knots[..., :-1]


def rational_quadratic_spline(
    inputs: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    inverse: bool = False,
    tail_bound: float = 3.0,
    min_bin_width: float = MIN_BIN_WIDTH,
    min_bin_height: float = MIN_BIN_HEIGHT,
    min_derivative: float = MIN_DERIVATIVE,
) -> tuple[Tensor, Tensor]:
    """Apply the spline (or its inverse) elementwise; returns ``(outputs, log|d outputs/d inputs|)``.

    Args:
        inputs: any shape ``S``.
        unnormalized_widths, unnormalized_heights: shape ``S + (K,)``.
        unnormalized_derivatives: shape ``S + (K − 1,)`` (the interior knots; the two ends have slope 1).
        inverse: evaluate the inverse map instead (its log-det is that of the inverse).
        tail_bound: B; identity outside ``[−B, B]``.

    The log-determinant is elementwise, shape ``S``. Every element is computed on clamped inputs and the
    identity selected by ``torch.where``, so no boolean indexing (no device sync, static shapes) and no NaN
    reaches the gradient from the branch not taken.
    """
    k = unnormalized_widths.shape[-1]
    if unnormalized_heights.shape[-1] != k or unnormalized_derivatives.shape[-1] != k - 1:
        raise ConfigError(
            f"spline parameters must have K, K and K − 1 entries; got {unnormalized_widths.shape[-1]}, "
            f"{unnormalized_heights.shape[-1]} and {unnormalized_derivatives.shape[-1]}"
        )
    if min_bin_width * k > 1.0 or min_bin_height * k > 1.0:
        raise ConfigError(f"{k} bins cannot each be at least {min_bin_width:g}/{min_bin_height:g} of the interval")
    bound = float(tail_bound)
    inside = (inputs >= -bound) & (inputs <= bound)
    x = inputs.clamp(-bound, bound)

    cumwidths, widths = _knots(unnormalized_widths, bound, min_bin_width)
    cumheights, heights = _knots(unnormalized_heights, bound, min_bin_height)
    ones = unnormalized_derivatives.new_ones(unnormalized_derivatives.shape[:-1] + (1,))
    derivatives = torch.cat([ones, min_derivative + F.softplus(unnormalized_derivatives), ones], dim=-1)

    # bin index: how many interior knots lie at or below x (0 … K − 1); both ends are inclusive
    edges = cumheights if inverse else cumwidths
    idx = (x[..., None] >= edges[..., 1:-1]).sum(-1, keepdim=True)

    def pick(t: Tensor) -> Tensor:
        return t.gather(-1, idx)[..., 0]

    x_k, w = pick(cumwidths), pick(widths)
    y_k, h = pick(cumheights), pick(heights)
    d0, d1 = pick(derivatives), pick(derivatives[..., 1:])
    s = h / w
    curv = d0 + d1 - 2 * s

    if inverse:
        dy = x - y_k
        a = h * (s - d0) + dy * curv
        b = h * d0 - dy * curv
        c = -s * dy
        disc = (b.pow(2) - 4 * a * c).clamp_min(0)  # ≥ 0 in exact arithmetic; rounding can dip below
        xi = (2 * c) / (-b - torch.sqrt(disc))
        out = xi * w + x_k
    else:
        xi = (x - x_k) / w
        out = y_k + h * (s * xi.pow(2) + d0 * xi * (1 - xi)) / (s + curv * xi * (1 - xi))
    t = xi * (1 - xi)
    denom = s + curv * t
    logabsdet = 2 * torch.log(s) + torch.log(d1 * xi.pow(2) + 2 * s * t + d0 * (1 - xi).pow(2)) - 2 * torch.log(denom)
    if inverse:
        logabsdet = -logabsdet
    outputs = torch.where(inside, out, inputs)
    logabsdet = torch.where(inside, logabsdet, torch.zeros_like(logabsdet))
    return outputs, logabsdet
