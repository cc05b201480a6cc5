"""One experiment end to end: options → data → model → training → evaluation → JSON record.

This is what ``flowbench run`` and the sweeps call. The protocol is MAF's (Papamakarios et al. 2017, §4);
the parameter matching of baselines to another model follows Gresele et al. 2020, appendix H.3.
"""

from __future__ import annotations

import math
import random
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from flowbench.config import DEFAULTS, default_lr, model_hparams_from_options, normalize, parse_match_params
from flowbench.data.base import Dataset
from flowbench.errors import ConfigError
from flowbench.models.params import count_params
from flowbench.results import check_overwrite, checkpoint_path, record_path, system_info, write_record
from flowbench.training.evaluate import evaluate_test, log_prob_batches, spectral_norm_summary
from flowbench.training.trainer import EpochInfo, Trainer, TrainResult
from flowbench.utils import resolve_device

__all__ = ["run_experiment", "complete_options", "build_from_options"]

#: Test points used for the Jacobian spectral norm (power iteration per point; a summary, not a statistic).
JACOBIAN_POINTS = 64


def complete_options(options: dict[str, Any]) -> dict[str, Any]:
    """Fill missing options with the defaults (callers such as sweeps may pass a partial dict)."""
    given = normalize(options, "run options")
    full = dict(DEFAULTS)
    full.update({k: v for k, v in given.items() if v is not None or k not in full})
    if full["lr"] is None:
        full["lr"] = default_lr(full["model"])
    full["match_params"] = parse_match_params(full["match_params"])
    return full


def _target_count(target: int | str, dataset: str, dim: int) -> tuple[int, str]:
    """The parameter count to match: a number, or the count of model ``target`` as configured for ``dataset``."""
    from flowbench.config import resolve_options
    from flowbench.models import build_model

    if isinstance(target, int):
        return target, str(target)
    other = resolve_options({"dataset": dataset, "model": target})
    hp = model_hparams_from_options(other)
    return count_params(build_model(target, dim, **hp)), target


def build_from_options(options: dict[str, Any], dim: int) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any] | None]:
    """Build the model; returns ``(flow, hparams used, match info or None)``."""
    from flowbench.models import build_model

    hparams = model_hparams_from_options(options)
    match = None
    if options["match_params"] is not None:
        from flowbench.models.params import match_params

        target, label = _target_count(options["match_params"], options["dataset"], dim)
        # Matching solves for the model's knob (the hidden width for the MAF family, as in Gresele et al.
        # 2020, H.3); a configured value of the knob yields to it, everything else stays fixed.
        result = match_params(options["model"], dim, target, **hparams)
        hparams = dict(result["hparams"])
        match = {
            "target": int(result["target"]),
            "achieved": int(result["achieved"]),
            "against": label,
            "knob": result.get("knob"),
        }
    flow = build_model(options["model"], dim, **hparams)
    from flowbench import models

    if options["model"] in models.MODELS:
        # Record every hyperparameter, defaults included, so the record alone reproduces the model.
        hparams = models.resolve_hparams(options["model"], **hparams)
    return flow, hparams, match


def _display_name(model: str, hparams: dict[str, Any]) -> str:
    from flowbench.models import display_name

    return display_name(model, **hparams)


