"""JacNet: learn a function by learning its Jacobian and integrating it (Lorraine & Hossain 2019).

    ŷ(x) = y₀ + ∫₀¹ J_θ(c(t)) c′(t) dt,    c(t) = x₀ + t (x − x₀)   (straight path, x₀ = 0)

``J_θ`` is a one-hidden-layer network whose *output activation* gives the learned function its structure:

* ``invertible``: ``A Aᵀ + εI`` (positive definite ⇒ non-zero determinant ⇒ invertible; paper §4.2),
* ``lipschitz``: ``k·tanh(A)`` elementwise (every derivative in [−k, k]; in 1-D the function is k-Lipschitz),
* ``unconstrained``: ``A`` (the baseline).

The integral is an ODE in t solved with torchdiffeq's adaptive dopri5, batched over x and differentiated
through the solver. The inverse of an invertible JacNet integrates ``dx/dt = J_θ(x)⁻¹ (y − y₀)`` along the
straight output path (paper §4.3).

For d_x > 1 a learned J need not be conservative (the gradient of anything), so ŷ depends on the path
(paper §4.5); :func:`path_gap` measures it with a second, bent path.

References:
    J. Lorraine, S. Hossain. JacNet: Learning Functions with Structured Jacobians. INNF workshop, ICML 2019.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from flowbench.errors import ConfigError, InverseNotAvailable
from flowbench.jacobian import lipschitz_bound
from flowbench.sanity.common import QUIET, Progress

ACTIVATIONS = ("invertible", "lipschitz", "unconstrained")
#: Solver options: the max-norm makes the step-size control per point (torchdiffeq's default RMS over the
#: batched state lets a few badly resolved points hide among many easy ones).
SOLVER_OPTIONS = {"norm": lambda err: err.abs().max()}
PATHS = ("straight", "bent")


class JacNet(nn.Module):
    """A function ``R^{d_x} → R^{d_y}`` represented by its Jacobian network and an initial condition.

    Args:
        d_x, d_y: input and output dimension (``invertible`` needs d_x = d_y).
        hidden: width of the single hidden layer (64 in the paper).
        activation: output activation, one of :data:`ACTIVATIONS`.
        k: Lipschitz constant for ``lipschitz``.
        eps: the εI of ``invertible`` (1e-4 in the paper, 1e-3 in the reference code).
        x0, y0: the initial condition (x₀, y₀ = y(x₀)); zeros by default.
    """

    def __init__(
        self,
        d_x: int = 1,
        d_y: int = 1,
        hidden: int = 64,
        activation: str = "unconstrained",
        k: float = 1.0,
        eps: float = 1e-4,
        x0: Tensor | None = None,
        y0: Tensor | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown JacNet activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if activation == "invertible" and d_x != d_y:
            raise ConfigError(f"an invertible JacNet needs d_x = d_y; got d_x={d_x}, d_y={d_y}")
        if k <= 0 or eps <= 0:
            raise ConfigError(f"k and eps must be positive; got k={k}, eps={eps}")
        self.d_x, self.d_y, self.activation, self.k, self.eps = d_x, d_y, activation, float(k), float(eps)
        # tanh hidden units keep J smooth (analytic), which the adaptive solver and quadrature both like.
        self.net = nn.Sequential(nn.Linear(d_x, hidden), nn.Tanh(), nn.Linear(hidden, d_y * d_x))
        self.register_buffer("x0", torch.zeros(d_x) if x0 is None else torch.as_tensor(x0).reshape(d_x).clone())
        self.register_buffer("y0", torch.zeros(d_y) if y0 is None else torch.as_tensor(y0).reshape(d_y).clone())
        self.nfe = 0  # ODE right-hand-side evaluations since the last reset (the solver-cost metric)

    # -- the Jacobian --------------------------------------------------------------------------------
    def raw(self, x: Tensor) -> Tensor:
        """The network output before the structuring activation, shape (batch, d_y, d_x)."""
        return self.net(x).reshape(x.shape[0], self.d_y, self.d_x)

    def jacobian(self, x: Tensor) -> Tensor:
        """J_θ(x) after the output activation, shape (batch, d_y, d_x)."""
        a = self.raw(x)
        if self.activation == "invertible":
            eye = torch.eye(self.d_x, dtype=a.dtype, device=a.device)
            return a @ a.transpose(1, 2) + self.eps * eye
        if self.activation == "lipschitz":
            return self.k * torch.tanh(a)
        return a

    # -- the function ----------------------------------------------------------------------------------
    def _path(self, kind: str, x: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        d = x - self.x0
        if kind == "straight":
            return lambda t: (self.x0 + t * d, d)
        if kind == "bent":
            # c(t) = x₀ + t·d + t(1−t)·b: same end points, different route. b rotates d by 90° in the first
            # two coordinates (d_x ≥ 2); in 1-D it overshoots along the line (1-D fields are conservative).
            b = torch.cat([-d[:, 1:2], d[:, 0:1], d[:, 2:]], 1) if self.d_x >= 2 else d
            return lambda t: (self.x0 + t * d + t * (1 - t) * b, d + (1 - 2 * t) * b)
        raise ConfigError(f"unknown path {kind!r}; choose one of {', '.join(PATHS)}")

    def forward(self, x: Tensor, rtol: float = 1e-7, atol: float = 1e-7, path: str = "straight") -> Tensor:
        """ŷ(x), shape (batch, d_y), by solving dy/dt = J_θ(c(t)) c′(t), y(0) = y₀ with dopri5."""
        if x.dim() != 2 or x.shape[1] != self.d_x:
            raise ConfigError(f"x must have shape (batch, {self.d_x}); got {tuple(x.shape)}")
        c = self._path(path, x)

        def rhs(t: Tensor, y: Tensor) -> Tensor:
            self.nfe += 1
            point, velocity = c(t)
            return (self.jacobian(point) @ velocity.unsqueeze(-1)).squeeze(-1)

        y0 = self.y0.expand(x.shape[0], self.d_y)
        t = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        return odeint(rhs, y0, t, rtol=rtol, atol=atol, method="dopri5", options=SOLVER_OPTIONS)[-1]

    def quadrature(self, x: Tensor, nodes: int = 64) -> Tensor:
        """ŷ(x) on the straight path by Gauss–Legendre quadrature: solver-free and batch-independent, so
        ``torch.func`` can differentiate it (used for the Lipschitz certificate)."""
        t_np, w_np = np.polynomial.legendre.leggauss(nodes)
        t = torch.as_tensor((t_np + 1) / 2, dtype=x.dtype, device=x.device)
        w = torch.as_tensor(w_np / 2, dtype=x.dtype, device=x.device)
        d = x - self.x0  # (B, d_x)
        pts = self.x0 + t[:, None, None] * d  # (n, B, d_x)
        jac = self.jacobian(pts.reshape(-1, self.d_x)).reshape(nodes, x.shape[0], self.d_y, self.d_x)
        return self.y0 + torch.einsum("n,nbij,bj->bi", w, jac, d)

    def inverse(self, y: Tensor, rtol: float = 1e-7, atol: float = 1e-7) -> Tensor:
        """x with ŷ(x) = y: solve dx/dt = J_θ(x)⁻¹ (y − y₀), x(0) = x₀ along the straight output path.

        In 1-D this inverts :meth:`forward` exactly (up to the solver). For d > 1 it does so only where J is
        conservative: otherwise forward (straight path in x) and inverse (straight path in y) integrate
        along different routes (see :func:`path_gap`).
        """
        if self.activation != "invertible":
            raise InverseNotAvailable(
                f"a JacNet with the {self.activation!r} output activation is not guaranteed invertible; "
                "use activation='invertible'"
            )
        if y.dim() != 2 or y.shape[1] != self.d_y:
            raise ConfigError(f"y must have shape (batch, {self.d_y}); got {tuple(y.shape)}")
        dy = y - self.y0

        def rhs(t: Tensor, x: Tensor) -> Tensor:
            self.nfe += 1
            return torch.linalg.solve(self.jacobian(x), dy.unsqueeze(-1)).squeeze(-1)

        t = torch.tensor([0.0, 1.0], dtype=y.dtype, device=y.device)
        return odeint(
            rhs, self.x0.expand(y.shape[0], self.d_x), t, rtol=rtol, atol=atol, method="dopri5", options=SOLVER_OPTIONS
        )[-1]


@dataclass
class ToleranceSchedule:
    """Tolerance annealing (paper §4.4): start loose, halve rtol = atol whenever the loss is below it.

    ``history`` holds the tolerance used at each iteration, in order.
    """

    tol: float = 0.1
    factor: float = 0.5
    history: list[float] = field(default_factory=list)

    def step(self, loss: float) -> float:
        """Record the tolerance just used; halve it if ``loss < tol``. Returns the next tolerance."""
        self.history.append(self.tol)
        if loss < self.tol:
            self.tol *= self.factor
        return self.tol


def train_jacnet(
    model: JacNet,
    x: Tensor,
    y: Tensor,
    iters: int = 50,
    lr: float = 0.01,
    tol: float = 0.1,
    anneal: bool = True,
    progress: Progress = QUIET,
    desc: str = "JacNet",
) -> dict[str, list[float]]:
    """Full-batch Adam on the mean error ‖ŷ − y‖ (paper §5); returns the per-iteration history.

    With ``anneal`` the solver tolerance follows :class:`ToleranceSchedule` from ``tol``; otherwise it stays.
    ``progress`` shows the iterations under a bar labelled ``desc``.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = ToleranceSchedule(tol)
    loss_hist, nfe_hist = [], []
    bar = progress.range(iters, desc)
    for _ in bar:
        model.nfe = 0
        opt.zero_grad()
        loss = (model(x, rtol=schedule.tol, atol=schedule.tol) - y).norm(dim=1).mean()  # ‖ŷ − y‖ (|ŷ − y| in 1-D)
        loss.backward()
        opt.step()
        loss_hist.append(float(loss.detach()))
        nfe_hist.append(model.nfe)
        if anneal:
            schedule.step(loss_hist[-1])
        else:
            schedule.history.append(schedule.tol)
        bar.set_postfix(loss=f"{loss_hist[-1]:.4g}", tol=f"{schedule.tol:.2g}", nfe=model.nfe, refresh=False)
    bar.close()
    return {"loss": loss_hist, "tolerance": schedule.history, "nfe": nfe_hist, "final_tolerance": schedule.tol}


