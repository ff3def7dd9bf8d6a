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

from typing import Annotated, Any, Literal

import torch

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.strategies import unique_sources
from alrun.errors import AlrunError
from alrun.params import OpenFraction, Range, ScoreThreshold
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


#: ``strategy.scorer.pairs``: BiB's code keeps, per small box, the pair with the first
#: qualifying large box (``first``); ``all`` counts every qualifying large box
PAIR_RULES = ("first", "all")


def bib_pairs(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    containment: float = 0.8,
    min_area_ratio: float = 3.0,
    pairs: str = "first",
) -> list[tuple[int, int]]:
    """Same-class (small, large) row pairs as BiB's ``BoxInBoxSampler.box_in_box_same_class``:
    at least ``containment`` of the small box lies in the large one (intersection over the
    small box's area, both with wetectron's +1-pixel convention) and the large box's area is at
    least ``min_area_ratio`` times the small one's (plain areas). ``pairs="first"``: the first
    such large box in row order only (what the reference's ``ids[0]`` keeps)."""
    n = len(boxes)
    if n < 2:
        return []
    b = boxes.double()
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt + 1.0).clamp_min(0).prod(dim=2)
    area1 = ((b[:, 2] - b[:, 0] + 1.0) * (b[:, 3] - b[:, 1] + 1.0)).clamp_min(1e-12)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    ok = (inter / area1[:, None] >= containment) & (area[None, :] >= min_area_ratio * area[:, None])
    ok &= labels[:, None] == labels[None, :]
    ok.fill_diagonal_(False)
    out: list[tuple[int, int]] = []
    for i in range(n):
        js = torch.nonzero(ok[i]).flatten().tolist()
        out.extend((i, j) for j in (js[:1] if pairs == "first" else js))
    return out


def box_in_box_pairs(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    containment: float = 0.8,
    min_area_ratio: float = 3.0,
    pairs: str = "first",
) -> int:
    """The number of :func:`bib_pairs`."""
    return len(bib_pairs(boxes, labels, containment, min_area_ratio, pairs))


class BoxInBox:
    """Vo et al. 2022 (BiB): the number of same-class box-in-box pairs (:func:`bib_pairs`)
    among detections with score > ``threshold`` (strict, as BiB's
    ``find_confident_predictions``). Defaults from huyvvo/BiB: ``score_thresh`` 0.5,
    ``min_cover`` 0.8, ``bib_min_area_ratio`` 3. BiB also keeps only classes the image-level
    labels name (weakly supervised); alrun's pool has no image labels, so every class counts."""

    needs = Needs()

    def __init__(
        self,
        threshold: ScoreThreshold = 0.5,
        containment: OpenFraction = 0.8,
        min_area_ratio: Annotated[float, Range(1)] = 3.0,
        pairs: Literal[PAIR_RULES] = "first",
    ):
        self.threshold = _check_threshold(threshold, "threshold")
        if not 0.0 < containment <= 1.0:
            raise AlrunError(
                f"strategy.scorer.containment: expected a number in (0, 1], got {containment}"
            )
        if not min_area_ratio >= 1.0:
            raise AlrunError(
                f"strategy.scorer.min_area_ratio: expected a number >= 1, got {min_area_ratio}"
            )
        if pairs not in PAIR_RULES:
            raise AlrunError(
                f"strategy.scorer.pairs: expected one of {'|'.join(PAIR_RULES)}, got '{pairs}'"
            )
        self.containment = float(containment)
        self.min_area_ratio = float(min_area_ratio)
        self.pairs = pairs

    def image_pairs(self, batch: PredictionBatch) -> list[list[tuple[int, int]]]:
        """Per image of ``batch``, its pairs as batch rows (small, large)."""
        keep = unique_sources(batch, batch.scores > self.threshold)
        out = []
        for n in range(len(batch)):
            lo, hi = int(batch.offsets[n]), int(batch.offsets[n + 1])
            rows = torch.nonzero(keep[lo:hi]).flatten() + lo
            found = bib_pairs(
                batch.boxes[rows].float(),
                batch.labels[rows],
                self.containment,
                self.min_area_ratio,
                self.pairs,
            )
            out.append([(int(rows[i]), int(rows[j])) for i, j in found])
        return out

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        batch = _preds(context)
        pairs = self.image_pairs(batch)
        return {i: float(len(p)) for i, p in zip(batch.image_ids, pairs)}

    def describe(self) -> dict[str, Any]:
        return {
            "scorer": "box_in_box",
            "threshold": self.threshold,
            "containment": self.containment,
            "min_area_ratio": self.min_area_ratio,
            "pairs": self.pairs,
        }
