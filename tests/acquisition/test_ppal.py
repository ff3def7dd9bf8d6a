import math

import pytest
import torch

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.ppal import DifficultyCalibratedUncertainty, class_quality, class_weights
from alrun.errors import AlrunError
from alrun.types import Detections


def dets(image_id, boxes, labels, class_probs):
    class_probs = torch.as_tensor(class_probs, dtype=torch.float32)
    class_probs = class_probs.reshape(len(labels), class_probs.shape[-1])
    labels = torch.as_tensor(labels, dtype=torch.int64)
    scores = class_probs.gather(1, labels[:, None])[:, 0] if len(labels) else torch.zeros(0)
    bg = 1.0 - class_probs.sum(dim=1, keepdim=True).clamp(max=1.0)
    return Detections(
        image_id=image_id,
        boxes=torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        scores=scores,
        labels=labels,
        probs=torch.cat([class_probs, bg], dim=1),
        class_probs=class_probs,
        head="sigmoid",
    )


def test_class_weights_follow_ppal_formula():
    w = class_weights([1.0, 0.0, 0.5], upper_bound=0.2, alpha=0.3)
    assert w[0] == pytest.approx(1.0)
    assert w[1] == pytest.approx(1.2)
    b = math.exp(1 / 0.3) - 1
    assert w[2] == pytest.approx(1 + 0.3 * math.log(b * 0.5 + 1) * 0.2)


def test_class_quality_from_labelled_boxes():
    # class 0: detected on the exact box with p = 0.81 -> q = 0.81^0.5 * 1^0.5 = 0.9
    # class 1: its box is missed (the only detection is class 0, elsewhere) -> 0
    # class 2: no labelled box -> 0, count 0
    labelled = dets("L", [[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0], [[0.81, 0, 0], [0.7, 0, 0]])
    targets = {
        "L": (torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([0, 1])),
    }
    batch = PredictionBatch.from_detections([labelled])
    quality, count = class_quality(batch, targets, 3, xi=0.5)
    assert quality == pytest.approx([0.9, 0.0, 0.0])
    assert count == [1, 1, 0]
    # a detection twice as tall: IoU 100 / 200 -> q = sqrt(0.81) * sqrt(0.5)
    half = dets("L", [[0, 0, 10, 20]], [0], [[0.81, 0, 0]])
    quality, _ = class_quality(PredictionBatch.from_detections([half]), targets, 3, xi=0.5)
    assert quality[0] == pytest.approx(0.9 * math.sqrt(0.5))


def test_hard_classes_weigh_more_in_the_image_score():
    labelled = dets("L", [[0, 0, 10, 10]], [0], [[1.0, 0.0]])
    targets = {"L": (torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([0, 1]))}
    pool = [
        dets("x", [[0, 0, 30, 30]], [0], [[0.5, 0.1]]),  # easy class, p = 0.5
        dets("y", [[0, 0, 30, 30]], [1], [[0.1, 0.5]]),  # hard class, p = 0.5
        dets("z", [], [], torch.zeros((0, 2))),
    ]
    ctx = AcquisitionContext(
        ("x", "y", "z"),
        0,
        1,
        preds=PredictionBatch.from_detections(pool),
        labelled_preds=PredictionBatch.from_detections([labelled]),
        labelled_targets=targets,
    )
    scorer = DifficultyCalibratedUncertainty(xi=0.5, quality="post_nms")
    scores = scorer(ctx)
    assert scores["x"] == pytest.approx(math.log(2))
    assert scores["y"] == pytest.approx(1.2 * math.log(2))
    assert scores["z"] == 0.0
    described = scorer.describe()
    assert described["class_quality"] == pytest.approx([1.0, 0.0])
    assert described["class_weights"] == pytest.approx([1.0, 1.2])


def test_ppal_bad_parameters():
    with pytest.raises(AlrunError, match="score_threshold"):
        DifficultyCalibratedUncertainty(score_threshold=1.5)
    with pytest.raises(AlrunError, match="alpha"):
        DifficultyCalibratedUncertainty(class_weight_alpha=0)
