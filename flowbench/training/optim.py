"""Opt-in reproductions of reference codes' optimiser quirks (issue 13); flowbench's default is torch's Adam.

:class:`EpochStepAdam` is the relgrad authors' training loop (Gresele et al. 2020; code
fissoreg/relative-gradient-jacobian, ``experiments/training.py``): it calls jax's
``optimizers.adam`` update as ``opt_update(i, grads, opt_state)`` with ``i`` the 0-based *epoch*, not the
step, so the bias correction is ``1 − βᵢ⁺¹`` with a count that stays fixed for a whole epoch. In the first
epochs the correction of m and v is then far from 1 long after Adam's own count would have made it so, and
the steps are smaller (2–7× on MNIST at batch 10, per issue 13). Their published numbers were made this way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

__all__ = ["EpochStepAdam"]


class EpochStepAdam(torch.optim.Optimizer):
    """Adam whose bias-correction count is :attr:`epoch` (1-based; jax's ``i + 1``), set by the trainer.

    Update, as ``jax.experimental.optimizers.adam``: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
    ``x ← x − lr · (m / (1−β₁ᵗ)) / (sqrt(v / (1−β₂ᵗ)) + ε)`` with ``t = epoch``. ``weight_decay`` adds
    ``weight_decay·x`` to g first, as torch's Adam does (the MAF protocol's L2 term; the jax code has none).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.epoch = 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.epoch
        for group in self.param_groups:
            b1, b2 = group["betas"]
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.addcdiv_(m / bc1, (v / bc2).sqrt_().add_(group["eps"]), value=-group["lr"])
        return loss
