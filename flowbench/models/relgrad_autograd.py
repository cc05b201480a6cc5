"""The custom autograd Functions of the relgrad dense flow (:mod:`flowbench.models.relgrad`).

Each backward returns the (projected) relative gradient directly instead of the Euclidean one, so that
nothing is left to do after ``backward`` (derivation and conventions in the relgrad module docstring):

- :class:`RelativeDense` — one layer ``Y = h Wᵀ + b``; backward gives ``Δᵀ (Y W)`` and ``Δᵀ (Y b + 1)``.
- :class:`RelativeLogDet` — Σ_k log|det W_k| as a node whose backward adds ``(Σ upstream) · W_k``.
- :class:`RelgradNet` — the whole training-time forward in one node (the training hot path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx

__all__ = ["TANH_A", "TANH_B", "RelativeDense", "RelativeLogDet", "RelgradNet"]

TANH_A, TANH_B = 1.0, 0.1  # tanh(a·y) + b·y, fixed to these values in the paper (H.3)


class RelativeDense(torch.autograd.Function):
    """Y = h Wᵀ + b whose backward returns the (projected) relative gradient for W and b (see relgrad.py).

    New-style Function (setup_context, vmap rule, jvp) so that torch.func tools (Jacobians w.r.t. x) work.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Tensor, Tensor, Tensor | None], output: Tensor) -> None:
        h, weight, bias = inputs
        ctx.save_for_backward(weight, bias, output)
        ctx.h = h  # only for jvp; a reference, not a copy

    @staticmethod
    def backward(ctx: FunctionCtx, dy: Tensor) -> tuple[Tensor | None, Tensor, Tensor | None]:
        weight, bias, y = ctx.saved_tensors
        grad_h = grad_b = None
        if ctx.needs_input_grad[0]:
            # One (2B)×D×D product instead of two B×D×D ones: better GEMM efficiency at small batch.
            both = torch.cat([dy, y]) @ weight
            grad_h, yw = both[: dy.shape[0]], both[dy.shape[0] :]
        else:
            yw = y @ weight
        grad_w = dy.t() @ yw  # Δᵀ (Y W)
        if bias is not None:
            grad_b = dy.t() @ torch.addmv(torch.ones_like(y[:, 0]), y, bias)  # Δᵀ (Y b + 1)
        return grad_h, grad_w, grad_b

    @staticmethod
    def jvp(ctx: FunctionCtx, dh: Tensor | None, dw: Tensor | None, db: Tensor | None) -> Tensor:
        weight, _, _ = ctx.saved_tensors
        out = dh @ weight.t() if dh is not None else torch.zeros_like(ctx.h @ weight.t())
        if dw is not None:
            out = out + ctx.h @ dw.t()
        if db is not None:
            out = out + db
        return out


class RelativeLogDet(torch.autograd.Function):
    """Σ_k log|det W_k| broadcast to the batch, with the relative gradient W_k (no inverse, no determinant).

    ``value`` is the cached exact value (evaluation) or 0.0 (training: the value is not needed for the
    gradient, so ``train_log_prob`` leaves it out). Constant in x, so its tangent w.r.t. x is zero.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(ref: Tensor, value: float, *weights: Tensor) -> Tensor:
        return ref.new_full(ref.shape[:-1], value)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Any, ...], output: Tensor) -> None:
        # inputs = (ref: Tensor, value: float, *weights: Tensor)
        ctx.save_for_backward(*inputs[2:])
        ctx.ref = inputs[0]

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        s = grad.sum()
        return (None, None, *(s * w for w in ctx.saved_tensors))

    @staticmethod
    def jvp(ctx: FunctionCtx, dref: Tensor | None, dvalue: None, *dweights: Tensor | None) -> Tensor:
        return torch.zeros_like(ctx.ref[..., 0])


def activation_step(y: Tensor, activation: str, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(s(y), s'(y), s''(y)/s'(y))`` of relgrad's activation, each computed once for forward and backward
    (shared by :class:`RelgradNet` and the stacked version in :mod:`flowbench.models.stacking`)."""
    if activation == "tanh":
        a = torch.tanh(TANH_A * y)
        h = torch.add(a, y, alpha=TANH_B)
        sech2 = 1 - a * a
        d = sech2.mul(TANH_A).add_(TANH_B)
        return h, d, sech2.mul_(a).mul_(-2 * TANH_A * TANH_A).div_(d)
    a = torch.sigmoid(y)
    h = F.softplus(y).mul_(1 - alpha).add_(y, alpha=alpha)
    d = a.mul(1 - alpha).add_(alpha)
    return h, d, (1 - a).mul_(a).mul_(1 - alpha).div_(d)  # s''/s' = (1−α)σ(1−σ)/s'


