"""One experiment end to end: options → data → model → training → evaluation → :class:`RunRecord`.

This is what ``flowbench run`` and the sweeps call: a single run, or with ``--seeds`` a stack of runs
(:mod:`flowbench.training.stacked`). The steps a run shares with a stack (paths, lock, building, finishing,
the record) are :mod:`flowbench.training.lifecycle`'s; the protocol is MAF's (Papamakarios et al. 2017, §4).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Mapping

import torch

from flowbench import aggregate, models
from flowbench.config import RunOptions, coerce_options
from flowbench.data import get_info
from flowbench.data.base import Dataset
from flowbench.errors import ConfigError
from flowbench.published import PUBLISHED, SOURCES
from flowbench.results import RunRecord
from flowbench.training import lifecycle, stacked
from flowbench.training.trainer import EpochInfo, checkpoint_where
from flowbench.utils import set_threads

__all__ = ["run_experiment", "run_and_report", "summary_line", "SMALL_DIM"]

#: Below this data dimension the matrices are too small for intra-op threads to pay; on a machine whose
#: cores are busy, torch's default threads even slow training down many times over (measured: the default
#: digits run took 270 s with 2 threads and 22 s with 1 on a loaded 2-core machine).
SMALL_DIM = 256


def _tensorboard(opts: RunOptions) -> Callable[[EpochInfo], None] | None:
    """``--tensorboard DIR``: a per-epoch logger in this run's own folder under DIR, or None."""
    if opts.tensorboard is None:
        return None
    # lazy on purpose: the tensorboard extra is optional, and importing it is slow
    from flowbench.training.tensorboard import run_log_dir, tensorboard_callback

    return tensorboard_callback(run_log_dir(opts.tensorboard, opts.dataset, opts.model, opts.seed, opts.tag))


def run_experiment(
    options: RunOptions | Mapping[str, Any],
    data: Dataset | None = None,
    *,
    callbacks: list[Callable[[EpochInfo], None]] | None = None,
    progress: bool = True,
) -> RunRecord:
    """Train, evaluate and record one run; returns the record (also written to the record path).

    ``options`` is a :class:`RunOptions` or a mapping of option values resolved over the defaults (no bundled
    config). ``data`` replaces loading ``options.dataset`` (in-memory data for toy problems and tests); the
    record then carries ``data.name``. ``callbacks`` are called after each epoch's checkpoint. The run holds
    its lock file from the first check to the record; afterwards only the evaluated model's state is kept
    (``seed<k>.model.pt``) unless ``keep_checkpoint``.
    """
    opts = coerce_options(options)
    if data is not None:
        opts = opts.replace(dataset=data.name)
    with lifecycle.claim([opts]) as (files,):
        t0 = time.perf_counter()
        prep = lifecycle.prepare([opts], data)
        (built,) = prep.built
        logger = _tensorboard(opts)
        every_epoch = [*(callbacks or []), *([logger] if logger else [])]
        try:
            result, notes, prior_time = lifecycle.train_single(
                built.flow, prep.x, opts, files.checkpoint, every_epoch, progress
            )
        finally:
            if logger is not None:
                logger.close()
        # Wall time includes the training time of earlier sessions when resumed (the whole run's).
        return lifecycle.finish_run(opts, files, prep, built, result, notes, t0 - prior_time)


def summary_line(record: RunRecord, path: Any) -> str:
    """One human line: the headline result and where the record went."""
    given = " (given the label)" if record.conditional else ""  # validation scores log p(x | y)
    trained = (
        f"best val LL {record.best_val_ll:.3f}{given} at epoch {record.best_epoch}, {record.epochs} epochs"
        if record.best_epoch is not None
        else f"no epoch validated, {record.stop_reason}"
    )
    error = f" ± {record.test_ll_2se:.3f}" if math.isfinite(record.test_ll_2se) else ""  # none for a −inf mean
    line = (
        f"{record.display_name} on {record.dataset}: test LL {record.test_ll:.3f}{error} "
        f"nats ({trained}, {record.params} params, {record.wall_time_s:.1f} s)"
    )
    if record.bits_per_pixel is not None:
        line += f"; {record.bits_per_pixel:.3f} bits/pixel"
    if record.conditional and record.test_ll_conditional is not None:
        # MAF Table 2's conditional column reports log p(x) under a uniform label prior (the test LL above)
        line += (
            f"\n(class-conditional: test LL is log p(x) = logsumexp_y log p(x | y) − log K; at the true label "
            f"log p(x | y) = {record.test_ll_conditional:.3f} ± {record.test_ll_conditional_2se:.3f}; "
            f"classification accuracy {record.test_accuracy:.1%})"
        )
    origin = record.model_origin or {}
    if origin.get("kind", "built-in") != "built-in":
        # A peer library's flow keeps its own architecture: beside the paper's rows the difference is the model.
        paper = models.get_spec(record.model_ref or record.model).paper
        where = record.model_ref or f"plugin {origin.get('detail', '')}".strip()
        line += f"\n(plugged in from {where}: {paper}; trained and evaluated under flowbench's protocol)"
    if record.provenance is not None and not record.provenance.get("verified"):
        column = aggregate.column(record)
        beside = [p for p in PUBLISHED if p.model == record.display_name and p.dataset == column]
        if beside:  # a published number stands beside this cell: say ours is not its configuration
            p = beside[0]
            line += (
                f"\n(ours, config unverified: the {SOURCES[p.source][0]}'s settings for this cell could not be "
                f"confirmed, so this is not a reproduction of its {p.mean:g}; see the config's [provenance])"
            )
    if record.status != "ok":
        line += f"\nstatus {record.status}: {record.failure}"
    return line + f"\nrecord: {path}"


