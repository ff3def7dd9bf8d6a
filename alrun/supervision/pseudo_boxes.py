"""Pseudo-boxes from a detector's predictions, shared by the weak-label regimes.

* :func:`nearest_center` - Desai et al. 2019 ("An adaptive supervision framework for active
  learning in object detection", BMVC): a click becomes the predicted box of the same class whose
  center is nearest the click.
* :func:`prior_boxes` - the documented fallback for a click without a usable prediction: a box of
  the class's prior size (median size of the box labels bought so far, else a fixed size)
  centered on the click.
* :func:`present_class_boxes` - image-level labels: predictions restricted to the classes
  the annotator said are present.
* :func:`match_quality` - precision / recall of pseudo-boxes against the hidden ground truth (a
  simulation-only diagnostic: never used for training).
* :class:`RoundLog` - what a regime did in a round, written by the loop to
  ``round_XX/supervision.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from alrun.data.dataset import DetectionDataset, ImageRecord, ImageRef
from alrun.detectors.base import Detector
from alrun.errors import AlrunError
from alrun.pool import LabelPool
from alrun.truth import TruthAudit
from alrun.types import NOTHING, Detections, Needs

CLICK_KINDS = ("click", "center_click")


def as_numpy(det: Detections) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (N, 4) float32, labels (N,) int64, scores (N,) float32) of one image's predictions."""
    return (
        det.boxes.detach().cpu().numpy().astype(np.float32).reshape(-1, 4),
        det.labels.detach().cpu().numpy().astype(np.int64).reshape(-1),
        det.scores.detach().cpu().numpy().astype(np.float32).reshape(-1),
    )


def predict(
    detector: Detector, records: Sequence[ImageRef], needs: Needs = NOTHING
) -> dict[str, Detections]:
    """The detector's predictions for ``records`` by image id (empty when there are none)."""
    if not records:
        return {}
    return {d.image_id: d for d in detector.predict(list(records), needs)}


