"""What every sanity task shares: quick-mode defaults, seed checks and the progress display.

The progress display is the trainer's (:mod:`flowbench.training.trainer`): a tqdm bar on stderr for the
part that is running (only when stderr is a terminal) and one line on stderr when a part ends; ``--quiet``
turns both off. Results go to stdout, so ``flowbench sanity ... > results.txt`` stays clean.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm.auto import tqdm

from flowbench.errors import ConfigError


def pick(value: int | None, full: int, quick_value: int, quick: bool) -> int:
    """An explicit count wins; otherwise the task's full default, or its ``--quick`` one."""
    return value if value is not None else (quick_value if quick else full)


def check_seed(seed: int | None) -> None:
    """numpy's generators take seeds in [0, 2³²); refuse others up front rather than mid-task."""
    if seed is not None and not 0 <= seed < 2**32:
        raise ConfigError(f"--seed must be an integer in [0, 2**32); got {seed}")


class Progress:
    """A tqdm bar per part of a task and a line when each part ends, both on ``file`` (default: stderr at
    the time of the call); ``enabled=False`` (``--quiet``) silences both. The bar redraws at most every
    ``mininterval`` seconds, as the trainer's."""

    def __init__(self, enabled: bool = True, file: IO[str] | None = None, mininterval: float = 0.5):
        self.enabled = enabled
        self.mininterval = mininterval
        self._file = file

    @property
    def file(self) -> IO[str]:
        return self._file if self._file is not None else sys.stderr

    def range(self, n: int, desc: str) -> Any:
        """``range(n)`` under a bar; the bar is a no-op object when disabled or stderr is not a terminal."""
        return tqdm(
            range(n),
            desc=desc,
            leave=False,
            file=self.file,
            mininterval=self.mininterval,
            disable=None if self.enabled else True,
        )  # None: no bar when not a terminal (logs)

    def log(self, line: str) -> None:
        """A line that survives the bar (tqdm.write keeps it above a running bar)."""
        if self.enabled:
            tqdm.write(line, file=self.file)


#: For library callers that want no output at all.
QUIET = Progress(False)
