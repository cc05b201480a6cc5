"""Building blocks shared by the model families: MAF-style batch norm, a reverse permutation, masked linear.

References:
    Papamakarios, Pavlakou, Murray. "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017
    (section 3.4 and appendix; batch norm as in the code gpapamak/maf, ml/models/layers.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowbench.errors import ConfigError
from flowbench.models.base import CompositeTransform, Flow, Transform

__all__ = ["BatchNorm", "recompute_batchnorm_stats", "ReversePermutation", "MaskedLinear", "maf_linear_init_"]


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

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


class ReversePermutation(Transform):
    """Reverses the order of the coordinates (volume preserving, its own inverse)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.flip(-1), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z.flip(-1), z.new_zeros(z.shape[0])


class BatchNorm(Transform):
    """Batch normalisation as a flow layer, with the MAF code's semantics.

    ``y = exp(log γ) · (x − m) / sqrt(v) + β``, ``v = variance + eps``,
    ``log|det ∂y/∂x| = Σ_i (log γ_i − ½ log v_i)``.

    Training mode: ``m``, ``v`` are the statistics of the current batch (population variance), treated as
    constants in the log-determinant as in the MAF code. Evaluation mode: the stored ``m``, ``v`` set by
    :meth:`set_stats_from` over the *entire* training set (no running averages). Before the first call the
    stored statistics are ``m = 0``, ``v = 1`` (as in the MAF code). ``inverse`` always uses the stored ones.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("stat_mean", torch.zeros(dim))
        self.register_buffer("stat_var", torch.ones(dim))  # already includes eps

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            var, mean = torch.var_mean(x, dim=0, unbiased=False)
            return mean, var + self.eps
        return self.stat_mean, self.stat_var

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = self._stats(x)
        log_scale = self.log_gamma - 0.5 * torch.log(var)  # shared by y and the log-det: fewer kernels
        y = torch.addcmul(self.beta, x - mean, torch.exp(log_scale))
        return y, log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = self.stat_mean, self.stat_var
        x = (z - self.beta) * torch.exp(-self.log_gamma) * torch.sqrt(var) + mean
        logdet = -(self.log_gamma - 0.5 * torch.log(var)).sum()
        return x, logdet.expand(z.shape[0])

    @torch.no_grad()
    def set_stats_from(self, x: Tensor, chunk: int = 65_536) -> None:
        """Store the mean and population variance (+ eps) of all rows of ``x``.

        Accumulated in float64 in two passes (mean, then squared deviations) so that a float32 training set
        of millions of rows gives the same statistics as a float64 computation.
        """
        if x.dim() != 2 or x.shape[1] != self.dim or x.shape[0] == 0:
            raise ConfigError(f"BatchNorm statistics need a non-empty (N, {self.dim}) tensor; got {tuple(x.shape)}")
        n = x.shape[0]
        total = torch.zeros(self.dim, dtype=torch.float64, device=x.device)
        for i in range(0, n, chunk):
            total += x[i : i + chunk].to(torch.float64).sum(0)
        mean = total / n
        sq = torch.zeros_like(total)
        for i in range(0, n, chunk):
            sq += (x[i : i + chunk].to(torch.float64) - mean).pow(2).sum(0)
        self.stat_mean.copy_(mean)
        self.stat_var.copy_(sq / n + self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


@torch.no_grad()
def recompute_batchnorm_stats(flow: Flow, train_x: Tensor, batch_size: int = 10_000) -> None:
    """Set every :class:`BatchNorm` of ``flow`` from the entire training set, as the MAF code does.

    One pass, layer by layer through ``flow.transform``: the training set is pushed through the layers in
    order (in batches of ``batch_size``, every layer in evaluation mode); each batch-norm layer first takes
    the statistics of its own input, then transforms it with them. This equals a training-mode forward pass
    with the whole training set as one batch. Modules' train/eval flags are restored afterwards.
    """
    bns = [m for m in flow.modules() if isinstance(m, BatchNorm)]
    if not bns:
        return
    t = flow.transform
    steps = list(t.transforms) if isinstance(t, CompositeTransform) else [t]
    direct = {id(s) for s in steps if isinstance(s, BatchNorm)}
    if any(id(b) not in direct for b in bns):
        raise ConfigError(
            "recompute_batchnorm_stats: BatchNorm layers must be direct steps of flow.transform "
            "(a CompositeTransform); nested or base-density batch norm is not supported"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive; got {batch_size}")
    # the training set may live elsewhere (CPU copy, numpy, float64): bring it to the layers' device/dtype
    ref = bns[0].stat_mean
    train_x = torch.as_tensor(train_x).to(device=ref.device, dtype=ref.dtype)
    modes = {m: m.training for m in flow.modules()}
    flow.eval()
    try:
        last = max(i for i, s in enumerate(steps) if isinstance(s, BatchNorm))
        h = train_x
        for i, step in enumerate(steps[: last + 1]):
            if isinstance(step, BatchNorm):
                step.set_stats_from(h)
            if i < last:  # the layers after the last batch norm need no statistics
                h = torch.cat([step(h[j : j + batch_size])[0] for j in range(0, h.shape[0], batch_size)])
    finally:
        for m, mode in modes.items():
            m.train(mode)
