"""Shared fixtures: a per-session synthetic-data cache, config composition, shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory) -> Path:
    """Synthetic images are materialised once per test session, never under the repo."""
    cache = tmp_path_factory.mktemp("alrun-cache")
    os.environ["ALRUN_CACHE"] = str(cache)
    os.environ.setdefault("WANDB_MODE", "disabled")
    return cache