def _set_threads(opts: RunOptions) -> None:
    """Apply ``--threads`` or the default rule (see :data:`SMALL_DIM`)."""
    if opts.threads is not None:
        set_threads(opts.threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        try:
            info = get_info(opts.dataset_key)
        except ConfigError:  # an unknown dataset is reported when it is loaded
            info = None
        if info is not None and info.dim < SMALL_DIM:
            torch.set_num_threads(1)


def run_and_report(opts: RunOptions) -> int:
    """``flowbench run``: set threads, train, print the summary line; exit status 0 when the run is ok."""
    _set_threads(opts)
    if opts.seeds is not None:
        runs = [opts.replace(seed=s, seeds=None) for s in stacked.parse_seeds(opts.seeds)]
        try:
            records = stacked.run_stacked(runs, progress=not opts.quiet)
        except KeyboardInterrupt as e:
            print(_stopped(e, runs), file=sys.stderr)
            raise
        for record, run in zip(records, runs):
            print(summary_line(record, lifecycle.run_files(run.replace(dataset=record.dataset)).record))
        _check_finite(runs, records)
        return 0 if all(r.status == "ok" for r in records) else 1
    try:
        record = run_experiment(opts, progress=not opts.quiet)
    except KeyboardInterrupt as e:
        print(_stopped(e, [opts]), file=sys.stderr)
        raise
    print(summary_line(record, lifecycle.run_files(opts.replace(dataset=record.dataset)).record))
    _check_finite([opts], [record])
    return 0 if record.status == "ok" else 1


def _stopped(e: KeyboardInterrupt, runs: list[RunOptions]) -> str:
    """What an interrupt left, and the command that continues: the checkpoints written where the loop stopped
    (see :mod:`flowbench.interrupts`), or, stopped at once (a second Ctrl-C, while loading data, while writing the
    record), what is on disk: a record, a checkpoint, or nothing yet."""
    stack = len(runs) > 1
    resume = "run the same command with --resume to continue"
    saved = getattr(e, "saved", None)
    if saved is not None:
        whose = "each seed" if stack else "the run"
        return f"training stopped {saved}, where {whose}'s checkpoint was written: {resume}"
    files = {o.seed: lifecycle.run_files(o) for o in runs}
    done = [o.seed for o in runs if files[o.seed].record.is_file()]
    kept = [o.seed for o in runs if o.seed not in done and files[o.seed].checkpoint.is_file()]
    fresh = [o.seed for o in runs if o.seed not in done and o.seed not in kept]
    if not stack:
        if done:
            return f"training interrupted after the record was written ({files[runs[0].seed].record}): the run is done"
        if kept:
            where = checkpoint_where(files[kept[0]].checkpoint)
            return f"training interrupted; the last checkpoint ({where}) is kept: {resume}"
        return "training interrupted before the run's first checkpoint: run the same command again to start it afresh"
    if len(kept) == len(runs):
        return f"training interrupted; each seed's last checkpoint is kept: {resume}"
    if len(fresh) == len(runs):
        return "training interrupted before the seeds' first checkpoints: run the same command again to start afresh"
    listed = lambda seeds: ",".join(map(str, seeds))  # noqa: E731
    named = lambda seeds, one, many: f"seed {seeds[0]} {one}" if len(seeds) == 1 else f"seeds {listed(seeds)} {many}"  # noqa: E731
    parts = [named(done, "is recorded", "are recorded")] if done else []
    if kept:
        parts.append(f"{named(kept, 'has', 'have')} a checkpoint: continue with --seeds {listed(kept)} --resume")
    if fresh:
        parts.append(f"{named(fresh, 'has', 'have')} none yet: start again with --seeds {listed(fresh)}")
    return "training interrupted; " + "; ".join(parts)


def _check_finite(runs: list[RunOptions], records: list[RunRecord]) -> None:
    """A run that ended non-finite was given a setting it cannot train with (``--lr 1e10``): a ConfigError (exit
    2) that says what to change. Its record stays, and the next run of the command replaces it without --force."""
    bad = [(o, r) for o, r in zip(runs, records) if r.status == "nonfinite"]
    if not bad:
        return
    o, r = bad[0]
    default = models.get_spec(o.model_key).lr
    advice = "" if "--lr" in (r.failure or "") else " (lower --lr, or check the data for outliers)"
    lr = f"this run's --lr was {o.lr:g}" + (f" ({o.model}'s default: {default:g})" if o.lr != default else "")
    seeds = "" if len(runs) == 1 else f" for seed{'s' if len(bad) > 1 else ''} {', '.join(str(b.seed) for b, _ in bad)}"
    kept = "its record is" if len(bad) == 1 else "their records are"
    raise ConfigError(
        f"training did not stay finite{seeds}: {r.failure}{advice}; {lr}. {kept.capitalize()} kept with "
        "status nonfinite, and the next run of this command replaces "
        f"{'it' if len(bad) == 1 else 'them'} without --force"
    )
