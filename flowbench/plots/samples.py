"""Samples from a recorded model beside real test data.

The model is rebuilt from the record (``build_model(model, dim, **hparams)``) and loaded with the best state
kept in its checkpoint, i.e. the model whose test LL the record reports. Three kinds of figure:

- images (mnist, digits, cifar10): a grid of samples mapped from logit space back to pixels,
  ``x = (sigmoid(y) − α) / (1 − 2α)`` (the inverse of MAF's ``y = logit(α + (1 − 2α)·x)``, section 4.3),
  beside as many test images; grey for an ``(H, W)`` image shape, RGB for a channel-major ``(3, H, W)`` one;
- 2-D toy data (``toy2d-*``): the data beside the learned density, as ``flowbench sanity toy2d`` draws it;
- tabular data: pairwise marginal scatter of samples against test points for a few dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowbench.data.base import Dataset
from flowbench.errors import ConfigError
from flowbench.plots import _records as R
from flowbench.plots._mpl import pyplot, save_figure

__all__ = [
    "MAX_IMAGES",
    "TOY_PREFIX",
    "check_checkpoint",
    "choose_run",
    "draw",
    "image_grid_figure",
    "image_layout",
    "load_dataset_for",
    "load_flow",
    "logit_to_pixels",
    "pairwise_figure",
    "plot_samples",
    "save_samples",
    "tile",
]

TOY_PREFIX = "toy2d-"
#: At most this many images in a sample grid (16 × 16): at the figure's size a 28 × 28 MNIST image then still
#: gets about one screen pixel per pixel; more would be an unreadable mosaic.
MAX_IMAGES = 256
SAMPLE_COLOR, DATA_COLOR = "#D55E00", "#0072B2"


def choose_run(records: list[Any], seed: int | None = None) -> Any:
    """The run to sample from: ``seed`` if given, else the best validation LL (model selection on validation)."""
    if seed is not None:
        runs = [r for r in records if R.seed(r) == seed]
        if not runs:
            raise ConfigError(f"no record with seed {seed}; recorded seeds: {sorted({R.seed(r) for r in records})}")
        records = runs

    def key(r: Any) -> tuple:
        v = R.best_val_ll(r)
        return (math.isfinite(v), v if math.isfinite(v) else 0.0, -R.seed(r))

    return max(records, key=key)


def load_dataset_for(rec: Any, data_root: str | Path | None = None) -> Dataset:
    """The record's dataset: toy data rebuilt from its seed, else ``load_dataset`` under ``data_root``."""
    name = R.dataset(rec)
    if name.startswith(TOY_PREFIX):
        from flowbench.sanity.toy2d import make_toy

        # flowbench sanity toy2d draws the data with the run's seed (run_toy2d: make_toy(name, seed)).
        return make_toy(name[len(TOY_PREFIX) :], R.seed(rec))
    from flowbench.data import load_dataset

    return load_dataset(R.dataset_key(rec), data_root if data_root is not None else R.data_root(rec))


def load_flow(rec: Any, data: Dataset) -> Any:
    """The recorded model: rebuilt from the record, best-validation state loaded from its checkpoint.

    Raises:
        ConfigError: the checkpoint is missing (a closed-form model needs none: it is refitted, deterministic).
    """
    from flowbench.models import build_model
    from flowbench.training.lifecycle import label_classes

    check_checkpoint(rec)
    _warn_if_changed(rec)
    # the model's spec says whether it is class-conditional (MAF Table 2's p(x | y)); samples cycle the labels
    classes = label_classes(R.model_key(rec), data)
    flow = build_model(R.model_key(rec), data.dim, **({"classes": classes} if classes else {}), **R.hparams(rec))
    if not flow.trainable:
        train = np.asarray(data.train)
        flow.initialize(torch.as_tensor(np.hstack([train, data.one_hot("train")]) if classes else train))
    else:
        from flowbench.training.trainer import best_model_state

        # The best state was saved right after prepare_for_eval, so batch-norm statistics come with it.
        flow.load_state_dict(best_model_state(R.checkpoint(rec)))
    return flow.eval()


