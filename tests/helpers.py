"""Test helpers: config composition, locating the shared datasets, ground-truth targets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from alrun.config import compose_config  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("ALRUN_SHARED", REPO.parent / "shared")) / "datasets"


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"shared dataset {path} not available")
    return path


def box_target(record) -> dict:
    """A record's ground truth as the detectors' ``losses`` take it (boxes xyxy, labels)."""
    return {
        "boxes": torch.as_tensor(record.boxes, dtype=torch.float32),
        "labels": torch.as_tensor(record.labels, dtype=torch.int64),
    }
