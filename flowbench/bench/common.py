"""What every ``flowbench bench`` benchmark does first: check the output folder, set threads and device,
and describe the machine (the numbers mean nothing without it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from flowbench.results import system_info
from flowbench.utils import output_dir, resolve_device, set_threads


def machine_info() -> dict[str, Any]:
    """Versions, commit, threads, CPU count, load average and GPU name, stored beside every result."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        **system_info(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg": load,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def setup(
    out: str | os.PathLike, device: str = "auto", threads: int | None = None, log: Callable[[str], None] = print
) -> tuple[Path, torch.device, dict[str, Any]]:
    """``(out/bench folder, device, machine info)``; the folder is created now, so that a bad ``--out`` fails
    before any timing."""
    folder = output_dir(Path(output_dir(out)) / "bench")
    if threads is not None:
        set_threads(threads)
    dev = resolve_device(device)
    machine = machine_info()
    log(f"torch {machine['torch']}, {machine['threads']} threads, device {dev}, load average {machine['loadavg']}")
    return folder, dev, machine