def _affine(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``h Wᵀ + b`` for one run, (B, D), or R runs, (R, B, D) with (R, D, D) weights."""
    wt = w.transpose(-1, -2)
    if b is None:
        return h @ wt
    return torch.addmm(b, h, wt) if h.dim() == 2 else torch.baddbmm(b.unsqueeze(-2), h, wt)


def net_forward(
    ctx: FunctionCtx, x: Tensor, activation: str, alpha: float, n: int, bias_logdet: bool, params: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """The forward of :class:`RelgradNet` (one run) and of its stacked version (a leading run axis on ``x`` and
    every parameter): ``(z, Σ_k<L Σ_i log s'(y_k,i))``, with what the backward needs saved on ``ctx``."""
    weights, biases = params[:n], params[n:] if len(params) > n else [None] * n
    ys, auxs = [], []
    ld = x.new_zeros(x.shape[:-1])
    h = x
    for k in range(n):
        y = _affine(h, weights[k], biases[k])
        ys.append(y)
        if k < n - 1:
            h, d, curv = activation_step(y, activation, alpha)
            ld += d.log().sum(-1)
            auxs.append((d, curv))
        else:
            h = y
    ctx.n, ctx.auxs = n, auxs
    ctx.has_bias, ctx.bias_logdet = biases[0] is not None, bias_logdet
    ctx.save_for_backward(*weights, *(b for b in biases if b is not None), *ys)
    return h, ld


def net_saved(ctx: FunctionCtx) -> tuple[tuple[Tensor, ...], Sequence[Tensor | None], tuple[Tensor, ...]]:
    """(weights, biases or Nones, pre-activations) that :func:`net_forward` saved."""
    n, saved = ctx.n, ctx.saved_tensors
    if ctx.has_bias:
        return saved[:n], saved[n : 2 * n], saved[2 * n :]
    return saved[:n], [None] * n, saved[n:]


#: Devices where the backward reads each run's log-det weight on the host (free there) to fuse it into one addmm
#: per run; elsewhere (CUDA) it stays on the device, no sync (tests empty it to cover that path).
HOST_SCALARS = ("cpu",)


def _t(a: Tensor) -> Tensor:
    return a.transpose(-1, -2)


def net_backward(ctx: FunctionCtx, dz: Tensor | None, dld: Tensor | None) -> tuple[Tensor | None, ...]:
    """The relative-gradient backward of :func:`net_forward`, one code for one run and for R stacked runs: a
    single run is handled as a stack of one (its tensors viewed with a run axis of 1).

    Run r receives ``Δ_rᵀ (Y_r W_r) + (Σ_i ∂loss/∂ld_ri) W_r`` for each weight and ``Δ_rᵀ (Y_r b_r + 1)`` for
    each bias (plus ``(Σ_i ∂loss/∂ld_ri) b_r`` with ``bias_logdet``): Gresele et al. 2020, section 4 and
    appendix F. Per layer one (R, 2B, D) product forms Δ·W and Y·W together; on the CPU each run's weight
    gradient is one fused addmm.
    """
    n = ctx.n
    weights, biases, ys = net_saved(ctx)
    auxs = ctx.auxs
    single = weights[0].dim() == 2
    if single:

        def run_axis(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.unsqueeze(0)

        weights, biases, ys = map(run_axis, weights), [run_axis(b) for b in biases], map(run_axis, ys)
        weights, ys = list(weights), list(ys)
        auxs = [(run_axis(d), run_axis(c)) for d, c in auxs]
        dz, dld = run_axis(dz), run_axis(dld)
    gws, gbs = [None] * n, [None] * n
    s = None if dld is None else dld.sum(-1)  # (R,): Σ_i ∂loss/∂logdet_i per run
    s_host = s.tolist() if s is not None and s.device.type in HOST_SCALARS else None  # no sync on CUDA
    delta = torch.zeros_like(ys[-1]) if dz is None else dz
    gh = None
    for k in reversed(range(n)):
        w, y = weights[k], ys[k]
        rows = y.shape[-2]
        if k > 0 or ctx.needs_input_grad[0]:
            both = torch.cat([delta, y], dim=-2) @ w  # one (R, 2B, D) product for Δ·W and Y·W
            gh, yw = both[:, :rows], both[:, rows:]
        else:
            gh, yw = None, y @ w
        if s_host is not None:  # CPU: Δᵀ (Y W) + s_r·W in one addmm per run
            gws[k] = torch.empty_like(w)
            for r, s_r in enumerate(s_host):
                torch.addmm(w[r], delta[r].t(), yw[r], beta=s_r, out=gws[k][r])
        else:
            gw = _t(delta) @ yw  # Δᵀ (Y W)
            gws[k] = gw if s is None else gw.addcmul_(w, s[:, None, None])
        if biases[k] is not None:
            u = torch.baddbmm(torch.ones_like(y[..., :1]), y, biases[k].unsqueeze(-1))  # Y b + 1, (R, B, 1)
            gbs[k] = (_t(delta) @ u).squeeze(-1)
            if ctx.bias_logdet and s is not None:
                gbs[k] = gbs[k] + s[:, None] * biases[k]
        if k > 0:
            d, curv = auxs[k - 1]
            delta = gh.mul_(d)  # gh is a private slice of `both`: in place is safe
            if dld is not None:  # + ∂loss/∂ld · ∂ log s'(y)/∂y
                delta = delta.addcmul_(dld.unsqueeze(-1), curv)
    grads = gws + (gbs if ctx.has_bias else [])
    if single:
        gh = None if gh is None else gh.squeeze(0)
        grads = [None if g is None else g.squeeze(0) for g in grads]
    return (gh if ctx.needs_input_grad[0] else None, None, None, None, None, *grads)


class RelgradNet(torch.autograd.Function):
    """The whole training-time forward (all layers, activations, Σ log s') in one autograd node, for one run or
    R stacked runs (a leading run axis on ``x`` and every parameter).

    Training hot path (relative mode only): no per-op autograd bookkeeping, each hidden activation's
    sigmoid/tanh computed once and reused in backward, one (2B)×D×D product for [Δ; Y]·W per layer, and the
    log-det's relative gradient (Σ_i ∂loss/∂logdet_i)·W folded into the same backward (:func:`net_backward`).
    Inputs h are not saved: the relative gradient needs only Y and Δ. Returns (z, Σ_k<L Σ_i log s'(y_k,i)).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, activation: str, alpha: float, n: int, bias_logdet: bool, *params: Tensor
    ) -> tuple[Tensor, Tensor]:
        return net_forward(ctx, x, activation, alpha, n, bias_logdet, params)

    @staticmethod
    def backward(ctx: FunctionCtx, dz: Tensor | None, dld: Tensor | None) -> tuple[Tensor | None, ...]:
        return net_backward(ctx, dz, dld)
