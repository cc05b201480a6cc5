"""Parameter counting and matching (baselines sized to a given parameter budget).

Convention: :func:`count_params` counts every stored ``nn.Parameter`` element — masked MADE weights
included (they are stored, as in the MAF code), batch-norm ``log γ`` and ``β`` included, buffers (masks,
batch-norm statistics) excluded. The closed-form Gaussian has no parameters to train; it counts its fitted
statistics, D means and D(D+1)/2 covariance entries.

The relative-gradient paper (Gresele et al. 2020) compared its dense flow, with L(D² + D) parameters, to
baselines whose hidden width was solved for to match that count; :func:`match_params` does that search.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from flowbench.errors import ConfigError

__all__ = ["count_params", "param_count", "match_params", "MATCH_KNOB"]

#: The hyperparameter :func:`match_params` tunes for each family (None: nothing to tune).
MATCH_KNOB: dict[str, str | None] = {
    "gaussian": None,
    "made": "hidden",
    "made-mog": "hidden",
    "maf": "hidden",
    "maf-mog": "hidden",
    "realnvp": "hidden",
    "relgrad": "layers",
}


def count_params(model: nn.Module) -> int:
    """Number of stored parameters of ``model`` (see the module docstring for the convention)."""
    num = getattr(model, "num_params", None)
    return int(num()) if callable(num) else sum(p.numel() for p in model.parameters())


def _made(d: int, h: int, hl: int) -> int:
    return 3 * d * h + (hl - 1) * h * h + hl * h + 2 * d


def _made_mog(d: int, h: int, hl: int, c: int) -> int:
    return d * h + (hl - 1) * h * h + hl * h + 3 * c * (h * d + d)


def param_count(name: str, dim: int, **hparams: Any) -> int:
    """Parameter count of ``build_model(name, dim, **hparams)`` without building it where a formula exists.

    Formulas (MAF paper's models, maf-protocol.md section 3; tests check them against built models):
    MADE 3DH + (L−1)H² + LH + 2D; MADE MoG DH + (L−1)H² + LH + 3C(HD + D); MAF(K) K·MADE + 2KD with batch
    norm; MAF MoG(K) MAF(K) + MADE MoG; RealNVP(K) K·[4DH + 2(L−1)H² + 2LH + 2D] + 2KD with batch norm.
    Other models (relgrad) are built and counted.
    """
    from flowbench.models import build_model, resolve_hparams

    hp = resolve_hparams(name, **hparams)
    d = dim
    if name == "gaussian":
        return d + d * (d + 1) // 2
    if name in ("made", "made-mog", "maf", "maf-mog", "realnvp"):
        h, hl = hp["hidden"], hp["hidden_layers"]
        bn = 2 * hp["layers"] * d if hp.get("batch_norm") else 0
        if name == "made":
            return _made(d, h, hl)
        if name == "made-mog":
            return _made_mog(d, h, hl, hp["components"])
        if name == "maf":
            return hp["layers"] * _made(d, h, hl) + bn
        if name == "maf-mog":
            return hp["layers"] * _made(d, h, hl) + bn + _made_mog(d, h, hl, hp["components"])
        return hp["layers"] * (4 * d * h + 2 * (hl - 1) * h * h + 2 * hl * h + 2 * d) + bn
    return count_params(build_model(name, dim, **hp))


def match_params(name: str, dim: int, target: int, **fixed: Any) -> dict:
    """Find the value of the family's knob (:data:`MATCH_KNOB`) whose count is closest to ``target``.

    The other hyperparameters are taken from ``fixed`` (defaults otherwise); a value of the knob in
    ``fixed`` is replaced. Counts grow with the knob, so the smallest value reaching ``target`` and its
    predecessor are the only candidates; ties go to the smaller model. When the target is out of reach
    (e.g. below the count at width 1) the closest achievable count is returned: check ``relative_error``.

    Returns:
        ``{"hparams": resolved hyperparameters, "target": target, "achieved": count, "knob": name or None,
        "relative_error": (achieved − target)/target}``.
    """
    from flowbench.models import resolve_hparams

    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ConfigError(f"match_params: target must be a positive integer parameter count; got {target!r}")
    if name not in MATCH_KNOB:
        resolve_hparams(name)  # raises the registry's "unknown model" error
        raise ConfigError(f"match_params does not know which hyperparameter to tune for {name!r}")
    knob = MATCH_KNOB[name]
    fixed = {k: v for k, v in fixed.items() if k != knob}

    def count(v: int) -> int:
        return param_count(name, dim, **fixed, **({knob: v} if knob else {}))

    if knob is None:
        best = None
    else:
        hi = 1
        while count(hi) < target:
            hi *= 2
            if hi > 1 << 24:
                raise ConfigError(f"match_params: target {target} is out of reach for {name!r}")
        lo = hi // 2 + 1 if hi > 1 else 1  # count(hi // 2) < target ≤ count(hi)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
        best = lo if lo == 1 or abs(count(lo) - target) < abs(count(lo - 1) - target) else lo - 1
    hparams = resolve_hparams(name, **fixed, **({knob: best} if knob else {}))
    achieved = count(best) if knob else param_count(name, dim, **fixed)
    return {
        "hparams": hparams,
        "target": target,
        "achieved": achieved,
        "knob": knob,
        "relative_error": (achieved - target) / target,
    }
