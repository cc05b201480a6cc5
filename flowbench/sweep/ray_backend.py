"""The Ray executor: one Ray task per run, with CPU/GPU resource requests.

Results strategy: **records are returned to the driver and written there** (see
:func:`flowbench.sweep.worker.ray_execute`). The cluster's nodes therefore need no shared filesystem; each
needs flowbench installed and the prepared datasets at the run's ``data-root`` (or ``$FLOWBENCH_DATA``).
Ray is an optional dependency (``pip install -e ".[ray]"``); this module is imported only when asked for.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable

from flowbench.config import RunOptions
from flowbench.errors import ConfigError
from flowbench.sweep.artifacts import ARTIFACTS, land_run, replaced_record
from flowbench.sweep.spec import SweepRun
from flowbench.sweep.worker import ray_execute, ray_execute_stack
from flowbench.utils import atomic_write

__all__ = ["RayExecutor", "import_ray", "RAY_INSTALL_HINT"]

RAY_INSTALL_HINT = 'Ray is not installed; install the extra with: pip install -e ".[ray]"  (or: pip install "ray>=2.9")'


def import_ray() -> Any:
    """``import ray``, or a FlowbenchError that says how to install it."""
    try:  # lazy: ray is an optional extra
        import ray
    except ImportError as e:
        raise ConfigError(f"--executor ray: {RAY_INSTALL_HINT}") from e
    return ray


class RayExecutor:
    """Submit runs as Ray tasks; connect to ``address`` or start a local instance (shut down at the end)."""

    def __init__(
        self,
        run_fn: str,
        address: str | None = None,
        cpus_per_run: int = 1,
        gpus_per_run: float = 0,
        max_concurrent: int | None = None,
        num_cpus: int | None = None,
        announce: Callable[[str], None] | None = None,
    ):
        ray = self.ray = import_ray()

        self.run_fn, self.cpus, self.gpus = run_fn, cpus_per_run, gpus_per_run
        self._started = False
        self._inflight: set = set()
        self._temp_dir: str | None = None
        if not ray.is_initialized():
            self._init_ray(address, num_cpus)
        resources = ray.cluster_resources()
        self.capacity = self._capacity(resources, cpus_per_run, gpus_per_run, max_concurrent)
        self._task = ray.remote(ray_execute).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
        # A stack is one task with one run's resources: that is the point of stacking.
        self._stack_task = ray.remote(ray_execute_stack).options(
            num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0
        )
        if announce is not None:
            where = address or "a local Ray instance"
            announce(
                f"ray: {where}, {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; "
                f"{self.capacity} runs at a time ({cpus_per_run} CPU, {gpus_per_run:g} GPU each)"
            )

    def _init_ray(self, address: str | None, num_cpus: int | None) -> None:
        """Connect to the cluster at ``address``, or start a private local Ray instance (shut down at the end)."""
        if address:
            kwargs: dict[str, Any] = {"address": address}
            if not address.startswith("ray://"):  # Ray Client takes fewer options
                kwargs["log_to_driver"] = False
        else:
            # A private local instance: no dashboard (fewer ports and processes), no worker output on our
            # terminal (runs capture their own), its files in a fresh short temp dir (socket paths are
            # length-limited).
            self._temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp" if os.path.isdir("/tmp") else None)
            kwargs = {"include_dashboard": False, "log_to_driver": False, "_temp_dir": self._temp_dir}
            if num_cpus is not None:
                kwargs["num_cpus"] = num_cpus
        try:
            self.ray.init(**kwargs)
        except ConnectionError as e:
            raise ConfigError(f"cannot connect to the Ray cluster at {address!r}: {e}; check --address") from e
        self._started = True

    def _capacity(self, resources: dict, cpus_per_run: int, gpus_per_run: float, max_concurrent: int | None) -> int:
        """How many runs to keep in flight; a cluster that cannot hold one run is let go, with a ConfigError."""
        if gpus_per_run and resources.get("GPU", 0) < gpus_per_run:
            self.shutdown()
            raise ConfigError(f"--gpus-per-run {gpus_per_run}: the Ray cluster has {resources.get('GPU', 0):g} GPUs")
        if resources.get("CPU", 0) < cpus_per_run:
            self.shutdown()
            raise ConfigError(f"--cpus-per-run {cpus_per_run}: the Ray cluster has {resources.get('CPU', 0):g} CPUs")
        fits = int(resources.get("CPU", 0) // cpus_per_run)
        if gpus_per_run:
            fits = min(fits, int(resources.get("GPU", 0) // gpus_per_run))
        # Keep no more tasks in flight than fit at once, so "running" in the progress line means running;
        # --workers N overrides this (e.g. for an autoscaling cluster that will grow beyond its current size).
        return max_concurrent or max(1, fits)

    def submit(self, run: SweepRun, options: RunOptions, out: str) -> Any:
        ref = self._task.remote(options, self.run_fn, self.cpus, replaced_record(run, out))
        self._inflight.add(ref)
        return ref

    def submit_stack(self, runs: list[SweepRun], options: list[RunOptions], out: str) -> Any:
        ref = self._stack_task.remote(list(options), self.cpus, [replaced_record(r, out) for r in runs])
        self._inflight.add(ref)
        return ref

    def wait(self, tokens: list, timeout: float) -> list[tuple[Any, dict]]:
        ready, _ = self.ray.wait(tokens, num_returns=1, timeout=timeout)
        results = []
        for ref in ready:
            self._inflight.discard(ref)
            try:
                results.append((ref, self.ray.get(ref)))
            except Exception as e:  # noqa: BLE001 - worker or node died, object lost, ...
                results.append(
                    (ref, {"ok": False, "error": f"Ray task failed: {type(e).__name__}: {e}", "traceback": ""})
                )
        return results

    def finish(self, state: Any, outcome: dict, out: str) -> None:
        """Write the returned run (its files, then its record) and its log under the driver's results folder."""
        self.save_log(state, outcome, out)
        land_run(state.run, outcome["record"], outcome.get(ARTIFACTS), out)

    @staticmethod
    def save_log(state: Any, outcome: dict, out: str) -> None:
        """The task's log after the run's earlier attempts' (as a local worker appends to its run's log)."""
        text = outcome.get("log") or ""
        if outcome.get("traceback"):
            text += "\n" + outcome["traceback"]
        path = state.run.log_path(out)
        earlier = path.read_text(errors="replace") if path.is_file() else ""
        with atomic_write(path, "w") as f:
            f.write(f"{earlier}# ray node: {outcome.get('node', '?')}\n{text}")

    def shutdown(self, cancel: bool = False) -> None:
        if cancel and self.ray.is_initialized():
            for ref in self._inflight:  # on a shared cluster, don't leave our tasks running
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort while stopping
                    pass
        self._inflight.clear()
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False
        if self._temp_dir is not None:  # the private instance's session files and logs
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