def path_gap(model: JacNet, x: Tensor, rtol: float = 1e-7, atol: float = 1e-7) -> Tensor:
    """|ŷ_straight(x) − ŷ_bent(x)| per point (max over outputs): zero up to the solver tolerance iff the
    learned J is conservative along these paths (always in 1-D)."""
    with torch.no_grad():
        a = model(x, rtol=rtol, atol=atol, path="straight")
        b = model(x, rtol=rtol, atol=atol, path="bent")
    return (a - b).abs().amax(1)


def lipschitz_certificate(model: JacNet, lo: float = -2.0, hi: float = 2.0, points: int = 2001) -> float:
    """max |dŷ/dx| over a dense 1-D grid, by :func:`flowbench.jacobian.lipschitz_bound` on the quadrature form
    of ŷ (64-node Gauss–Legendre on an analytic J: its derivative is J(x) to ~machine precision)."""
    if model.d_x != 1:
        raise ConfigError(f"the grid certificate is for 1-D inputs; this JacNet has d_x={model.d_x}")
    grid = torch.linspace(lo, hi, points, dtype=model.x0.dtype).unsqueeze(1)
    # With d_x = 1 the start vector is ±1, so ‖J v‖ is already exact after the first power step.
    return lipschitz_bound(model.quadrature, grid, n_iter=2)


def derivative_range(model: JacNet, lo: float = -2.0, hi: float = 2.0, points: int = 2001) -> tuple[float, float]:
    """(min derivative, max |derivative|) of a 1-D JacNet over a dense grid, from J_θ directly."""
    grid = torch.linspace(lo, hi, points, dtype=model.x0.dtype).unsqueeze(1)
    with torch.no_grad():
        j = model.jacobian(grid).flatten()
    return float(j.min()), float(j.abs().max())


class FixedJacNet(JacNet):
    """A JacNet whose Jacobian is a given closed-form function ``(batch, d_x) → (batch, d_y, d_x)``.

    Used to check the integrator against closed forms (J = cos ⇒ ŷ = sin) and path (in)dependence.
    """

    def __init__(
        self,
        jac_fn: Callable[[Tensor], Tensor],
        d_x: int = 1,
        d_y: int = 1,
        activation: str = "unconstrained",
        x0: Tensor | None = None,
        y0: Tensor | None = None,
    ):
        super().__init__(d_x, d_y, hidden=1, activation=activation, x0=x0, y0=y0)
        self.jac_fn = jac_fn

    def jacobian(self, x: Tensor) -> Tensor:
        return self.jac_fn(x)
