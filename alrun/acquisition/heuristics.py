"""Detection-count heuristics: scorers from what the detector finds, not how unsure it is.

* :class:`HasDetection` (Cordier et al.): 1 for an image with at least one detection at or
  above ``threshold``, else 0 - every such image is selected before any other, ties in the
  seeded order; images without one come only after (or never, ``empty: skip``).
* :class:`DetectionCount` (Cetintas et al.): the number of detections at a deliberately low
  threshold (over-complete counts: crowded or cluttered images first).
* :class:`BoxInBox` (Vo et al. 2022): the number of same-class pairs where a detection lies
  (almost) inside a larger one - parts detected as wholes, duplicates NMS did not merge; a
  localisation inconsistency. Meant with a diversity second phase (``strategy=box_in_box``).
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.ops import box_area

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.strategies import unique_sources
from alrun.errors import AlrunError
from alrun.params import OpenFraction, ScoreThreshold
from alrun.types import Needs


def _check_threshold(value: float, key: str) -> float:
    if not 0.0 <= value < 1.0:
        raise AlrunError(f"strategy.scorer.{key}: expected a number in [0, 1), got {value}")
    return float(value)


def _kept_counts(batch: PredictionBatch, threshold: float) -> torch.Tensor:
    keep = unique_sources(batch, batch.scores >= threshold)
    return torch.bincount(batch.segment[keep], minlength=len(batch))


def _preds(context: AcquisitionContext) -> PredictionBatch:
    if context.preds is None:
        raise AlrunError("strategy.scorer: needs pool predictions, the loop passed none")
    return context.preds


class HasDetection:
    """Cordier et al.: 1.0 for images with >= 1 detection at ``threshold``, else 0.0 (or left
    out with ``skip_empty``)."""

    needs = Needs()

    def __init__(self, threshold: ScoreThreshold = 0.5, skip_empty: bool = False):
        self.threshold = _check_threshold(threshold, "threshold")
        self.skip_empty = bool(skip_empty)

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        batch = _preds(context)
        counts = _kept_counts(batch, self.threshold).tolist()
        return {
            i: float(c > 0) for i, c in zip(batch.image_ids, counts) if c > 0 or not self.skip_empty
        }

    def describe(self) -> dict[str, Any]:
        return {
            "scorer": "has_detection",
            "threshold": self.threshold,
            "skip_empty": self.skip_empty,
        }


class DetectionCount:
    """Cetintas et al.: number of detections at a low ``threshold``."""

    needs = Needs()

    def __init__(self, threshold: ScoreThreshold = 0.05):
        self.threshold = _check_threshold(threshold, "threshold")

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        batch = _preds(context)
        counts = _kept_counts(batch, self.threshold).tolist()
        return {i: float(c) for i, c in zip(batch.image_ids, counts)}

    def describe(self) -> dict[str, Any]:
        return {"scorer": "detection_count", "threshold": self.threshold}


def box_in_box_pairs(boxes: torch.Tensor, labels: torch.Tensor, containment: float) -> int:
    """Same-class ordered pairs (small, large) where ``area(small & large) >= containment *
    area(small)`` and small is strictly smaller than large."""
    if len(boxes) < 2:
        return 0
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=2)
    area = box_area(boxes)
    inside = inter >= containment * area[:, None]
    smaller = area[:, None] < area[None, :]
    same = labels[:, None] == labels[None, :]
    return int((inside & smaller & same).sum())


class BoxInBox:
    """Vo et al. 2022: count of same-class box-in-box pairs among detections >= ``threshold``."""

    needs = Needs()

    def __init__(self, threshold: ScoreThreshold = 0.3, containment: OpenFraction = 0.9):
        self.threshold = _check_threshold(threshold, "threshold")
        if not 0.0 < containment <= 1.0:
            raise AlrunError(
                f"strategy.scorer.containment: expected a number in (0, 1], got {containment}"
            )
        self.containment = float(containment)

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        batch = _preds(context)
        keep = unique_sources(batch, batch.scores >= self.threshold)
        out = {}
        for n, image_id in enumerate(batch.image_ids):
            lo, hi = int(batch.offsets[n]), int(batch.offsets[n + 1])
            rows = torch.nonzero(keep[lo:hi]).flatten() + lo
            out[image_id] = float(
                box_in_box_pairs(batch.boxes[rows].float(), batch.labels[rows], self.containment)
            )
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "scorer": "box_in_box",
            "threshold": self.threshold,
            "containment": self.containment,
        }