def _warn_if_changed(rec: Any) -> None:
    """A plugged-in model's file that changed since the run may no longer build the recorded model: say so."""
    import hashlib
    import warnings

    origin = R.field(rec, "model_origin") or {}
    if origin.get("kind") != "file" or not origin.get("sha256"):
        return
    try:
        now = hashlib.sha256(Path(origin["detail"]).read_bytes()).hexdigest()
    except OSError:
        return  # a missing file is reported when the model is rebuilt
    if now != origin["sha256"]:
        warnings.warn(
            f"{origin['detail']} changed since this run was trained; the model rebuilt from it may not be "
            "the one recorded (its state may not load)",
            stacklevel=3,
        )


def check_checkpoint(rec: Any) -> None:
    """Raise ConfigError when a trained run's model file is missing (checked before any data is loaded): the
    model state the record names (``seed<k>.model.pt``), or for older records the checkpoint."""
    path = R.checkpoint(rec)
    if R.epochs(rec) == 0 or path.is_file() or path.with_suffix(".model.pt").is_file():
        return
    again = "train the run again (flowbench run ... --force), or sample another seed with --seed"
    state = R.field(rec, "model_state")
    if state:  # what the run kept of its model, and what a reader would look for beside the record
        raise ConfigError(
            f"the trained model's file {path.parent / state} is missing (the record names it as its "
            f"model_state); cannot rebuild the trained model: {again}"
        )
    raise ConfigError(f"no checkpoint at {path} for this record; cannot rebuild the trained model: {again}")


def draw(flow: Any, n: int, seed: int = 0) -> np.ndarray:
    """``n`` samples (float64 array) from a torch generator seeded with ``seed`` (the global state is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return flow.sample(n).double().numpy()


def logit_to_pixels(y: np.ndarray, alpha: float) -> np.ndarray:
    """Pixel intensities in [0, 1] from logit-space values (MAF section 4.3); NaN stays NaN."""
    with np.errstate(over="ignore"):
        s = 1.0 / (1.0 + np.exp(-np.asarray(y, dtype=np.float64)))
    return np.clip((s - alpha) / (1 - 2 * alpha), 0.0, 1.0)


def tile(images: np.ndarray, cols: int, pad: float = 1.0) -> np.ndarray:
    """``(n, h, w)`` images (or ``(n, h, w, 3)`` RGB ones) as one array, row-major, separated by one-pixel lines
    of value ``pad``."""
    n, h, w = images.shape[:3]
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, *images.shape[3:]), pad, dtype=np.float64)
    for k in range(n):
        i, j = divmod(k, cols)
        out[1 + i * (h + 1) : 1 + i * (h + 1) + h, 1 + j * (w + 1) : 1 + j * (w + 1) + w] = images[k]
    return out


def image_layout(name: str, dim: int, image_shape: Sequence[int] | None) -> tuple[int, ...]:
    """How rows of ``dim`` values are drawn: ``(H, W)`` grey or ``(3, H, W)`` RGB (channel-major, as CIFAR-10's
    rows are R, G, B planes); without an image shape, a square grey image.

    Raises:
        ConfigError: the shape is neither, or does not have ``dim`` pixels.
    """
    if image_shape is None:
        side = math.isqrt(dim)
        if side * side != dim:
            raise ConfigError(f"{name}: dimension {dim} is not a square image")
        return (side, side)
    shape = tuple(int(k) for k in image_shape)
    if len(shape) == 3 and shape[0] == 1:  # one channel: a grey image
        shape = shape[1:]
    if not (len(shape) == 2 or (len(shape) == 3 and shape[0] == 3)) or math.prod(shape) != dim:
        raise ConfigError(
            f"{name}: image shape {shape} cannot be drawn: give (H, W) or channel-major (3, H, W) with {dim} values"
        )
    return shape


def _as_images(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Rows as ``(n, H, W)`` grey or ``(n, H, W, 3)`` RGB images (channels last, as imshow wants them)."""
    if len(shape) == 2:
        return rows.reshape(-1, *shape)
    return rows.reshape(-1, *shape).transpose(0, 2, 3, 1)


