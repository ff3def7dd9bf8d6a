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

from alrun.data.dataset import DatasetSplits, ImageRecord
from alrun.errors import AlrunError
from alrun.supervision.pseudo_boxes import match_quality
from alrun.supervision.pseudo_label import flip_boxes, true_positives


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
        """Greedy one-to-one by IoU (:func:`~alrun.supervision.pseudo_boxes.match_quality`)."""
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
        :func:`~alrun.supervision.pseudo_label.true_positives`); ``flipped_width``: the boxes are
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
