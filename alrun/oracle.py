"""The simulated oracle: labels from ground truth, cost in annotation seconds.

Default times (overridable in configs/oracle/*.yaml, which cite the sources):
box drawing 25.5 s median per box (Su et al. 2012); click-anywhere 2.4 s for the first class +
0.9 s per additional class (Bearman et al. 2016); center click 1.87 s per object (Papadopoulos et
al. 2017, "Training object class detectors with click supervision"); extreme clicking 7.0 s per
box (Papadopoulos et al. 2017); box verification 1.6 s per box (Papadopoulos et al. 2016);
image-level label 1.0 s per class (Papadopoulos et al. 2016).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alrun.data.dataset import ImageRecord
from alrun.errors import AlrunError

LABEL_KINDS = ("box", "extreme", "click", "center_click", "verify", "image_label")


@dataclass(frozen=True)
class CostModel:
    """Seconds an annotator spends per image for each label kind."""

    box_s: float = 25.5
    extreme_s: float = 7.0
    click_first_class_s: float = 2.4
    click_extra_class_s: float = 0.9
    center_click_s: float = 1.87
    verify_s: float = 1.6
    image_label_per_class_s: float = 1.0
    empty_image_s: float = 1.0  # looking at an image and finding nothing to draw

    def cost(self, record: ImageRecord, kind: str) -> float:
        n = record.num_boxes
        n_classes = len(set(record.labels.tolist()))
        if kind == "box":
            return n * self.box_s if n else self.empty_image_s
        if kind == "extreme":
            return n * self.extreme_s if n else self.empty_image_s
        if kind == "center_click":
            return n * self.center_click_s if n else self.empty_image_s
        if kind == "click":
            if not n_classes:
                return self.empty_image_s
            return self.click_first_class_s + (n_classes - 1) * self.click_extra_class_s
        if kind == "verify":
            return n * self.verify_s if n else self.empty_image_s
        if kind == "image_label":
            return max(n_classes, 1) * self.image_label_per_class_s
        raise AlrunError(f"oracle.kind: expected one of {LABEL_KINDS}, got '{kind}'")


@dataclass(frozen=True, eq=False)
class ImageLabels:
    """What the oracle returned for one image."""

    image_id: str
    kind: str
    boxes: np.ndarray  # (N, 4)
    labels: np.ndarray  # (N,)
    cost_s: float


class SimulatedOracle:
    """Answers label requests from ground truth and charges the cost model's seconds."""

    def __init__(self, cost_model: CostModel, kind: str = "box"):
        if kind not in LABEL_KINDS:
            raise AlrunError(f"oracle.kind: expected one of {LABEL_KINDS}, got '{kind}'")
        self.cost_model = cost_model
        self.kind = kind

    def cost(self, record: ImageRecord) -> float:
        return self.cost_model.cost(record, self.kind)

    def annotate(self, records: Sequence[ImageRecord]) -> list[ImageLabels]:
        return [
            ImageLabels(r.image_id, self.kind, r.boxes.copy(), r.labels.copy(), self.cost(r))
            for r in records
        ]
