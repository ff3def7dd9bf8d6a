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


def small_faster_rcnn(num_classes: int = 3, **options):
    """torchvision's MobileNet-v3 Faster R-CNN at 64 px, random init, on the CPU (``options``:
    its builder's, e.g. ``box_score_thresh``)."""
    from functools import partial

    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    from alrun.detectors.torchvision import TorchvisionDetector

    builder = partial(
        fasterrcnn_mobilenet_v3_large_320_fpn,
        weights=None,
        weights_backbone=None,
        min_size=64,
        max_size=64,
        **options,
    )
    return TorchvisionDetector(builder, num_classes=num_classes, label_offset=1, device="cpu")
