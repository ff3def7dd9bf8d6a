import pytest
import torch

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.heuristics import BoxInBox, DetectionCount, HasDetection, box_in_box_pairs
from alrun.errors import AlrunError
from alrun.types import Detections


def image(image_id, boxes, scores, labels=None):
    n = len(scores)
    return Detections(
        image_id=image_id,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels or [0] * n, dtype=torch.int64),
    )


def context(*images):
    batch = PredictionBatch.from_detections(list(images))
    return AcquisitionContext(batch.image_ids, 0, 1, preds=batch)


BOX = [0, 0, 10, 10]


def test_has_detection_and_counts():
    ctx = context(
        image("a", [BOX, BOX], [0.9, 0.06]),
        image("b", [BOX], [0.2]),
        image("c", [], []),
    )
    assert HasDetection(0.5)(ctx) == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert HasDetection(0.5, skip_empty=True)(ctx) == {"a": 1.0}
    assert DetectionCount(0.05)(ctx) == {"a": 2.0, "b": 1.0, "c": 0.0}
    assert DetectionCount(0.1)(ctx) == {"a": 1.0, "b": 1.0, "c": 0.0}


def test_box_in_box_pairs():
    big, part, outside = [0, 0, 20, 20], [2, 2, 8, 8], [15, 15, 30, 30]
    boxes = torch.tensor([big, part, outside], dtype=torch.float32)
    assert box_in_box_pairs(boxes, torch.tensor([0, 0, 0]), 0.9) == 1
    assert box_in_box_pairs(boxes, torch.tensor([0, 1, 0]), 0.9) == 0  # other class
    # identical boxes are duplicates, not box-in-box (neither is smaller)
    twins = torch.tensor([big, big], dtype=torch.float32)
    assert box_in_box_pairs(twins, torch.tensor([0, 0]), 0.9) == 0
    ctx = context(
        image("a", [big, part, outside], [0.9, 0.8, 0.9]),
        image("b", [big, part], [0.9, 0.1]),  # the part is below the threshold
    )
    assert BoxInBox(0.3)(ctx) == {"a": 1.0, "b": 0.0}


def test_heuristics_reject_bad_thresholds():
    with pytest.raises(AlrunError, match="threshold"):
        DetectionCount(1.0)
    with pytest.raises(AlrunError, match="containment"):
        BoxInBox(0.3, containment=0.0)
