"""Shared test set-up: deterministic seeds, and the repository root for CLI tests."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from flowbench.training.trainer import has_fused_adam

REPO_ROOT = Path(__file__).resolve().parents[1]


#: Whether this torch has a fused Adam kernel for the CPU (torch 2.4 and later; the trainer falls back without it).
FUSED_CPU_ADAM = has_fused_adam(torch.device("cpu"))
needs_fused_cpu_adam = pytest.mark.skipif(not FUSED_CPU_ADAM, reason="this torch has no fused Adam on the CPU")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _forget_plugged_in():
    """Each test resolves its own references and plugins: a spec resolved by one test (whose file's name another
    test may reuse) must not leak into the next."""
    yield
    from flowbench.data import DATASETS
    from flowbench.models import MODELS

    for registry in (MODELS, DATASETS):
        if registry.referenced or any(o.kind != "built-in" for o in registry.origins.values()) or registry.broken:
            registry.reset()


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
