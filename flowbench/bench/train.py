"""Training throughput of one model on one dataset's shape: samples/s and seconds per epoch.

The step timed is the trainer's: Adam, ``-train_log_prob(x).mean()``, ``backward()``,
``step()``, on random minibatches. When the dataset is not prepared, standard-normal data of the right shape
(D and N train from :data:`flowbench.data.DATASETS`) stands in, and the result says so. Optionally the same
measurement for zuko's ``MAF`` (or ``NSF`` for nsf-ar) with (as nearly as possible) the same parameter count,
interleaved with ours
in one run (zuko is a dev/benchmark extra: ``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from flowbench.bench.common import setup
from flowbench.config import resolve_options
from flowbench.data import get_info, load_dataset
from flowbench.errors import ConfigError, DatasetNotFoundError
from flowbench.models import build_model, display_name, get_spec, resolve_hparams
from flowbench.plugins import is_reference, normalize_reference
from flowbench.training.lifecycle import label_classes
from flowbench.training.trainer import compiled, has_fused_adam
from flowbench.utils import atomic_write_json, check_number, resolve_device

if TYPE_CHECKING:
    from flowbench.models.base import Flow

#: A training objective: a minibatch to the scalar loss.
LossFn = Callable[[torch.Tensor], torch.Tensor]


def dataset_tensor(
    name: str, data_root: str | Path | None = None, max_rows: int = 200_000
) -> tuple[torch.Tensor, int, bool]:
    """(training rows, N train, synthetic?) — the prepared data if present, else N(0, I) of the right shape."""
    info = get_info(name)  # a name or a reference; ConfigError saying what is wrong
    try:
        ds = load_dataset(name, data_root)
        x = torch.as_tensor(ds.train[:max_rows], dtype=torch.float32)
        return x, int(ds.train.shape[0]), False
    except DatasetNotFoundError:
        gen = torch.Generator().manual_seed(0)
        n = int(info.sizes[0])
        return torch.randn(min(n, max_rows), int(info.dim), generator=gen), n, True


def _label_columns(dataset: str, model: str) -> dict[str, int]:
    """``{"classes": K}`` for a class-conditional model on a labelled dataset, ``{}`` for any other model."""
    classes = label_classes(model, get_info(dataset))
    return {"classes": classes} if classes else {}


#: torch.optim.Adam implementations: the trainer's default (a per-tensor loop on CPU), foreach, fused.
ADAM_IMPLS = ("default", "foreach", "fused")


def resolve_adam(impl: str | None, device: torch.device) -> str:
    """The Adam implementation to time: ``impl``, or for None the trainer's (fused where this torch has a fused
    kernel on ``device``, else the default loop: :func:`~flowbench.training.trainer.make_adam`). ``fused`` where
    torch has none (the CPU before torch 2.4) is a ConfigError that says what to use."""
    fused = has_fused_adam(device)
    if impl == "fused" and not fused:
        raise ConfigError(
            f"--adam fused: torch {torch.__version__} has no fused Adam on {device.type} (torch 2.4 and later have "
            "one for the CPU); use --adam default or foreach, or leave --adam out to time the trainer's own choice"
        )
    return impl or ("fused" if fused else "default")


def _adam(params: Iterable[torch.Tensor], lr: float, impl: str) -> torch.optim.Optimizer:
    kw = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    return torch.optim.Adam(params, lr=lr, **kw)


def _trainer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn, batch: torch.Tensor) -> None:
    """One step exactly as flowbench's trainer takes it (loss, backward, Adam)."""
    opt.zero_grad(set_to_none=True)
    loss_fn(batch).backward()
    opt.step()


def _loss_fns(
    ours: Flow | None, zflow: torch.nn.Module | None = None, compile_ours: bool = False, compile_zuko: bool = False
) -> tuple[LossFn, LossFn]:
    def ours_loss(b: torch.Tensor) -> torch.Tensor:
        return -ours.train_log_prob(b).mean()

    def zuko_loss(b: torch.Tensor) -> torch.Tensor:
        return -zflow().log_prob(b).mean()

    return (
        compiled(ours_loss) if compile_ours else ours_loss,
        compiled(zuko_loss) if compile_zuko else zuko_loss,
    )


def _zuko():
    try:  # lazy: zuko is an optional extra
        import zuko
    except ImportError as e:  # a benchmark-only dependency, never imported at runtime
        raise ConfigError(
            "the zuko comparison needs zuko: pip install -e '.[bench]' in the checkout (or pip install zuko)"
        ) from e
    return zuko


