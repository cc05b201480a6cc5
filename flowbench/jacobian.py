"""Jacobian tools: per-example spectral norm, an empirical Lipschitz estimate, and log|det J| by autograd.

``fn`` always maps a batch ``(batch, D_in) → (batch, D_out)`` and must be *batch-independent* (row ``i`` of
the output depends only on row ``i`` of the input; flows in eval mode are). The Jacobian of the batched map is
then block-diagonal, with block ``i`` = ∂fn(x)_i/∂x_i.

The spectral norm ‖J‖₂ (largest singular value) is the local Lipschitz constant in the Euclidean norm: a
function whose Jacobian has ‖J(x)‖₂ ≤ L everywhere is L-Lipschitz, and the supremum of ‖J(x)‖₂ is its
Lipschitz constant (Virmaux & Scaman, "Lipschitz regularity of deep neural networks: analysis and efficient
estimation", NeurIPS 2018, arXiv 1805.10965, which also estimates it by power iteration through automatic
differentiation). It is estimated by power iteration on JᵀJ (Golub & Van Loan, *Matrix Computations*) using
only Jacobian-vector products (forward mode, ``torch.func.jvp``) and vector-Jacobian products (reverse mode,
``torch.func.vjp``), vmapped over examples, so the Jacobian is never formed: the cost is ``2·n_iter`` passes
through ``fn`` whatever D is.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor

from flowbench.errors import ConfigError, InputError

__all__ = ["jacobian_spectral_norm", "lipschitz_bound", "logdet_autograd"]

Fn = Callable[[Tensor], Tensor]


def _check_batch(x: Tensor, name: str = "x") -> None:
    if x.dim() != 2 or x.shape[0] == 0:
        raise InputError(f"{name} must be a non-empty batch of shape (batch, D); got {tuple(x.shape)}")


@contextlib.contextmanager
def _quiet_jit_script() -> Iterator[None]:
    """Hide the ``torch.jit.script`` deprecation notice that torch's own forward-mode code emits on the first
    ``torch.func.jvp`` (it printed on every run, even with ``--quiet``); other warnings still show."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=category)
        yield


def _jvp(fn: Fn, primals: tuple, tangents: tuple):
    with _quiet_jit_script():
        return torch.func.jvp(fn, primals, tangents)


def _make_jtj(fn: Fn, x: Tensor, method: str) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """Return ``v ↦ (J v, Jᵀ J v)`` per example, for ``v`` of shape (batch, D_in)."""
    if method == "vmap":

        def single(xi: Tensor) -> Tensor:  # one example, as the batch-of-one fn expects
            return fn(xi.unsqueeze(0)).squeeze(0)

        def step(xi: Tensor, vi: Tensor) -> tuple[Tensor, Tensor]:
            _, jv = _jvp(single, (xi,), (vi,))
            _, vjp_fn = torch.func.vjp(single, xi)
            return jv, vjp_fn(jv)[0]

        batched = torch.func.vmap(step)
        return lambda v: batched(x, v)

    # "batched": the batched map's Jacobian is block-diagonal, so one jvp/vjp of the whole batch applies
    # every block at once. Used when fn cannot be vmapped (data-dependent Python control flow). x is fixed,
    # so the reverse pass is recorded once and its vjp reused by every iteration.
    _, vjp_fn = torch.func.vjp(fn, x)

    def step_batched(v: Tensor) -> tuple[Tensor, Tensor]:
        _, jv = _jvp(fn, (x,), (v,))
        return jv, vjp_fn(jv)[0]

    return step_batched


@torch.no_grad()
def _power_iteration(jtj: Callable[[Tensor], tuple[Tensor, Tensor]], v: Tensor, n_iter: int) -> Tensor:
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    sigma = v.new_zeros(v.shape[0])
    for _ in range(n_iter):
        jv, jtjv = jtj(v)
        sigma = jv.flatten(1).norm(dim=1)  # ‖J v‖ with ‖v‖ = 1: a lower bound that increases to σ_max
        norm = jtjv.norm(dim=1, keepdim=True)
        # A zero Jacobian (norm 0) keeps v; sigma is then correctly 0.
        v = torch.where(norm > 0, jtjv / norm.clamp_min(1e-30), v)
    return sigma


def jacobian_spectral_norm(fn: Fn, x: Tensor, n_iter: int = 20, method: str = "auto", seed: int = 0) -> Tensor:
    """Per-example spectral norm ‖∂fn(x_i)/∂x_i‖₂ by power iteration with JVP/VJP, shape ``(batch,)``.

    Args:
        fn: batch-independent map ``(batch, D_in) → (batch, D_out)`` (put flows in eval mode first).
        x: points, shape ``(batch, D_in)``.
        n_iter: power iterations; each costs one JVP and one VJP. The estimate ``‖J v‖`` never exceeds the
            true norm and converges geometrically with ratio (σ₂/σ₁)².
        method: ``"vmap"`` (per example with ``torch.func.vmap``), ``"batched"`` (one jvp/vjp of the whole
            batch, exact for batch-independent ``fn``) or ``"auto"`` (vmap, falling back to batched when
            ``fn`` uses operations vmap cannot trace).
        seed: seed of the random start vectors (a local generator: the global RNG is not touched).

    References:
        Jacobian/Lipschitz notes (power method on JᵀJ through implicit matrix-vector products).
    """
    _check_batch(x)
    if n_iter < 1:
        raise ConfigError(f"n_iter must be >= 1; got {n_iter}")
    if method not in ("auto", "vmap", "batched"):
        raise ConfigError(f"method must be auto, vmap or batched; got {method!r}")
    x = x.detach()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v0 = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    if method in ("auto", "vmap"):
        try:
            return _power_iteration(_make_jtj(fn, x, "vmap"), v0, n_iter)
        except (RuntimeError, NotImplementedError, ConfigError, InputError):
            if method == "vmap":
                raise
    return _power_iteration(_make_jtj(fn, x, "batched"), v0, n_iter)


def lipschitz_bound(fn: Fn, x: Tensor, n_iter: int = 20, method: str = "auto") -> float:
    """Empirical Lipschitz constant of ``fn`` over the points ``x``: ``max_i ‖J(x_i)‖₂``.

    This is the largest *local* Lipschitz constant seen at the sample; it certifies a bound on the whole
    region only as far as the points cover it (use a dense grid for 1-D/2-D certificates).
    """
    return float(jacobian_spectral_norm(fn, x, n_iter=n_iter, method=method).max())


def logdet_autograd(fn: Fn, x: Tensor, create_graph: bool = False) -> Tensor:
    """log|det ∂fn(x_i)/∂x_i| per example, shape ``(batch,)``, from the explicit autograd Jacobian.

    Costs D backward passes and O(B·D²) memory: meant for tests and small D (checking a flow's analytic
    log-determinant). ``fn`` must be square (D_out = D_in) and batch-independent.
    """
    _check_batch(x)
    d = x.shape[1]

    def summed(inp: Tensor) -> Tensor:
        # Summing over the batch turns the block-diagonal batched Jacobian into the stack of its blocks.
        return fn(inp).sum(0)

    jac = torch.autograd.functional.jacobian(summed, x, create_graph=create_graph)  # (D_out, B, D_in)
    if jac.shape[0] != d:
        raise InputError(f"log|det J| needs a square Jacobian; fn maps D={d} to D={jac.shape[0]}")
    return torch.linalg.slogdet(jac.permute(1, 0, 2)).logabsdet
