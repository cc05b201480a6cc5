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
    "ConditionalFlow",
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
    #: True where ``forward(x, context)`` / ``inverse(z, context)`` take the label's one-hot ``context`` (B, K)
    #: (class-conditional models, MAF paper Table 2); :class:`CompositeTransform` passes it to such steps only.
    conditional: bool = False

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

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``context`` (the label's one-hot, (B, K) or stacked (R, B, K)) goes to the conditional steps only."""
        total = x.new_zeros(x.shape[:-1])
        for t in self.transforms:
            x, logdet = t(x, context) if getattr(t, "conditional", False) else t(x)
            total = total + logdet
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, logdet = t.inverse(z, context) if getattr(t, "conditional", False) else t.inverse(z)
            total = total + logdet
        return z, total


class StandardNormal(nn.Module):
    """N(0, I) on R^D."""

    stacks = True

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("_dummy", torch.zeros(()), persistent=False)  # tracks device/dtype

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``context`` is ignored: the base of a conditional flow may be this unconditional one."""
        return -0.5 * (z.pow(2).sum(-1) + self.dim * math.log(2 * math.pi))

    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
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
    #: K, the number of classes a class-conditional flow (:class:`ConditionalFlow`) conditions on; 0: none.
    classes: int = 0

    def __init__(self, transform: Transform, base: nn.Module, dim: int):
        super().__init__()
        self.transform = transform
        self.base = base
        self.dim = dim

    @property
    def in_features(self) -> int:
        """Columns of the rows the model takes: D here, D + K for a :class:`ConditionalFlow`."""
        return self.dim

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


def check_one_hot(context: Tensor, name: str = "input") -> None:
    """The label columns of a conditional model's rows must be one-hot (0/1 entries, one 1 per row)."""
    if not (((context == 0) | (context == 1)).all() and (context.sum(-1) == 1).all()):
        raise InputError(
            f"the last {context.shape[-1]} columns of {name} must be the label's one-hot encoding "
            "(0/1 entries, exactly one 1 per row)"
        )


class ConditionalFlow(Flow):
    """A class-conditional density ``log p(x | y) = log p_base(z | y) + log|det ∂z/∂x|``, ``(z, ·) = transform(x, y)``.

    Rows are ``[x, onehot(y)]``: D data columns, then the label's one-hot in the last K columns, so that the
    trainer, batching, shuffling and stacking handle them as any data rows. The transform's conditional steps
    (and a conditional base, MADE MoG in MAF MoG) receive the one-hot as ``context``. The marginal
    ``p(x) = (1/K) Σ_y p(x | y)`` has a uniform label prior, as the MAF code's ``evaluate_logprob``
    (gpapamak/maf, experiments.py) and its conditional Gaussian (a uniform mixture of the per-class fits).
    """

    def __init__(self, transform: Transform, base: nn.Module, dim: int, classes: int):
        super().__init__(transform, base, dim)
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ConfigError(f"a class-conditional flow needs classes ≥ 2; got {classes!r}")
        self.classes = classes

    @property
    def in_features(self) -> int:
        return self.dim + self.classes

    def _split(self, xy: Tensor) -> tuple[Tensor, Tensor]:
        return xy[..., : self.dim], xy[..., self.dim :]

    def _base_log_prob(self, z: Tensor, context: Tensor) -> Tensor:
        return self.base.log_prob(z, context) if getattr(self.base, "conditional", False) else self.base.log_prob(z)

    # -- density -------------------------------------------------------------------------------------
    def log_prob(self, xy: Tensor) -> Tensor:
        """log p(x | y) of each row ``[x, onehot(y)]`` (nats), shape ``(batch,)``; NaN → −inf as
        :meth:`Flow.log_prob`."""
        check_input(xy, self.in_features)
        check_one_hot(xy[:, self.dim :])
        return nan_to_neginf(self._log_prob(xy))

    def _log_prob(self, xy: Tensor) -> Tensor:
        """Unchecked; also takes R stacked runs' rows (R, B, D + K)."""
        x, context = self._split(xy)
        z, logdet = self.transform(x, context)
        return self._base_log_prob(z, context) + logdet

    def train_log_prob(self, xy: Tensor) -> Tensor:
        check_input(xy, self.in_features, check_finite=False)
        return self._log_prob(xy)

    def one_hot(self, labels: Tensor) -> Tensor:
        """(n,) integer labels → (n, K) one-hot rows in the model's dtype and device."""
        ref = next((t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()), None)
        dtype, device = (ref.dtype, ref.device) if ref is not None else (torch.get_default_dtype(), None)
        labels = torch.as_tensor(labels, device=device)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise InputError(f"labels must be integers in 0..{self.classes - 1}; got dtype {labels.dtype}")
        labels = labels.long()
        if labels.dim() != 1 or (labels.numel() and (labels.min() < 0 or labels.max() >= self.classes)):
            raise InputError(f"labels must be a 1-D tensor of integers in 0..{self.classes - 1}")
        return torch.nn.functional.one_hot(labels, self.classes).to(dtype)

    def class_log_probs(self, x: Tensor) -> Tensor:
        """(B, K): log p(x | y = k) of every row of ``x`` (width D) for every class k (NaN → −inf).

        The classifier of the MAF code's ``evaluate`` (argmax over k) and the terms of :meth:`marginal_log_prob`.
        """
        check_input(x, self.dim)
        eye = torch.eye(self.classes, dtype=x.dtype, device=x.device)
        cols = [self._log_prob(torch.cat([x, eye[k].expand(x.shape[0], -1)], -1)) for k in range(self.classes)]
        return nan_to_neginf(torch.stack(cols, -1))

    def marginal_log_prob(self, x: Tensor) -> Tensor:
        """log p(x) = logsumexp_y log p(x | y) − log K (uniform label prior), shape (B,), for rows of width D."""
        return torch.logsumexp(self.class_log_probs(x), -1) - math.log(self.classes)

    def sample(self, n: int, labels: Tensor | None = None) -> Tensor:
        """``n`` draws of x (n, D) given ``labels`` (n,), by default ``arange(n) % K``."""
        with torch.no_grad():
            if labels is None:
                labels = torch.arange(n) % self.classes
            context = self.one_hot(labels)
            if context.shape[0] != n:
                raise InputError(f"sample({n}) needs {n} labels; got {context.shape[0]}")
            z = self.base.sample(n, context) if getattr(self.base, "conditional", False) else self.base.sample(n)
            x, _ = self.transform.inverse(z, context)
        return x

    # -- trainer hooks -------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_for_eval(self, train_xy: Tensor, batch_size: int = 10_000) -> None:
        """Batch-norm statistics of the whole training set pushed through the layers, each row with its label."""
        train_xy = torch.as_tensor(train_xy)
        recompute_batchnorm_stats(self, train_xy[:, : self.dim], batch_size, context=train_xy[:, self.dim :])


@torch.no_grad()
def recompute_batchnorm_stats(
    flow: Flow, train_x: Tensor, batch_size: int = 10_000, context: Tensor | None = None
) -> None:
    """Set every batch norm of ``flow`` (layers with ``set_stats_from``, e.g. ``layers.BatchNorm``) from the
    entire training set, as the MAF code does.

    One pass, layer by layer through ``flow.transform``: the training set is pushed through the layers in
    order (in batches of ``batch_size``, every layer in evaluation mode); each batch-norm layer first takes
    the statistics of its own input, then transforms it with them. This equals a training-mode forward pass
    with the whole training set as one batch. Modules' train/eval flags are restored afterwards.
    ``context``: each training row's label one-hot, passed to the conditional steps (class-conditional flows).
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
    if context is not None:
        context = torch.as_tensor(context).to(device=ref.device, dtype=ref.dtype)
    modes = {m: m.training for m in flow.modules()}
    flow.eval()
    try:
        last = max(i for i, s in enumerate(steps) if hasattr(s, "set_stats_from"))
        h = train_x
        for i, step in enumerate(steps[: last + 1]):
            if hasattr(step, "set_stats_from"):
                step.set_stats_from(h)
            if i < last:  # the layers after the last batch norm need no statistics
                h = torch.cat(
                    [
                        (
                            step(h[j : j + batch_size], context[j : j + batch_size])
                            if getattr(step, "conditional", False) and context is not None
                            else step(h[j : j + batch_size])
                        )[0]
                        for j in range(0, h.shape[0], batch_size)
                    ]
                )
    finally:
        for m, mode in modes.items():
            m.train(mode)