def nearest_center(
    points: np.ndarray,
    point_labels: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    min_score: float = 0.0,
    require_inside: bool = True,
) -> np.ndarray:
    """For each click, the index of the predicted box of its class whose center is nearest it,
    or -1 when no prediction is usable.

    Usable: same class, ``score >= min_score`` and, with ``require_inside``, the click lies inside
    the box. Two clicks may pick the same prediction (as in Desai et al.); on equal distances the
    earlier prediction (the higher-scored one, as detectors return them) wins.
    """
    points = np.asarray(points, np.float32).reshape(-1, 2)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(points) == 0:
        return np.zeros(0, np.int64)
    if len(boxes) == 0:
        return np.full(len(points), -1, np.int64)
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    dist = ((points[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
    usable = (np.asarray(point_labels)[:, None] == np.asarray(labels)[None, :]) & (
        np.asarray(scores)[None, :] >= min_score
    )
    if require_inside:
        px, py = points[:, 0:1], points[:, 1:2]
        usable &= (px >= boxes[None, :, 0]) & (px <= boxes[None, :, 2])
        usable &= (py >= boxes[None, :, 1]) & (py <= boxes[None, :, 3])
    dist = np.where(usable, dist, np.inf)
    chosen = dist.argmin(axis=1).astype(np.int64)
    chosen[~usable.any(axis=1)] = -1
    return chosen


def class_prior_sizes(pool: LabelPool, num_classes: int, default_px: float) -> np.ndarray:
    """(C, 2) prior (width, height) per class: the median size of that class's box labels bought
    so far (drawn, from extreme points, or accepted verifications), else ``default_px``."""
    sizes: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for lab in pool.labels.values():
        targets = lab.box_targets()
        if targets is None:
            continue
        boxes, labels = targets
        for box, label in zip(boxes, labels):
            sizes[int(label)].append(box[2:] - box[:2])
    prior = np.full((num_classes, 2), float(default_px), np.float32)
    for c, found in enumerate(sizes):
        if found:
            prior[c] = np.median(np.stack(found), axis=0)
    return prior


def prior_boxes(
    points: np.ndarray, point_labels: np.ndarray, prior: np.ndarray, width: int, height: int
) -> np.ndarray:
    """(N, 4) boxes of each click's class prior size centered on the click, clipped to the image."""
    half = prior[np.asarray(point_labels, np.int64)] / 2
    points = np.asarray(points, np.float32).reshape(-1, 2)
    boxes = np.concatenate([points - half, points + half], axis=1)
    return boxes.clip(0, [width, height, width, height]).astype(np.float32).reshape(-1, 4)


def present_class_boxes(
    classes: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    min_score: float,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Pseudo-boxes for an image known to contain exactly ``classes``.

    Predictions of other classes are dropped; of a present class, those with
    ``score >= min_score`` are kept, and when none reaches it, its single best prediction (the
    class is known to be there). Returns (boxes, labels, classes with no prediction at all).
    """
    keep = np.zeros(len(labels), bool)
    missing = []
    for c in np.asarray(classes, np.int64).tolist():
        of_class = labels == c
        if not of_class.any():
            missing.append(int(c))
            continue
        confident = of_class & (scores >= min_score)
        if confident.any():
            keep |= confident
        else:
            keep[np.flatnonzero(of_class)[np.argmax(scores[of_class])]] = True
    return boxes[keep].reshape(-1, 4), labels[keep], missing


class PseudoBoxTally:
    """Counts pseudo-boxes and how many of them match the hidden ground truth (IoU >= 0.5).

    The truth stays with ``audit`` (the evaluator's, :class:`alrun.truth.TruthAudit`), which
    answers with counts; without one only the boxes are counted (the rest is NaN)."""

    def __init__(self, audit: TruthAudit | None = None) -> None:
        self.audit = audit
        self.boxes = self.correct = self.gt = 0
        self.iou_sum = 0.0

    def add(self, boxes: np.ndarray, labels: np.ndarray, image_id: str) -> None:
        self.boxes += len(labels)
        if self.audit is None:
            return
        found = self.audit.match(image_id, boxes, labels)
        self.correct += found.matched
        self.gt += found.objects
        self.iou_sum += found.iou_sum

    def summary(self) -> dict[str, float]:
        """``precision``: share of pseudo-boxes matching a ground-truth box of their class;
        ``recall``: share of the ground-truth objects of those images so matched;
        ``mean_iou``: mean IoU of the matched ones (NaN when there is nothing to measure)."""
        return {
            "pseudo_boxes": float(self.boxes),
            "pseudo_correct": float(self.correct),
            "pseudo_precision": self.correct / self.boxes
            if self.boxes and self.audit is not None
            else float("nan"),
            "pseudo_recall": self.correct / self.gt if self.gt else float("nan"),
            "pseudo_mean_iou": self.iou_sum / self.correct if self.correct else float("nan"),
        }


def with_boxes(image: ImageRef, boxes: np.ndarray, labels: np.ndarray) -> ImageRecord:
    """A training record of ``image`` with the boxes a regime made for it."""
    return ImageRecord(
        image.image_id,
        image.file,
        image.width,
        image.height,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(labels, np.int64).reshape(-1),
        image.domain,
    )


def merged(pool: LabelPool, extra: Sequence[ImageRecord], name: str) -> DetectionDataset:
    """The pool's box-labelled training set plus ``extra`` pseudo-boxed images."""
    base = pool.training_set()
    return DetectionDataset(f"{base.name}+{name}", base.classes, (*base.images, *extra))


def check_fraction(key: str, value: Any, low_open: bool = False) -> float:
    """``value`` as a float in [0, 1] (``(0, 1]`` with ``low_open``), else a one-line error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AlrunError(f"{key}: expected a number in [0, 1], got {value!r}") from None
    low_ok = number > 0 if low_open else number >= 0
    if not (low_ok and number <= 1):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise AlrunError(f"{key}: expected a number in {interval}, got {value!r}")
    return number


def check_choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise AlrunError(f"{key}: expected one of {'|'.join(choices)}, got {value!r}")
    return str(value)


class RoundLog:
    """Per-round record of what a regime did (kinds requested / received, pseudo-boxes, switch
    decisions). The loop writes :meth:`round_record` to ``round_XX/supervision.json``; it holds
    what happened since the previous record: round r's training and the labels bought after it.
    """

    def _log(self, section: str, entry: Mapping[str, Any]) -> None:
        if not hasattr(self, "_round_log"):
            self._round_log: dict[str, Any] = {}
        self._round_log.setdefault(section, []).append(_json_safe(dict(entry)))

    def round_record(self, round_index: int) -> dict[str, Any]:
        record = {"round": round_index, **getattr(self, "_round_log", {})}
        self._round_log = {}
        return record


def _json_safe(value: Any) -> Any:
    """NaN / infinities as null (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def kinds_received(labels: Sequence[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab.kind] = counts.get(lab.kind, 0) + 1
    return counts
