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
from flowbench.models import build_model, check_classes, get_spec, resolve_hparams
from flowbench.models.spec import ANY

__all__ = ["count_params", "param_count", "match_params"]


def count_params(model: nn.Module) -> int:
    """Number of stored parameters of ``model`` (see the module docstring for the convention)."""
    num = getattr(model, "num_params", None)
    return int(num()) if callable(num) else sum(p.numel() for p in model.parameters())


def param_count(name: str, dim: int, *, classes: int = 0, **hparams: Any) -> int:
    """Parameter count of ``build_model(name, dim, classes=classes, **hparams)``, from the spec's closed form
    where it has one.

    The formulas live beside each model (its spec's ``count``; the MAF paper's models have them) and the
    tests check them against built models; other models (relgrad) are built and counted. A class-conditional
    model's count depends on the number of classes K too (its label weights): ``count(dim, hparams, classes)``.
    """
    spec = get_spec(name)
    hp = spec.resolve(hparams)
    k = check_classes(spec, classes)
    if spec.count is not None:
        return int(spec.count(dim, hp, k) if spec.conditional else spec.count(dim, hp))
    return count_params(build_model(name, dim, classes=k, **hp))


def match_params(name: str, dim: int, target: int, knob: str | None = None, *, classes: int = 0, **fixed: Any) -> dict:
    """Find the value of the model's size knob whose count is closest to ``target``.

    The knob is ``knob`` where given (any integer hyperparameter, e.g. ``hidden_features`` of a plugged-in
    flow), else the spec's ``match_knob``. A list-valued knob (zuko's ``hidden_features=(64, 64)``) is matched
    with every entry set to the same width w, keeping the list's length (that of its value in ``fixed``, else of
    its default). ``classes``: K for a class-conditional model (as :func:`param_count`). The other
    hyperparameters are taken from ``fixed`` (defaults otherwise); a value of the knob
    in ``fixed`` is replaced. Counts grow with the knob, so the smallest value reaching ``target`` and its
    predecessor are the only candidates; the one whose count is closer wins, and an exact tie (``target``
    midway between the two counts) goes to the smaller model: a baseline sized to another model's count is
    never given the extra parameters by the tie rule. When the target is out of reach
    (e.g. below the count at width 1) the closest achievable count is returned: check ``relative_error``.

    Returns:
        A dict with ``"hparams"`` (the resolved hyperparameters), ``"target"``, ``"achieved"`` (the count),
        ``"knob"`` (its name, or None) and ``"relative_error"`` ((achieved − target)/target).
    """
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ConfigError(f"match_params: target must be a positive integer parameter count; got {target!r}")
    spec = get_spec(name)
    length = None  # the number of entries of a list-valued knob; None: a scalar knob
    if knob is None:
        knob = spec.match_knob
    elif knob not in spec.hparams:
        raise ConfigError(
            f"match_params: {knob!r} is not a hyperparameter of model {spec.name!r}; choose one of "
            f"{', '.join(spec.hparams) or '(it has none)'}"
        )
    if knob is not None:
        length = _knob_length(spec, knob, fixed.get(knob))
    fixed = {k: v for k, v in fixed.items() if k != knob}

    def value(w: int) -> int | tuple[int, ...]:
        return w if length is None else (w,) * length

    def count(v: int) -> int:
        return param_count(name, dim, classes=classes, **fixed, **({knob: value(v)} if knob else {}))

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
        # strictly closer, or the smaller model: the tie rule of the docstring
        best = lo if lo == 1 or abs(count(lo) - target) < abs(count(lo - 1) - target) else lo - 1
    hparams = resolve_hparams(name, **fixed, **({knob: value(best)} if knob else {}))
    achieved = count(best) if knob else param_count(name, dim, classes=classes, **fixed)
    return {
        "hparams": hparams,
        "target": target,
        "achieved": achieved,
        "knob": knob,
        "relative_error": (achieved - target) / target,
    }


def _knob_length(spec: Any, knob: str, given: Any) -> int | None:
    """How many entries a list-valued knob has (None: a scalar knob); ConfigError for a knob that is no size."""
    hp = spec.hparams[knob]
    flag = "--" + knob.replace("_", "-")
    if not (hp.type is int or hp.type is ANY or (hp.type is tuple and hp.item is int)):
        raise ConfigError(
            f"match_params: {flag} of model {spec.name!r} is not a size (it takes "
            f"{'a list of numbers' if hp.type is tuple else hp.type.__name__}); name an integer "
            "hyperparameter or a list of integers, such as the hidden width(s)"
        )
    ref = hp.check(spec.name, knob, given) if given is not None else hp.default
    if not isinstance(ref, tuple):
        return None
    if not ref:
        raise ConfigError(
            f"match_params: {flag} {ref!r} is an empty list: there is no width to size; give it "
            "at least one entry (e.g. 64,64)"
        )
    return len(ref)
