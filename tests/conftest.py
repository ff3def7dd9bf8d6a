"""Shared fixtures: a per-session synthetic-data cache, config composition, shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One torch thread per test process (and its alrun subprocesses): tests run tiny models, where
# a second thread buys little and oversubscribed cores cost a lot (a smoke run took ~2 min with
# 2 threads on a loaded 2-core machine, 11 s with 1). Results are deterministic per thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts with one torch thread and leaves it so, even one that changes it
    (``test_resume_with_another_thread_count_is_refused``) and fails before putting it back."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory) -> Path:
    """Synthetic images are materialised once per test session, never under the repo."""
    cache = tmp_path_factory.mktemp("alrun-cache")
    os.environ["ALRUN_CACHE"] = str(cache)
    os.environ.setdefault("WANDB_MODE", "disabled")
    return cache
