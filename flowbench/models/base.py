"""The flow interface: transforms, composition, base densities and the :class:`Flow` the trainer sees.

Conventions (as in nflows): ``forward`` maps data to latent and returns ``(z, logdet)`` with ``logdet`` of
shape ``(batch,)`` equal to log|det ∂z/∂x|; ``inverse`` maps latent to data and returns ``(x, logdet)`` with
the log-determinant of the inverse map, or raises :class:`InverseNotAvailable`.

The trainer only ever calls the :class:`Flow` methods below, so it never needs to know which model it trains:
``initialize`` once before training, ``train_log_prob`` for the loss, ``prepare_for_eval`` before every
evaluation, ``log_prob`` to evaluate. A model that needs a non-Euclidean gradient forms it inside its own
backward (relgrad's custom autograd Functions), so the trainer has no gradient hook.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowbench.errors import ConfigError, InputError, InverseNotAvailable

__all__ = [
    "Transform",
    "CompositeTransform",
    "InverseNotAvailable",
    "Flow",
    "StandardNormal",
    "check_input",
    "nan_to_neginf",
    "recompute_batchnorm_stats",
]


class Transform(nn.Module):
    """A bijection (or a map with a tractable Jacobian determinant): data → latent."""

    #: True where ``forward`` also evaluates R stacked runs at once: every parameter and the input carry a
    #: leading run axis, (R, B, D) in, (R, B, D) and (R, B) out (:mod:`flowbench.models.stacking`).
    stacks: bool = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        raise InverseNotAvailable(f"{type(self).__name__} has no inverse")


class CompositeTransform(Transform):
    """``t_n ∘ … ∘ t_1``: applies the transforms in order, accumulating log-determinants."""

    stacks = True  # forward takes (R, B, D) when its transforms do

    def __init__(self, transforms: list[Transform]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[:-1])
        for t in self.transforms:
            x, logdet = t(x)
            total = total + logdet
        return x, total

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, logdet = t.inverse(z)
            total = total + logdet
        return z, total


class StandardNormal(nn.Module):
    """N(0, I) on R^D."""

    stacks = True

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("_dummy", torch.zeros(()), persistent=False)  # tracks device/dtype

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (z.pow(2).sum(-1) + self.dim * math.log(2 * math.pi))

    def sample(self, n: int) -> Tensor:
        return torch.randn(n, self.dim, device=self._dummy.device, dtype=self._dummy.dtype)


def nan_to_neginf(logp: Tensor) -> Tensor:
    """NaN → −inf, everything else unchanged (no host sync: a ``where``, not a test)."""
    return torch.where(torch.isnan(logp), torch.full_like(logp, -math.inf), logp)


def check_input(x: Tensor, dim: int, name: str = "input", check_finite: bool = True) -> None:
    """Clear errors for the two commonest mistakes: wrong shape and non-finite values."""
    if x.dim() != 2 or x.shape[1] != dim:
        raise InputError(f"{name} must have shape (batch, {dim}); got {tuple(x.shape)}")
    if check_finite and not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or inf; clean or standardise the data before the model sees it")


class Flow(nn.Module):
    """A density model: ``log p(x) = log p_base(z) + log|det ∂z/∂x|`` with ``(z, logdet) = transform(x)``.

    ``base`` is any module with ``log_prob(z) -> (batch,)`` and ``sample(n) -> (n, D)``; it may itself be a
    conditional density (MADE MoG in MAF MoG) as long as it has those two methods.
    """

    #: False for closed-form models (the Gaussian baseline) that ``initialize`` fits completely.
    trainable: bool = True
    #: What ``−train_log_prob`` leaves out of the NLL (None: nothing, the training loss is the NLL). The trainer
    #: names its running loss by it, beside the exact training NLL (``flowbench.training.evaluate.training_nll``).
    loss_omits: str | None = None

    def __init__(self, transform: Transform, base: nn.Module, dim: int):
        super().__init__()
        self.transform = transform
        self.base = base
        self.dim = dim

    # -- density -------------------------------------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of each row of ``x`` (nats), shape ``(batch,)``: finite or −inf, never NaN.

        Far outside the data a flow's scales grow (a ReLU MADE's log precision is linear in x), ``exp``
        overflows to inf and a later layer or the base density forms inf − inf = NaN. The exact density
        there is tiny, so the float answer is −inf: NaN results of finite rows become −inf. Every other
        value is returned untouched (bit-identical to ``_log_prob``).
        """
        check_input(x, self.dim)
        return nan_to_neginf(self._log_prob(x))

    def _log_prob(self, x: Tensor) -> Tensor:
        z, logdet = self.transform(x)
        return self.base.log_prob(z) + logdet

    def train_log_prob(self, x: Tensor) -> Tensor:
        """The per-example objective whose gradient is the model's ascent direction.

        Equal to :meth:`log_prob` except where a model adds part of the gradient analytically
        (relgrad leaves out the value of log|det W| here; its relative gradient is added inside backward).
        Only the shape is checked: the NaN scan would force a device sync on every training step, and
        training data were checked once when they were prepared.
        """
        check_input(x, self.dim, check_finite=False)
        return self._log_prob(x)

    def sample(self, n: int) -> Tensor:
        with torch.no_grad():
            z = self.base.sample(n)
            x, _ = self.transform.inverse(z)
        return x

    # -- trainer hooks -------------------------------------------------------------------------------
    def initialize(self, train_x: Tensor) -> None:
        """Data-dependent set-up, called once before training (closed-form fits). Default: nothing."""

    @torch.no_grad()
    def prepare_for_eval(self, train_x: Tensor, batch_size: int = 10_000) -> None:
        """Before validation/test: batch norm layers take their statistics from the whole training set.

        Layers that need it implement ``set_stats_from(x)`` (see ``layers.BatchNorm``); the input of each
        such layer is obtained by pushing ``train_x`` through the layers before it, in batches.
        """
        recompute_batchnorm_stats(self, train_x, batch_size)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def num_params(self) -> int:
        """Stored parameters (see :func:`flowbench.models.params.count_params` for the convention)."""
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def recompute_batchnorm_stats(flow: Flow, train_x: Tensor, batch_size: int = 10_000) -> None:
    """Set every batch norm of ``flow`` (layers with ``set_stats_from``, e.g. ``layers.BatchNorm``) from the
    entire training set, as the MAF code does.

    One pass, layer by layer through ``flow.transform``: the training set is pushed through the layers in
    order (in batches of ``batch_size``, every layer in evaluation mode); each batch-norm layer first takes
    the statistics of its own input, then transforms it with them. This equals a training-mode forward pass
    with the whole training set as one batch. Modules' train/eval flags are restored afterwards.
    """
    bns = [m for m in flow.modules() if hasattr(m, "set_stats_from")]
    if not bns:
        return
    t = flow.transform
    steps = list(t.transforms) if isinstance(t, CompositeTransform) else [t]
    direct = {id(s) for s in steps if hasattr(s, "set_stats_from")}
    if any(id(b) not in direct for b in bns):
        raise ConfigError(
            "recompute_batchnorm_stats: BatchNorm layers must be direct steps of flow.transform "
            "(a CompositeTransform); nested or base-density batch norm is not supported"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive; got {batch_size}")
    # the training set may live elsewhere (CPU copy, numpy, float64): bring it to the layers' device/dtype
    ref = next(iter(bns[0].buffers()))  # the statistics' device and dtype
    train_x = torch.as_tensor(train_x).to(device=ref.device, dtype=ref.dtype)
    modes = {m: m.training for m in flow.modules()}
    flow.eval()
    try:
        last = max(i for i, s in enumerate(steps) if hasattr(s, "set_stats_from"))
        h = train_x
        for i, step in enumerate(steps[: last + 1]):
            if hasattr(step, "set_stats_from"):
                step.set_stats_from(h)
            if i < last:  # the layers after the last batch norm need no statistics
                h = torch.cat([step(h[j : j + batch_size])[0] for j in range(0, h.shape[0], batch_size)])
    finally:
        for m, mode in modes.items():
            m.train(mode)