def _zuko_matched(build: Callable[[int], torch.nn.Module], target_params: int) -> tuple[torch.nn.Module, int, int]:
    """``(build(h), h, count)`` for the hidden width h whose parameter count is closest to the target."""

    def count(h: int) -> int:
        return sum(p.numel() for p in build(h).parameters())

    lo, hi = 1, 8
    while count(hi) < target_params:
        hi *= 2
    while hi - lo > 1:  # count is increasing in h
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target_params else (lo, mid)
    h = min((lo, hi), key=lambda v: abs(count(v) - target_params))
    return build(h), h, count(h)


def zuko_maf(dim: int, layers: int, hidden_layers: int, target_params: int) -> tuple[torch.nn.Module, int, int]:
    """zuko MAF with ``layers`` transforms whose hidden width makes its parameter count closest to target."""
    zuko = _zuko()
    return _zuko_matched(
        lambda h: zuko.flows.MAF(features=dim, transforms=layers, hidden_features=[h] * hidden_layers), target_params
    )


def zuko_nsf(dim: int, layers: int, bins: int, blocks: int, target_params: int) -> tuple[torch.nn.Module, int, int]:
    """zuko NSF (autoregressive rational-quadratic splines) with ``layers`` transforms and ``bins`` bins, its
    MADE as deep as our ResMADE (1 + 2·blocks hidden linear layers), the width matched to the target count.

    zuko's version has no LU layers and no residual connections; the parameter count is what is matched.
    """
    zuko = _zuko()
    return _zuko_matched(
        lambda h: zuko.flows.NSF(features=dim, bins=bins, transforms=layers, hidden_features=[h] * (1 + 2 * blocks)),
        target_params,
    )


#: ``model -> (dim, resolved hparams, target count) -> (zuko flow, width, count)`` for ``--compare-zuko``.
ZUKO_TWINS: dict[str, Callable] = {
    "maf": lambda dim, hp, n: zuko_maf(dim, hp["layers"], hp["hidden_layers"], n),
    "nsf-ar": lambda dim, hp, n: zuko_nsf(dim, hp["layers"], hp["bins"], hp["blocks"], n),
}


#: One timed contender: (module, optimiser, loss function, step function).
Contender = tuple[torch.nn.Module, torch.optim.Optimizer, Callable, Callable]


def _check(adam: str | None, steps: int, batch_size: int, lr: float, warmup: int, rounds: int) -> None:
    if adam is not None and adam not in ADAM_IMPLS:
        raise ConfigError(f"--adam must be one of {', '.join(ADAM_IMPLS)}; got {adam!r}")
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"--steps and --batch-size must be ≥ 1; got {steps}, {batch_size}")
    if warmup < 0 or rounds < 1:
        raise ConfigError(f"warmup must be ≥ 0 and rounds ≥ 1; got {warmup}, {rounds}")
    check_number("--lr", lr)


def _zuko_contender(
    model: str,
    hparams: dict,
    dim: int,
    target_params: int,
    lr: float,
    adam: str,
    compile_zuko: bool,
    device: torch.device,
) -> tuple[Contender, dict]:
    """zuko's twin of ``model`` (:data:`ZUKO_TWINS`) matched to our parameter count, and what the result
    records about it."""
    hp = resolve_hparams(model, **hparams)
    zflow, zh, zcount = ZUKO_TWINS[model](dim, hp, target_params)
    import zuko  # lazy: an optional extra, importable here since the twin has just used it

    zflow = zflow.to(device)
    _, zuko_loss = _loss_fns(None, zflow, compile_zuko=compile_zuko)
    return (
        (zflow, _adam(zflow.parameters(), lr, adam), zuko_loss, _trainer_step),
        {"zuko_params": zcount, "zuko_hidden": zh, "zuko_version": zuko.__version__},
    )


def _time_contenders(
    contenders: dict[str, Contender],
    x: torch.Tensor,
    steps: int,
    batch_size: int,
    warmup: int,
    rounds: int,
    seed: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Mean step time of each of ``rounds`` blocks per contender, after ``warmup`` untimed steps; the
    contenders alternate block by block so that load changes hit every one alike. All see the same
    minibatches."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, x.shape[0], (warmup + steps, batch_size), generator=gen).to(device)
    for m, opt, loss_fn, step in contenders.values():
        for i in range(warmup):
            step(m, opt, loss_fn, x[idx[i]])
    times: dict[str, list[float]] = {name: [] for name in contenders}
    per_round = max(1, steps // rounds)
    done = 0
    while done < steps:
        k = min(per_round, steps - done)
        for name, (m, opt, loss_fn, step) in contenders.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for i in range(warmup + done, warmup + done + k):
                step(m, opt, loss_fn, x[idx[i]])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - t0) / k)
        done += k
    return times


