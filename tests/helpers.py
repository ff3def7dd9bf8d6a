"""Test helpers: config composition and locating the shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alrun.config import compose_config  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("ALRUN_SHARED", REPO.parent / "shared")) / "datasets"


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"shared dataset {path} not available")
    return path
