"""The relative-gradient dense flow (Gresele et al., 2020, "Relative gradient optimization of the Jacobian
term in unsupervised deep learning", NeurIPS; sections 3–4, appendices D, F, H).

z = g(x): L square D×D layers ``y_k = h_{k-1} W_kᵀ + b_k`` (torch row convention, ``W_k`` of shape (out, in)),
``h_k = s(y_k)`` for k < L, ``z = y_L`` (no activation after the last layer)::

    log p(x) = Σ_i log p_z(z_i) + Σ_{k<L} Σ_i log s'(y_k,i) + Σ_k log|det W_k|

Relative gradient (section 4; derived here in the row convention and tested against an explicit float64
computation): the Euclidean gradient ``G_W`` is replaced by ``G_W WᵀW``. For the data terms ``G_W = Δᵀh``
with Δ = ∂loss/∂Y, so ``G_W WᵀW = Δᵀ (h Wᵀ) W``. With a bias, the projected relative gradient of the
augmented matrix ``[[W, b], [0, 1]]`` (appendix F) keeps the W and b blocks of ``[G_W, g_b] ÂᵀÂ``::

    dW = Δᵀ (Y W),   db = Δᵀ (Y b + 1),   Y = h Wᵀ + b  (the full pre-activation, bias included)

which equals the reference code's ``dW = W Wᵀ G_W + W bᵀ g_b, db = b Wᵀ G_W + (1 + b bᵀ) g_b`` in its
transposed convention. Cost: two extra B×D×D products per layer, O(B·D²), no inverse or determinant.
For log|det W| the relative gradient is W⁻ᵀWᵀW = W.

Where the adjustment happens: inside ``backward`` (the custom autograd functions in
:mod:`flowbench.models.relgrad_autograd`), not in a separate gradient hook. The layer's backward returns the
relative data-term gradient directly (it has Δ and Y at hand, so no extra memory), and the log-det term is a
node whose backward adds ``(Σ upstream) · W``. The
result is therefore exact for any loss reduction (mean, sum, accumulation over several backward calls), and
nothing is left to do after ``backward``. After ``(-log_prob(x).mean()).backward()`` each weight's
``.grad`` is ``(∇_W L_data) WᵀW − W`` and each bias's is the projected rule above.

``relative=False`` gives ordinary autograd gradients with ``slogdet`` in the graph (the benchmarks' "ordinary"
method).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowbench.models.base import Flow, StandardNormal, Transform, check_input
from flowbench.models.relgrad_autograd import TANH_A, TANH_B, RelativeDense, RelativeLogDet, RelgradNet
from flowbench.models.spec import HParam, ModelSpec

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["RELGRAD_HPARAMS", "RELGRAD_SPEC", "build_relgrad", "RelgradFlow", "RelgradTransform", "Logistic"]

ACTIVATIONS = ("smooth-leaky-relu", "tanh")
BASES = {"normal": "normal", "logistic": "logistic", "hyperbolic-secant": "logistic"}  # alias kept (ref. code)

#: Defaults (H.3; alpha = 0.3 as in the reference PyTorch notebook — the JAX code uses 0.01).
RELGRAD_HPARAMS: dict[str, HParam] = {
    "layers": HParam(2, "flow depth: the number of dense D×D layers", low=1),
    "bias": HParam(True, "biases in the dense layers"),
    "activation": HParam(
        "smooth-leaky-relu", "elementwise invertible nonlinearity between the layers", choices=ACTIVATIONS
    ),
    "alpha": HParam(0.3, "slope of the smooth leaky ReLU for negative inputs", low=0.0, low_open=True, high=1.0),
    "base": HParam("normal", "base density", choices=("normal", "logistic"), aliases={"hyperbolic-secant": "logistic"}),
    "bias_logdet": HParam(
        False,
        "give the biases the log-det's relative-gradient term too (the full "
        "augmented-matrix rule; default off = the reference code's rule, with which the "
        "published numbers were made)",
    ),
}
COND_WARN_FACTOR = 0.01  # warn when cond(W) > COND_WARN_FACTOR / eps(dtype): 8e4 (float32), 5e13 (float64)
INVERSE_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6}  # |s(y) - t| ≤ rtol·(1 + |t|) after inversion


class Logistic(nn.Module):
    """Logistic density with scale ½, per dimension: p(s) = ½ sech²(s).

    The reference code calls it "hyperbolic secant", but sech² (not sech) is the logistic density with
    scale ½; log p(s) = log ½ + 2 log sech(s), computed as ``log 2 − 2|s| − 2 softplus(−2|s|)`` (stable).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("_dummy", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        a = z.abs()
        return (math.log(2.0) - 2.0 * a - 2.0 * F.softplus(-2.0 * a)).sum(-1)

    def sample(self, n: int) -> Tensor:
        u = torch.rand(n, self.dim, device=self._dummy.device, dtype=self._dummy.dtype)
        tiny = torch.finfo(u.dtype).tiny
        return 0.5 * (torch.log(u.clamp_min(tiny)) - torch.log1p(-u))


class RelgradTransform(Transform):
    """The dense transform x → z with exact log-determinant (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        layers: int,
        bias: bool,
        activation: str,
        alpha: float,
        relative: bool = True,
        bias_logdet: bool = False,
    ):
        super().__init__()
        self.dim, self.activation, self.alpha, self.relative = dim, activation, float(alpha), relative
        self.weights = nn.ParameterList(
            [nn.Parameter(nn.init.orthogonal_(torch.empty(dim, dim))) for _ in range(layers)]
        )
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in range(layers)]) if bias else None
        # The reference code adds the log-det's relative gradient −W to W only. The augmented-matrix algebra
        # also gives the bias a −b term; without it a stationary point of the update is not one of the
        # likelihood when b ≠ 0 (see `flowbench bench optim --bias-logdet`). False = the reference, as published.
        self.bias_logdet = bias_logdet
        self._logdet_cache: tuple | None = None  # (key, value)
        self._inverse_cache: tuple | None = None  # (key, [W_k⁻¹])

    # -- activation ----------------------------------------------------------------------------------
    def _act(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """h = s(y) and log s'(y) summed over features."""
        if self.activation == "tanh":
            t = torch.tanh(TANH_A * y)
            return t + TANH_B * y, torch.log(TANH_A * (1 - t * t) + TANH_B).sum(-1)
        a = self.alpha  # s(y) = αy + (1−α) softplus(y), s'(y) = α + (1−α) sigmoid(y)
        h = torch.add(F.softplus(y), y, alpha=a / (1 - a)).mul_(1 - a) if a < 1 else y.clone()
        return h, torch.log(torch.sigmoid(y).mul(1 - a).add_(a)).sum(-1)

    def _act_inverse(self, t: Tensor) -> Tensor:
        """y with s(y) = t: safeguarded Newton inside a bracket, bisection when a step leaves it."""
        if self.activation == "tanh":
            lo, hi = (t - 1) / TANH_B, (t + 1) / TANH_B  # |tanh| ≤ 1
        else:
            a = self.alpha  # max(y, αy) ≤ s(y) ≤ max(y, αy) + (1−α) log 2
            u = t - (1 - a) * math.log(2.0)
            lo, hi = torch.where(u >= 0, u, u / a), t.clone()
        y = t.clone()
        tol = INVERSE_RTOL.get(t.dtype, 1e-6) * (1 + t.abs())
        for _ in range(200):
            h, _ = self._act(y)
            r = h - t
            if bool((r.abs() <= tol).all()):
                break
            lo, hi = torch.where(r < 0, y, lo), torch.where(r > 0, y, hi)
            y_new = y - r / self._act_deriv(y)
            y = torch.where((y_new > lo) & (y_new < hi), y_new, 0.5 * (lo + hi))
        else:
            warnings.warn(
                "relgrad: activation inverse did not reach its tolerance in 200 iterations",
                RuntimeWarning,
                stacklevel=2,
            )
        return y

    def _act_deriv(self, y: Tensor) -> Tensor:
        if self.activation == "tanh":
            return TANH_A * (1 - torch.tanh(TANH_A * y) ** 2) + TANH_B
        return self.alpha + (1 - self.alpha) * torch.sigmoid(y)

    # -- exact log|det W| (evaluation only), cached while the weights do not change ------------------
    def _key(self) -> tuple:
        # load_state_dict and most in-place updates bump _version; .to()/.double() change data_ptr. Fused Adam
        # does NOT bump _version (checked with torch 2.13, CPU), which is why train() below also drops the caches.
        return tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in self.weights)

    @torch.no_grad()
    def logabsdet(self) -> float:
        """Σ_k log|det W_k| (slogdet, O(D³)); recomputed only when a weight has changed."""
        key = self._key()
        # In training mode the weights may have been stepped in place without a version bump (fused Adam), so
        # the cache is only trusted in evaluation mode, where the trainer never steps.
        if self.training or self._logdet_cache is None or self._logdet_cache[0] != key:
            total = 0.0
            for k, w in enumerate(self.weights):
                sign, lad = torch.linalg.slogdet(w)
                _check_conditioning(k, w, float(sign), float(lad))
                total += float(lad)
            self._logdet_cache = (key, total)
        return self._logdet_cache[1]

    def train(self, mode: bool = True) -> Self:
        # Needed, not just cautious: weights stepped by fused Adam keep their _version, so _key() misses them.
        self._logdet_cache = self._inverse_cache = None
        return super().train(mode)

    # -- forward / inverse ---------------------------------------------------------------------------
    def forward(self, x: Tensor, exact: bool = True) -> tuple[Tensor, Tensor]:
        """(z, log|det ∂z/∂x|). ``exact=False`` (relative mode only) leaves out Σ log|det W| (training)."""
        n = len(self.weights)
        biases = self.biases if self.biases is not None else [None] * n
        logdet = x.new_zeros(x.shape[0])
        h = x
        for k, (w, b) in enumerate(zip(self.weights, biases)):
            if self.relative and torch.is_grad_enabled():
                y = RelativeDense.apply(h, w, b)
            else:
                y = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
            if k < n - 1:
                h, ld = self._act(y)
                logdet = logdet + ld
            else:
                h = y
        if self.relative:
            value = self.logabsdet() if exact else 0.0
            logdet = logdet + RelativeLogDet.apply(x, value, *self.weights)
            if self.bias_logdet and self.biases is not None:  # gives each b the term (Σ ∂loss/∂logdet)·b
                logdet = logdet + RelativeLogDet.apply(x, 0.0, *self.biases)
        else:  # ordinary gradients: slogdet in the graph (its backward needs an inverse, O(D³))
            logdet = logdet + sum(torch.linalg.slogdet(w)[1] for w in self.weights)
        return h, logdet

    @torch.no_grad()
    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(x, log|det ∂x/∂z|). Each W is inverted once (cached); the activation numerically."""
        key = self._key()
        if self._inverse_cache is None or self._inverse_cache[0] != key:
            self._inverse_cache = (key, [torch.linalg.inv(w) for w in self.weights])
        inv = self._inverse_cache[1]
        n = len(self.weights)
        logdet = z.new_full((z.shape[0],), -self.logabsdet())
        y = z
        for k in reversed(range(n)):
            if k < n - 1:  # y currently holds h_k = s(y_k)
                y = self._act_inverse(y)
                logdet = logdet - torch.log(self._act_deriv(y)).sum(-1)
            if self.biases is not None:
                y = y - self.biases[k]
            y = y @ inv[k].t()  # h_{k-1} = (y_k − b_k) W_k⁻ᵀ
        return y, logdet


def _check_conditioning(k: int, w: Tensor, sign: float, lad: float) -> None:
    """Warn when W_k is singular or drifting toward it (evaluation only: an SVD is O(D³))."""
    eps = torch.finfo(w.dtype).eps
    if sign == 0 or not math.isfinite(lad):
        warnings.warn(
            f"relgrad layer {k}: weight matrix is singular (log|det W| = {lad}); the flow is no longer "
            "invertible — lower the learning rate or restart from a checkpoint",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    s = torch.linalg.svdvals(w)
    cond = float(s[0] / s[-1]) if float(s[-1]) > 0 else math.inf
    if cond > COND_WARN_FACTOR / eps:
        warnings.warn(
            f"relgrad layer {k}: weight matrix is close to singular (condition number {cond:.3g}, "
            f"threshold {COND_WARN_FACTOR / eps:.3g}); log-likelihoods and samples lose accuracy — "
            "lower the learning rate or use float64",
            RuntimeWarning,
            stacklevel=2,
        )


class RelgradFlow(Flow):
    """Dense flow trained with the relative gradient (``relative=True``) or ordinary autograd (``False``)."""

    @property
    def relative(self) -> bool:
        return self.transform.relative

    @relative.setter
    def relative(self, value: bool) -> None:
        self.transform.relative = bool(value)

    @property
    def loss_omits(self) -> str | None:
        """Σ log|det W| in relative mode: its value would cost O(D³) a step, and its relative gradient −W is
        added inside backward without it (section 4). Ordinary mode has the exact value in the graph."""
        return "log|det W|" if self.relative else None

    def train_log_prob(self, x: Tensor) -> Tensor:
        """log p(x) without Σ log|det W| in relative mode (its relative gradient −W still reaches W)."""
        check_input(x, self.dim, check_finite=False)  # no NaN scan: it would sync the device every step
        t = self.transform
        if not (self.relative and torch.is_grad_enabled()):
            z, logdet = t(x, exact=not self.relative)
            return self.base.log_prob(z) + logdet
        params = list(t.weights) + (list(t.biases) if t.biases is not None else [])
        z, ld = RelgradNet.apply(x, t.activation, t.alpha, len(t.weights), t.bias_logdet, *params)
        return self.base.log_prob(z) + ld

    @torch.no_grad()
    def prepare_for_eval(self, train_x: Tensor | None = None, batch_size: int = 10_000) -> None:
        """No batch norm here; compute (and cache) log|det W_k| once, warning if a W_k is near-singular."""
        self.transform.logabsdet()


def build_relgrad(
    dim: int, *, layers: int, bias: bool, activation: str, alpha: float, base: str, bias_logdet: bool
) -> RelgradFlow:
    """The relative-gradient dense flow (Gresele et al. 2020); set ``flow.relative = False`` for ordinary autograd."""
    transform = RelgradTransform(int(dim), int(layers), bool(bias), activation, float(alpha), True, bool(bias_logdet))
    return RelgradFlow(transform, StandardNormal(dim) if BASES[base] == "normal" else Logistic(dim), int(dim))


RELGRAD_SPEC = ModelSpec(
    name="relgrad",
    build=build_relgrad,
    hparams=RELGRAD_HPARAMS,
    label="Relgrad dense flow",
    paper="Gresele et al. 2020, Relative gradient optimization of the Jacobian term in unsupervised deep learning",
    # The reference code's default (fissoreg/relative-gradient-jacobian, experiments/args.py); the paper's
    # per-dataset values are not legible in our copy, so the per-dataset configs state theirs.
    lr=1e-3,
    match_knob="layers",
)
