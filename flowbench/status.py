"""How a run ended, in the words of the MAF protocol: converged by patience, capped, non-finite, failed.

The trainer writes how a run ended into the record's ``ended`` field (one of :data:`KINDS`); records written
before that field are classified from their ``stop_reason`` text. A run only reproduces the protocol
(Papamakarios et al. 2017, section 4: early stopping after 30 epochs
without a better validation LL) when patience stopped it. A run cut off by ``--max-epochs`` has not converged
and is not comparable with the published numbers; :func:`convergence_note` is the table footnote that says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flowbench.results import read_field

__all__ = ["NOT_CONVERGED", "RunStatus", "convergence_note", "evaluates_by_step", "is_capped", "run_status"]

#: Status kinds, in the order a summary lists them. ``budget``: a step budget (``--max-steps``, the NSF
#: protocol's end: Durkan et al. 2019 train a fixed number of steps and keep the best validated state) was spent.
#: ``in progress``: a run with a training checkpoint and no record yet (``flowbench report``'s runs in progress).
KINDS = ("converged", "capped", "budget", "closed-form", "nonfinite", "failed", "in progress", "other")

NOT_CONVERGED = (
    "not converged: stopped by --max-epochs before early stopping, so not comparable with the papers' numbers"
)

_CAP = re.compile(r"reached max_epochs=(\d+)")
_BUDGET = re.compile(r"reached max_steps=(\d+)")
_PATIENCE = re.compile(r"no improvement for (\d+) (epochs|evaluations)")


def _text(rec: Any, key: str) -> str:
    return read_field(rec, key) or ""


def evaluates_by_step(rec: Any) -> bool:
    """Whether the run validated every ``--eval-every`` steps (the NSF protocol) rather than once an epoch: its
    history is then a sequence of steps, with several evaluations in one epoch or none in many."""
    if (read_field(rec, "config") or {}).get("eval_every") is not None:
        return True
    epochs = [int(read_field(row, "epoch")) for row in read_field(rec, "history") or []]
    return bool(epochs) and epochs != list(range(1, len(epochs) + 1))


@dataclass(frozen=True)
class RunStatus:
    """``kind`` is one of :data:`KINDS`; ``text`` is the line a report shows."""

    kind: str
    text: str

    @property
    def comparable(self) -> bool:
        """Whether the test LL may be set beside published numbers (the run followed the protocol to its end)."""
        return self.kind in ("converged", "budget", "closed-form")


def _ended(rec: Any) -> tuple[str, int | None, str]:
    """(kind, its number, unit) of how training ended: the record's ``ended`` field, which the trainer writes
    where training stops, with the number from the run's options (``max_epochs``, ``max_steps``, ``patience``);
    for records written before the field, parsed from ``stop_reason``. The kind ignores ``status`` (see
    :func:`run_status`)."""
    config = read_field(rec, "config") or {}
    unit = "" if config.get("eval_every") is None else " evaluations"
    kind = read_field(rec, "ended")
    if kind in KINDS:
        number = {"capped": "max_epochs", "budget": "max_steps", "converged": "patience"}.get(kind)
        value = config.get(number) if number else None
        return kind, int(value) if value is not None else None, unit
    reason = _text(rec, "stop_reason")
    for kind, pattern in (("capped", _CAP), ("budget", _BUDGET), ("converged", _PATIENCE)):
        if m := pattern.match(reason):
            return kind, int(m.group(1)), "" if kind != "converged" or m.group(2) == "epochs" else " evaluations"
    if reason.startswith("closed-form"):
        return "closed-form", None, ""
    return "other", None, ""


def is_capped(rec: Any) -> bool:
    """Trained without failure but stopped by ``--max-epochs`` rather than by patience."""
    return (read_field(rec, "status") or "ok") == "ok" and _ended(rec)[0] == "capped"


def run_status(rec: Any) -> RunStatus:
    """Classify one record (see the module docstring)."""
    reason, best, n = _text(rec, "stop_reason"), read_field(rec, "best_epoch"), int(read_field(rec, "epochs") or 0)
    status, failure = read_field(rec, "status") or "ok", read_field(rec, "failure")
    where = f"best epoch {best} of {n}" if best is not None else f"{n} epochs, no finite epoch"
    if evaluates_by_step(rec):  # evaluations every --eval-every steps: the best is a step
        step, steps = read_field(rec, "best_step"), read_field(rec, "steps")
        where = f"best at step {step} of {steps}" if step is not None else f"{steps} steps, no finite evaluation"
    if status == "nonfinite":
        return RunStatus("nonfinite", f"non-finite ({where}): {failure or reason}")
    if status != "ok":
        return RunStatus("failed", f"{status}: {failure or reason}")
    kind, number, unit = _ended(rec)
    if kind == "capped":
        return RunStatus("capped", f"capped by --max-epochs {number} ({where}): not converged")
    if kind == "budget":
        return RunStatus("budget", f"step budget spent: --max-steps {number} ({where})")
    if kind == "converged":
        return RunStatus("converged", f"converged: patience {number}{unit} ran out ({where})")
    if kind == "closed-form":
        return RunStatus("closed-form", "closed-form fit (no training)")
    if kind == "in progress":
        return RunStatus("in progress", f"in progress ({where} so far)")
    return RunStatus("other", reason or "unknown")


#: The words a legend or summary uses for each kind (the report's and figures.md's).
KIND_WORDS = {"budget": "step budget spent", "nonfinite": "non-finite"}


def summary(runs: Iterable[Any]) -> str:
    """``"3 converged"``, ``"2 capped, 1 non-finite"``, ``"1 step budget spent"``: the status counts of seeds."""
    counts: dict[str, int] = {}
    for r in runs:
        kind = run_status(r).kind
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{counts[k]} {KIND_WORDS.get(k, k)}" for k in KINDS if k in counts)


def convergence_note(runs: Iterable[Any]) -> str | None:
    """The footnote for one table cell (the runs averaged into it), or None when every run converged.

    ``flowbench.tables`` adds it to the cell's footnotes.
    """
    capped = [r for r in runs if is_capped(r)]
    if not capped:
        return None
    seeds = ", ".join(str(int(read_field(r, "seed"))) for r in capped)
    caps = sorted({c for c in (_ended(r)[1] for r in capped) if c is not None})
    cap = "/".join(str(c) for c in caps)
    return f"{NOT_CONVERGED} (seed{'s' if len(capped) > 1 else ''} {seeds}: --max-epochs {cap})"