def run_experiment(
    options: dict[str, Any],
    data: Dataset | None = None,
    *,
    callbacks: list[Callable[[EpochInfo], None]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and record one run; returns the record (also written to the record path).

    ``data`` replaces loading ``options['dataset']`` (in-memory data for toy problems and tests); the record
    then carries ``data.name``. ``callbacks`` are called after each epoch's checkpoint with an
    :class:`EpochInfo`.
    """
    t0 = time.perf_counter()
    opts = complete_options(options)
    if data is not None:
        opts["dataset"] = data.name
    rec_path = record_path(opts["out"], opts["dataset"], opts["model"], opts["seed"], opts["tag"])
    ckpt_path = checkpoint_path(opts["out"], opts["dataset"], opts["model"], opts["seed"], opts["tag"])
    check_overwrite(rec_path, opts["force"])  # before spending any compute
    if opts["resume"] and not ckpt_path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start afresh")
    if data is None:
        from flowbench.data import load_dataset

        data = load_dataset(opts["dataset"], opts["data_root"])
    device = resolve_device(opts["device"])

    # Seed everything before the model is built, so initial weights depend on the seed only.
    random.seed(opts["seed"])
    np.random.seed(opts["seed"])
    torch.manual_seed(opts["seed"])
    flow, hparams, match = build_from_options(opts, data.dim)
    flow = flow.to(device)
    # Data moved to the device once; batches are index views of these tensors.
    train_x = torch.as_tensor(np.asarray(data.train), dtype=torch.float32, device=device)
    val_x = torch.as_tensor(np.asarray(data.val), dtype=torch.float32, device=device)
    test_x = torch.as_tensor(np.asarray(data.test), dtype=torch.float32, device=device)
    flow.initialize(train_x)

    notes: list[str] = []
    prior_time = 0.0
    if flow.trainable:
        trainer = Trainer(
            flow,
            train_x,
            val_x,
            lr=opts["lr"],
            weight_decay=opts["weight_decay"],
            batch_size=opts["batch_size"],
            patience=opts["patience"],
            max_epochs=opts["max_epochs"],
            seed=opts["seed"],
            eval_batch_size=opts["eval_batch_size"],
            checkpoint_path=ckpt_path,
            fingerprint=dict(opts),
            callbacks=callbacks,
            progress=progress,
            compile=bool(opts["compile"]),
        )
        if opts["resume"]:
            trainer.load_checkpoint()
            prior_time = trainer.result.train_time_s
            notes.append(f"resumed from the checkpoint after epoch {trainer.result.resumed_from_epoch}")
        elif ckpt_path.exists():
            notes.append("an older checkpoint was replaced (run with --resume to continue one instead)")
        result = trainer.fit()
        best_val_ll = result.best_val_ll
    else:
        # Closed-form models (the Gaussian baseline) are fitted completely by initialize().
        result = TrainResult()
        result.stop_reason = "closed-form fit (not trainable)"
        flow.eval()
        flow.prepare_for_eval(train_x)
        best_val_ll = float(np.mean(log_prob_batches(flow, val_x, opts["eval_batch_size"])))

    evaluation = evaluate_test(flow, data, test_x, opts["eval_batch_size"])
    jac, note = spectral_norm_summary(flow, test_x[:JACOBIAN_POINTS])
    if note:
        notes.append(note)
    if result.status == "ok" and not math.isfinite(evaluation["test_ll"]):
        result.status, result.failure = "nonfinite", "test log-likelihood is not finite"

    info = system_info()
    record: dict[str, Any] = {
        "dataset": opts["dataset"],
        "model": opts["model"],
        "display_name": _display_name(opts["model"], hparams),
        "tag": opts["tag"],
        "seed": opts["seed"],
        "config": dict(opts),
        "hparams": hparams,
        "params": count_params(flow),
        "match_target": match,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "best_val_ll": best_val_ll,
        "stop_reason": result.stop_reason,
        **evaluation,
        "history": result.history,
        "train_time_s": result.train_time_s,
        # Includes the training time of earlier sessions when resumed (wall time of the whole run).
        "wall_time_s": prior_time + time.perf_counter() - t0,
        "device": str(device),
        "threads": torch.get_num_threads(),
        **info,
        "status": result.status,
        "failure": result.failure,
        "jacobian_spectral_norm": jac,
        "notes": notes,
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else None,
    }
    write_record(rec_path, record, force=opts["force"])
    return record


def summary_line(record: dict[str, Any], path: Any) -> str:
    """One human line: the headline result and where the record went."""
    trained = (
        f"best val LL {record['best_val_ll']:.3f} at epoch {record['best_epoch']}, {record['epochs']} epochs"
        if record["best_epoch"] is not None
        else f"val LL {record['best_val_ll']:.3f}, {record['stop_reason']}"
    )
    line = (
        f"{record['display_name']} on {record['dataset']}: test LL {record['test_ll']:.3f} ± {record['test_ll_se2']:.3f} "
        f"nats ({trained}, {record['params']} params, {record['wall_time_s']:.1f} s)"
    )
    if "bits_per_pixel" in record:
        line += f"; {record['bits_per_pixel']:.3f} bits/pixel"
    if record["status"] != "ok":
        line += f"\nstatus {record['status']}: {record['failure']}"
    return line + f"\nrecord: {path}"