def _report(result: dict, times: dict[str, list[float]], log: Callable[[str], None]) -> None:
    """Fill step_s / samples_per_s / epoch_s (median over rounds of the mean step time) and log them."""
    batch_size, n_train = result["batch_size"], result["n_train"]
    result["step_s"], result["samples_per_s"], result["epoch_s"] = {}, {}, {}
    for name, ts in times.items():
        step_s = statistics.median(ts)
        result["step_s"][name] = step_s
        result["samples_per_s"][name] = batch_size / step_s
        result["epoch_s"][name] = n_train / (batch_size / step_s)
        log(
            f"{name:>9}: {batch_size / step_s:10.0f} samples/s   {step_s * 1e3:8.3f} ms/step   "
            f"{n_train / (batch_size / step_s):9.1f} s/epoch ({n_train} samples)   "
            f"{result['params'][name]} params"
        )
    if "zuko" in times:
        result["throughput_ratio_flowbench_over_zuko"] = (
            result["samples_per_s"]["flowbench"] / result["samples_per_s"]["zuko"]
        )
        log(f"flowbench / zuko throughput: {result['throughput_ratio_flowbench_over_zuko']:.2f}×")
    if result["synthetic_data"]:
        log(
            f"note: {result['dataset']} is not prepared; timed on synthetic N(0, I) data of shape "
            f"({n_train}, {result['dim']})"
        )


