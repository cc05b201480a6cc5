"""Building blocks shared by the model families: MAF-style batch norm, a reverse permutation, masked linear.

References:
    Papamakarios, Pavlakou, Murray. "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017
    (section 3.4 and appendix; batch norm as in the code gpapamak/maf, ml/models/layers.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowbench.errors import InputError
from flowbench.models.base import Transform, recompute_batchnorm_stats

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx

__all__ = [
    "BatchNorm",
    "full_set_stats",
    "recompute_batchnorm_stats",
    "Linear",
    "MaskedLinear",
    "linear",
    "maf_linear_init_",
]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` that also takes R runs' weights at once: ``x`` (R, B, I), ``weight`` (R, O, I), ``bias`` (R, O).

    The layers of the stackable families call this, so one module evaluates a single run (``F.linear``, as
    before) or a stack of R runs whose parameters carry a leading run axis (one batched product; stacked runs,
    :mod:`flowbench.models.stacking`).
    """
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    return _StackedLinear.apply(x, weight, bias)


class _StackedLinear(torch.autograd.Function):
    """``x Wᵀ + b`` for R runs, (R, B, I) × (R, O, I) → (R, B, O), whose backward forms ``∂W = ∂Yᵀ x`` in W's own
    (R, O, I) layout. (Autograd's rule for the transposed operand of a batched product returns a transposed
    gradient, on which the mask multiply and the accumulation run 5–7× slower on a CPU.)"""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, weight.transpose(-1, -2))
        return torch.baddbmm(bias.unsqueeze(-2), x, weight.transpose(-1, -2))

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        gx = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(grad.transpose(-1, -2), x) if ctx.needs_input_grad[1] else None
        gb = grad.sum(-2) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def maf_linear_init_(weight: Tensor, bias: Tensor | None) -> None:
    """MAF-code initialisation: W ~ N(0, 1)/sqrt(fan_in + 1), zero biases.

    ``weight`` is stored as ``(out, in)`` (``F.linear`` convention), so fan_in is ``weight.shape[-1]``.
    """
    with torch.no_grad():
        weight.normal_().div_(math.sqrt(weight.shape[-1] + 1))
        if bias is not None:
            bias.zero_()


class MaskedLinear(nn.Module):
    """``y = x (W ⊙ M)ᵀ + b`` with a fixed binary mask ``M`` (a buffer, so ``.to()`` moves it).

    The full weight matrix is stored (masked entries too, as in the MAF code); they receive zero gradient.
    """

    def __init__(self, mask: Tensor, bias: bool = True):
        super().__init__()
        out_features, in_features = mask.shape
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        # Not persistent: the mask is a function of the architecture, rebuilt by the constructor.
        self.register_buffer("mask", mask.to(torch.get_default_dtype()), persistent=False)
        maf_linear_init_(self.weight, self.bias)

    #: forward broadcasts over a leading run axis of its parameters and input (see :func:`linear`)
    stacks = True

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight * self.mask, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


@torch.no_grad()
def full_set_stats(x: Tensor, chunk: int = 65_536) -> tuple[Tensor, Tensor]:
    """Mean and population variance over the rows (axis −2) of ``x``, (N, D) or R runs' (R, N, D), in float64.

    Two passes (mean, then squared deviations) accumulated in float64 over chunks of rows, so that a float32
    training set of millions of rows gives the same statistics as a float64 computation.
    """
    n = x.shape[-2]
    total = sum(x[..., i : i + chunk, :].to(torch.float64).sum(-2) for i in range(0, n, chunk))
    mean = total / n
    sq = sum(
        (x[..., i : i + chunk, :].to(torch.float64) - mean.unsqueeze(-2)).pow(2).sum(-2) for i in range(0, n, chunk)
    )
    return mean, sq / n


class Linear(nn.Linear):
    """``nn.Linear`` whose forward also evaluates R stacked runs at once (see :func:`linear`)."""

    stacks = True

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class BatchNorm(Transform):
    """Batch normalisation as a flow layer, with the MAF code's semantics.

    ``y = exp(log γ) · (x − m) / sqrt(v) + β``, ``v = variance + eps``,
    ``log|det ∂y/∂x| = Σ_i (log γ_i − ½ log v_i)``.

    Training mode: ``m``, ``v`` are the statistics of the current batch (population variance), treated as
    constants in the log-determinant as in the MAF code. Evaluation mode: the stored ``m``, ``v`` set by
    :meth:`set_stats_from` over the *entire* training set (no running averages). Before the first call the
    stored statistics are ``m = 0``, ``v = 1`` (as in the MAF code). ``inverse`` always uses the stored ones.
    ``forward`` also evaluates R stacked runs: parameters (R, D), input (R, B, D), statistics per run.
    """

    stacks = True

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("stat_mean", torch.zeros(dim))
        self.register_buffer("stat_var", torch.ones(dim))  # already includes eps

    def _centred(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x − m, v): over the batch axis (of each run, when stacked) in training, else the stored ones.

        Stacked runs take two passes (mean, then the mean squared deviation): ``torch.var_mean``'s Welford
        kernel took 565 µs for eight runs' (100, 64) batches on one CPU thread against 78 µs. One run keeps
        ``var_mean`` (its records stay bit for bit; at D = 6 the extra autograd nodes cost more than it saves).
        """
        if not self.training:
            return x - self.stat_mean.unsqueeze(-2), self.stat_var.unsqueeze(-2)  # (R, 1, D) when stacked
        if x.dim() == 2:
            var, mean = torch.var_mean(x, dim=0, keepdim=True, unbiased=False)
            return x - mean, var + self.eps
        xc = x - x.mean(-2, keepdim=True)
        return xc, xc.square().mean(-2, keepdim=True) + self.eps

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xc, var = self._centred(x)
        # unsqueeze: a stacked run's (R, D) parameters meet its (R, 1, D) statistics (a no-op for one run)
        log_scale = self.log_gamma.unsqueeze(-2) - 0.5 * torch.log(var)  # shared by y and the log-det
        y = torch.addcmul(self.beta.unsqueeze(-2), xc, torch.exp(log_scale))
        return y, log_scale.sum(-1).expand(x.shape[:-1])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = self.stat_mean, self.stat_var
        x = (z - self.beta) * torch.exp(-self.log_gamma) * torch.sqrt(var) + mean
        logdet = -(self.log_gamma - 0.5 * torch.log(var)).sum()
        return x, logdet.expand(z.shape[0])

    @torch.no_grad()
    def set_stats_from(self, x: Tensor, chunk: int = 65_536) -> None:
        """Store the mean and population variance (+ eps) of all rows of ``x``.

        Accumulated in float64 in two passes (:func:`full_set_stats`).
        """
        if x.dim() != 2 or x.shape[1] != self.dim or x.shape[0] == 0:
            raise InputError(f"BatchNorm statistics need a non-empty (N, {self.dim}) tensor; got {tuple(x.shape)}")
        mean, var = full_set_stats(x)
        self.stat_mean.copy_(mean)
        self.stat_var.copy_(var + self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"
