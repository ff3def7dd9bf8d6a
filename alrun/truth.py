"""The hidden ground truth of a simulation, and the audit that measures labels against it.

Detectors, strategies and regimes see images as :class:`~alrun.data.dataset.ImageRef` (id,
file, size, domain) plus the labels the run has bought. The boxes a dataset file holds are the
*hidden truth*: the oracle sells labels made from it, the evaluator scores the test split and the
pool diagnostics (``pool_misses``) against it, and nobody else holds it. Regimes that report how
good their pseudo-boxes are get a :class:`TruthAudit`, which answers with counts only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from alrun.data.dataset import DatasetSplits, ImageRecord
from alrun.errors import AlrunError


class HiddenTruth(Mapping[str, ImageRecord]):
    """image id -> the dataset's record with its ground truth (boxes, labels, ignore regions).

    Held by the oracle (to answer and price label requests) and by the evaluator; a missing id
    is a one-line error naming it.
    """

    def __init__(self, records: Iterable[ImageRecord]):
        self._records = {rec.image_id: rec for rec in records}

    @classmethod
    def of(cls, splits: DatasetSplits) -> HiddenTruth:
        """Every image of the pool and the test split."""
        return cls((*splits.pool.images, *splits.test.images))

    def __getitem__(self, image_id: str) -> ImageRecord:
        try:
            return self._records[image_id]
        except KeyError:
            raise AlrunError(f"hidden truth: no ground truth for image '{image_id}'") from None

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._records

    def get(self, image_id: str, default: ImageRecord | None = None) -> ImageRecord | None:
        return self._records.get(image_id, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


@dataclass(frozen=True)
class Match:
    """How a set of boxes compares with an image's hidden truth."""

    matched: int  # boxes matching a distinct ground-truth object of their class
    iou_sum: float  # summed IoU of those matches (0 when counted by score order)
    objects: int  # ground-truth objects of the image


class TruthAudit:
    """Measures boxes a regime made (pseudo-boxes, recovered boxes) against the hidden truth;
    returns counts, never the truth itself. Diagnostics only: ``supervision.json`` and the
    ``pseudo/*`` training stats."""

    def __init__(self, truth: Mapping[str, ImageRecord]):
        self._truth = truth

    def match(
        self, image_id: str, boxes: np.ndarray, labels: np.ndarray, iou_threshold: float = 0.5
    ) -> Match:
        """Greedy one-to-one by IoU (:func:`match_quality`)."""
        rec = self._truth[image_id]
        matched, iou_sum = match_quality(boxes, labels, rec.boxes, rec.labels, iou_threshold)
        return Match(matched, iou_sum, rec.num_boxes)

    def true_positives(
        self,
        image_id: str,
        boxes: Tensor,
        labels: Tensor,
        scores: Tensor,
        flipped_width: int | None = None,
        iou_threshold: float = 0.5,
    ) -> Match:
        """Hits highest score first (the COCO/VOC rule,
        :func:`true_positives`); ``flipped_width``: the boxes are
        on the horizontally flipped image of that width."""
        rec = self._truth[image_id]
        gt_boxes = rec.boxes if flipped_width is None else flip_boxes(rec.boxes, flipped_width)
        hits = true_positives(
            boxes,
            labels,
            scores,
            torch.as_tensor(np.asarray(gt_boxes, np.float32)).reshape(-1, 4),
            torch.as_tensor(np.asarray(rec.labels, np.int64)),
            iou_threshold,
        )
        return Match(hits, 0.0, rec.num_boxes)


# -- measures of boxes against ground truth (the oracle's verification uses pairwise_iou) ----


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_quality(
    boxes: np.ndarray,
    labels: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    iou_threshold: float = 0.5,
) -> tuple[int, float]:
    """(number of ``boxes`` matching a distinct ground-truth box of their class at IoU >=
    ``iou_threshold``, summed IoU of those matches); greedy by IoU, one-to-one."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return 0, 0.0
    iou = pairwise_iou(boxes, gt_boxes)
    iou = np.where(np.asarray(labels)[:, None] == np.asarray(gt_labels)[None, :], iou, 0.0)
    matched, iou_sum = 0, 0.0
    while True:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        if iou[i, j] < iou_threshold or iou[i, j] <= 0:
            return matched, iou_sum
        matched, iou_sum = matched + 1, iou_sum + float(iou[i, j])
        iou[i, :], iou[:, j] = -1.0, -1.0


def true_positives(
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    iou_threshold: float = 0.5,
) -> int:
    """How many pseudo-boxes hit a ground-truth object of their class at IoU >= ``iou_threshold``,
    each object claimed at most once, highest score first (the COCO/VOC matching rule)."""
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return 0
    iou = box_iou(boxes.float(), gt_boxes.float())
    iou[labels[:, None] != gt_labels[None, :]] = -1.0
    claimed = torch.zeros(len(gt_boxes), dtype=torch.bool)
    hits = 0
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        row = iou[i].masked_fill(claimed, -1.0)
        best = int(row.argmax())
        if row[best] >= iou_threshold:
            claimed[best] = True
            hits += 1
    return hits


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Boxes of a horizontally flipped image of ``width`` pixels."""
    out = boxes.copy()
    out[:, [0, 2]] = width - boxes[:, [2, 0]]
    return out