def run_train(
    dataset: str,
    model: str,
    steps: int = 200,
    batch_size: int = 100,
    lr: float = 1e-4,
    device: str | torch.device = "cpu",
    hparams: dict | None = None,
    compare_zuko: bool = False,
    warmup: int = 10,
    rounds: int = 5,
    data_root: str | Path | None = None,
    seed: int = 0,
    adam: str | None = None,
    compile: bool = False,
    compile_zuko: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Time ``steps`` training steps (in ``rounds`` blocks, alternating with zuko when asked).

    ``adam``: the Adam implementation of every contender (:func:`resolve_adam`; None: the trainer's).
    ``compile`` / ``compile_zuko`` put flowbench's / zuko's training objective through ``torch.compile``
    (the compile happens in the warm-up and is not timed).
    """
    _check(adam, steps, batch_size, lr, warmup, rounds)
    if compare_zuko and model not in ZUKO_TWINS:
        raise ConfigError(f"--compare-zuko is implemented for --model {' and '.join(ZUKO_TWINS)} only")
    device = torch.device(device)
    adam = resolve_adam(adam, device)
    torch.manual_seed(seed)
    x, dim, n_train, synthetic, label_kw = _training_rows(dataset, model, data_root, seed, device)
    hparams = dict(hparams or {})
    contenders = {"flowbench": _flowbench_contender(model, dim, label_kw, hparams, x, device, lr, adam, compile)}
    result: dict = {
        **_subject(dataset, model, hparams, dim, n_train, synthetic),
        "batch_size": batch_size,
        "steps": steps,
        "device": str(device),
        "adam": adam,
        "compile": {"flowbench": compile, "zuko": compile_zuko if compare_zuko else None},
        "params": {"flowbench": sum(p.numel() for p in contenders["flowbench"][0].parameters())},
    }
    if compare_zuko:
        contenders["zuko"], info = _zuko_contender(
            model, hparams, dim, result["params"]["flowbench"], lr, adam, compile_zuko, device
        )
        result["params"]["zuko"] = info["zuko_params"]
        result["zuko_hidden"], result["zuko_version"] = info["zuko_hidden"], info["zuko_version"]
    _report(result, _time_contenders(contenders, x, steps, batch_size, warmup, rounds, seed, device), log)
    return result


def _training_rows(
    dataset: str, model: str, data_root: str | Path | None, seed: int, device: torch.device
) -> tuple[torch.Tensor, int, int, bool, dict[str, int]]:
    """(rows on ``device``, D, N train, synthetic?, the label keyword of a class-conditional model): the
    dataset's training rows, a class-conditional model's with one-hot labels appended."""
    x, n_train, synthetic = dataset_tensor(dataset, data_root)
    dim = x.shape[1]
    label_kw = _label_columns(dataset, model)
    if label_kw:  # a class-conditional model reads [x, onehot(y)]; labels drawn at random (timing only)
        k = label_kw["classes"]
        y = torch.randint(0, k, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
        x = torch.cat([x, torch.nn.functional.one_hot(y, k).to(x.dtype)], dim=1)
    return x.to(device), dim, n_train, synthetic, label_kw


def _flowbench_contender(
    model: str,
    dim: int,
    label_kw: dict[str, int],
    hparams: dict,
    x: torch.Tensor,
    device: torch.device,
    lr: float,
    adam: str,
    compile_ours: bool,
) -> Contender:
    """Our ``model``, built and initialised on ``x`` in training mode, with its optimiser and objective."""
    ours = build_model(model, dim, **label_kw, **hparams).to(device)
    if not ours.trainable:
        raise ConfigError(f"model {model!r} has nothing to train (closed form); pick a trainable model")
    ours.train()
    ours.initialize(x)
    ours_loss, _ = _loss_fns(ours, compile_ours=compile_ours)
    return ours, _adam(ours.parameters(), lr, adam), ours_loss, _trainer_step


def _subject(dataset: str, model: str, hparams: dict, dim: int, n_train: int, synthetic: bool) -> dict:
    """The result's first entries: the model and the data it is timed on, named as flowbench names them."""
    return {
        "dataset": get_info(dataset).name,
        "model": get_spec(model).name,
        "model_ref": normalize_reference(model) if is_reference(model) else None,
        "display_name": display_name(model, **hparams),
        "hparams": hparams,
        "dim": dim,
        "n_train": n_train,
        "synthetic_data": synthetic,
    }


def bench_train(
    dataset: str,
    model: str,
    out: str | Path = "results",
    steps: int = 200,
    batch_size: int = 100,
    lr: float = 1e-4,
    hparams: dict | None = None,
    compare_zuko: bool = False,
    adam: str | None = None,
    compile: bool = False,
    compile_zuko: bool = False,
    data_root: str | Path | None = None,
    device: str = "auto",
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """``flowbench bench train``: :func:`run_train` written to ``out/bench/train-<dataset>-<model>[-adam-<impl>]
    [-compiled].json`` (``-adam-<impl>``: an Adam other than the trainer's); returns the record + ``"files"``."""
    _check(adam, steps, batch_size, lr, 0, 1)  # before the output folder and the machine line
    dev = resolve_device(device)
    trainers, adam = resolve_adam(None, dev), resolve_adam(adam, dev)
    folder, _, machine = setup(out, device, threads, log)
    res = run_train(
        dataset,
        model,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        device=dev,
        hparams=hparams,
        compare_zuko=compare_zuko,
        data_root=data_root,
        adam=adam,
        compile=compile,
        compile_zuko=compile_zuko,
        log=log,
    )
    res["machine"] = machine
    suffix = ("" if adam == trainers else f"-adam-{adam}") + ("-compiled" if compile else "")
    path = folder / f"train-{res['dataset']}-{res['model']}{suffix}.json"
    atomic_write_json(path, res)
    return {**res, "files": [str(path)]}


def run_settings(
    dataset: str, model: str, batch_size: int | None = None, lr: float | None = None, hparams: dict | None = None
) -> tuple[int, float, dict, str]:
    """Batch size, learning rate and hyperparameters a ``flowbench run`` of ``model`` on ``dataset`` trains
    with (defaults < ``configs/<dataset>/<model>.toml``), with the given values overriding; plus a line saying
    where they came from. So ``bench train`` times the step that run actually takes (relgrad on MNIST: batch 10).
    """
    get_info(dataset)  # an unknown dataset is said before any settings are printed for it
    explicit = {
        **(hparams or {}),
        **({"batch_size": batch_size} if batch_size is not None else {}),
        **({"lr": lr} if lr is not None else {}),
    }
    opts = resolve_options({"dataset": dataset, "model": model, **explicit})
    source = opts.config or "the defaults (no run config for this dataset and model)"
    given = ", ".join(sorted(explicit)) or "none"
    line = (
        f"settings of `flowbench run --dataset {dataset} --model {model}` from {source}; given here: {given} "
        f"-> batch {opts.batch_size}, lr {opts.lr:g}"
    )
    return opts.batch_size, opts.lr, dict(opts.hparams), line