def image_grid_figure(samples: np.ndarray, test: np.ndarray, shape: int | Sequence[int], title: str) -> Any:
    """Samples (left) beside test images (right), pixel values in [0, 1]; non-finite samples in red.

    ``shape``: from :func:`image_layout`, ``(H, W)`` grey or ``(3, H, W)`` RGB; an int is a square side.
    """
    plt = pyplot()
    shape = (shape, shape) if isinstance(shape, int) else tuple(shape)
    cols = math.ceil(math.sqrt(len(samples)))
    cmap = plt.get_cmap("gray").with_extremes(bad="red")
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 5.2), layout="constrained")
    bad = int((~np.isfinite(samples)).any(1).sum())
    for ax, images, name in ((axes[0], samples, "samples"), (axes[1], test, "test images")):
        grid = tile(_as_images(images, shape), cols)
        if grid.ndim == 3:  # RGB: imshow has no colour map for bad values, so paint them red here
            grid[~np.isfinite(grid).all(axis=2)] = (1.0, 0.0, 0.0)
            ax.imshow(grid, vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{len(images)} {name}" + (f" ({bad} non-finite, red)" if name == "samples" and bad else ""))
    fig.suptitle(title)
    return fig


def pairwise_figure(samples: np.ndarray, test: np.ndarray, dims: Sequence[int], title: str) -> Any:
    """Lower triangle: scatter of samples over test points for each pair of ``dims``; diagonal: histograms.

    Axis limits come from the test data (0.5–99.5 % quantiles, widened), so that a few wild samples cannot
    shrink the data to a dot; samples outside are counted in the title.
    """
    plt = pyplot()
    k = len(dims)
    fig, axes = plt.subplots(k, k, figsize=(2.3 * k + 1.2, 2.3 * k + 0.6), squeeze=False, layout="constrained")
    finite = samples[np.isfinite(samples).all(1)]
    lims = _pairwise_limits(test, dims)
    sub = finite[:, list(dims)]
    outside = int((~((sub >= [a for a, _ in lims]) & (sub <= [b for _, b in lims])).all(1)).sum())
    for i, di in enumerate(dims):
        for j, dj in enumerate(dims):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
                continue
            _pair_panel(ax, test, finite, dims, lims, i, j)
            if i == k - 1:
                ax.set_xlabel(f"dim {dj}", fontsize=8)
            if j == 0 and i > 0:
                ax.set_ylabel(f"dim {di}", fontsize=8)
    # In the empty upper-right corner: a legend beside a panel would widen its column in the layout.
    handles, names = axes[0, 0].get_legend_handles_labels()
    (axes[0, -1] if k > 1 else axes[0, 0]).legend(handles, names, fontsize=8, loc="upper right", frameon=False)
    lost = len(samples) - len(finite)
    notes = []
    if outside:
        notes.append(f"{outside} samples outside the axes")
    if lost:
        notes.append(f"{lost} non-finite samples left out")
    fig.suptitle(title + (f"\n({'; '.join(notes)})" if notes else ""))
    return fig


def _pairwise_limits(test: np.ndarray, dims: Sequence[int]) -> list[tuple[float, float]]:
    """Each dimension's axis limits: the test data's 0.5–99.5 % quantiles, widened by 15 % on each side."""
    lims = []
    for d in dims:
        lo, hi = np.quantile(test[:, d], [0.005, 0.995])
        pad = 0.15 * (hi - lo) if hi > lo else 1.0
        lims.append((lo - pad, hi + pad))
    return lims


def _pair_panel(
    ax: Any, test: np.ndarray, finite: np.ndarray, dims: Sequence[int], lims: list[tuple[float, float]], i: int, j: int
) -> None:
    """The lower-triangle panel in row ``i``, column ``j``: a scatter of dimension ``dims[i]`` against
    ``dims[j]``, or on the diagonal the two histograms of ``dims[i]``."""
    di, dj = dims[i], dims[j]
    if i == j:
        bins = np.linspace(*lims[i], 40)
        ax.hist(test[:, di], bins=bins, density=True, color=DATA_COLOR, alpha=0.45, label="test data")
        ax.hist(finite[:, di], bins=bins, density=True, histtype="step", color=SAMPLE_COLOR, lw=1.4, label="samples")
        ax.set_yticks([])
    else:
        ax.scatter(test[:, dj], test[:, di], s=3, color=DATA_COLOR, alpha=0.35, lw=0, label="test data")
        ax.scatter(finite[:, dj], finite[:, di], s=3, color=SAMPLE_COLOR, alpha=0.35, lw=0, label="samples")
        ax.set_ylim(*lims[i])
    ax.set_xlim(*lims[j])
    ax.tick_params(labelsize=7)


def _toy2d_density(rec: Any, flow: Any, data: Dataset, path: Path, grid: int = 200) -> Path:
    """The data | learned density figure of ``flowbench sanity toy2d`` for a recorded toy run."""
    from flowbench.sanity.toy2d import _density_grid, _figure, _gaussian_test_ll

    gx, gy, logp = _density_grid(flow, data, grid)
    gaussian_ll = _gaussian_test_ll(data)
    result = {
        "display_name": R.label(rec),
        "model": R.model(rec),
        "test_ll": R.test_ll(rec),
        "epochs": R.epochs(rec),
        "gaussian_test_ll": gaussian_ll,
        "nonfinite_grid_points": int((~np.isfinite(logp)).sum()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _figure(data, gx, gy, logp, result, path)
    return path


def _title(rec: Any) -> str:
    where = f"best epoch {R.best_epoch(rec)}" if R.best_epoch(rec) is not None else "closed form"
    tag = f" [{R.tag(rec)}]" if R.tag(rec) else ""
    return f"{R.label(rec)}{tag} on {R.dataset(rec)}, seed {R.seed(rec)} ({where}): test LL {R.test_ll(rec):.2f} nats"


def plot_samples(
    rec: Any,
    data: Dataset | None = None,
    *,
    n: int | None = None,
    seed: int = 0,
    dims: Sequence[int] | None = None,
    data_root: str | Path | None = None,
) -> Any:
    """The samples figure of one record (images or pairwise; toy data: use :func:`save_samples`).

    Args:
        rec: the run record; its checkpoint must sit beside it.
        data: the dataset (default: loaded by the record's name under ``data_root``).
        n: number of samples (default 64 for images, beside as many test images; 1000 for tabular data).
        seed: seed of the sampling generator.
        dims: tabular data: the dimensions to pair (default the first four).
    """
    if n is not None and n < 1:
        raise ConfigError(f"the number of samples must be positive; got {n}")
    check_checkpoint(rec)
    data = data if data is not None else load_dataset_for(rec, data_root)
    n = n or (64 if data.image else 1000)
    if data.image:  # checked before the model is rebuilt and sampled
        if dims is not None:
            raise ConfigError(
                f"--dims applies to tabular data (pairwise marginals of chosen dimensions); {data.name} "
                "is an image dataset, drawn as whole images: leave --dims out"
            )
        if n > MAX_IMAGES:
            raise ConfigError(
                f"-n {n}: a grid of more than {MAX_IMAGES} images is unreadable at the figure's size "
                f"(each image shrinks below one screen pixel per pixel); give -n {MAX_IMAGES} or fewer"
            )
        shape = image_layout(data.name, data.dim, data.image_shape)
    else:
        dims = list(range(min(4, data.dim))) if dims is None else [int(d) for d in dims]
        bad = [d for d in dims if not 0 <= d < data.dim]
        if bad or len(set(dims)) != len(dims) or not dims:
            raise ConfigError(f"--dims {dims}: give distinct dimensions in 0..{data.dim - 1}")
    samples = draw(load_flow(rec, data), n, seed)
    if data.image:
        test = np.asarray(data.test[:n], dtype=np.float64)
        return image_grid_figure(
            logit_to_pixels(samples, data.logit_alpha), logit_to_pixels(test, data.logit_alpha), shape, _title(rec)
        )
    rng = np.random.default_rng(seed)
    test = np.asarray(data.test, dtype=np.float64)
    test = test[rng.choice(len(test), size=min(len(test), n), replace=False)]
    return pairwise_figure(samples, test, dims, _title(rec))


def save_samples(rec: Any, path: str | Path, data: Dataset | None = None, **kwargs: Any) -> Path:
    """The samples figure of ``rec`` as a PNG at ``path`` (2-D toy data: the learned density figure)."""
    path = Path(path)
    if R.dataset(rec).startswith(TOY_PREFIX):
        given = [flag for flag, key in (("-n", "n"), ("--dims", "dims")) if kwargs.get(key) is not None]
        if given:  # the toy figure is the learned density over the plane: no samples to count or pair
            raise ConfigError(
                f"{' and '.join(given)} do{'es' if len(given) == 1 else ''} not apply to a 2-D toy "
                f"record ({R.dataset(rec)}): its figure is the learned density; leave "
                f"{'it' if len(given) == 1 else 'them'} out"
            )
        check_checkpoint(rec)
        data = data if data is not None else load_dataset_for(rec, kwargs.get("data_root"))
        return _toy2d_density(rec, load_flow(rec, data), data, path)
    return save_figure(plot_samples(rec, data, **kwargs), path)
