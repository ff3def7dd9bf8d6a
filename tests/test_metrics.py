from pathlib import Path

import numpy as np
import pytest
import torch

from alrun.data.dataset import DetectionDataset, ImageRecord
from alrun.metrics import evaluate, failure_modes
from alrun.types import Detections


def record(image_id, boxes, labels):
    return ImageRecord(
        image_id,
        Path(f"{image_id}.png"),
        640,
        480,
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(labels, np.int64),
    )


def dets(image_id, boxes, labels, scores=None):
    n = len(labels)
    return Detections(
        image_id,
        torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        torch.tensor(scores if scores is not None else [0.9] * n, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.int64),
    )


GT = {
    "a": ([[10, 10, 60, 80], [100, 120, 200, 220]], [0, 1]),
    "b": ([[300, 200, 380, 300]], [1]),
}


@pytest.fixture
def dataset():
    return DetectionDataset(
        "toy", ("cat", "dog"), tuple(record(i, b, lab) for i, (b, lab) in GT.items())
    )


def test_perfect_detections(dataset):
    preds = [dets(i, b, lab) for i, (b, lab) in GT.items()]
    out = evaluate(dataset, preds)
    assert out["mAP50"] == pytest.approx(1.0)
    assert out["mAP"] == pytest.approx(1.0)
    assert out["mAR"] == pytest.approx(1.0)


def test_no_detections(dataset):
    for preds in ([], [Detections.empty("a"), Detections.empty("b")]):
        out = evaluate(dataset, preds)
        assert out["mAP50"] == 0.0
        assert out["mAP"] == 0.0
        assert out["mAR"] == 0.0


def test_failure_modes_perfect(dataset):
    preds = [dets(i, b, lab) for i, (b, lab) in GT.items()]
    assert failure_modes(dataset, preds) == {"fp": 0, "missed": 0, "wrong_class": 0, "poor_loc": 0}


def test_failure_modes_classifies_each_error():
    ds = DetectionDataset(
        "toy",
        ("cat", "dog"),
        (
            record(
                "x",
                [
                    [0, 0, 10, 10],  # found exactly
                    [100, 100, 120, 120],  # found with a shifted box
                    [200, 200, 220, 220],  # found with the wrong class
                    [300, 300, 310, 310],  # nobody finds it
                ],
                [0, 0, 1, 1],
            ),
        ),
    )
    preds = [
        dets(
            "x",
            [
                [0, 0, 10, 10],  # exact match: true positive
                # shifted by half its width: intersection 10*20=200, union 600 -> IoU 1/3
                [110, 100, 130, 120],
                [200, 200, 220, 220],  # exact box, class 0 instead of 1
                [500, 400, 510, 410],  # far from everything
                [0, 0, 10, 10],  # below the score threshold: ignored
            ],
            [0, 0, 0, 1, 1],
            scores=[0.9, 0.8, 0.7, 0.6, 0.3],
        )
    ]
    # As in TIDE, the shifted and the wrongly classified objects are explained by their
    # poor_loc / wrong_class errors; only the object nobody came near is missed.
    assert failure_modes(ds, preds) == {"fp": 1, "missed": 1, "wrong_class": 1, "poor_loc": 1}


def test_failure_modes_missed_only():
    gt = record("x", [[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0])
    ds = DetectionDataset("toy", ("cat",), (gt,))
    preds = [dets("x", [[0, 0, 10, 10]], [0])]
    assert failure_modes(ds, preds) == {"fp": 0, "missed": 1, "wrong_class": 0, "poor_loc": 0}


def test_failure_modes_duplicate_and_background_are_fp():
    ds = DetectionDataset(
        "toy",
        ("cat",),
        (
            record("x", [[0, 0, 10, 10]], [0]),
            record("empty", [], []),
        ),
    )
    preds = [
        dets("x", [[0, 0, 10, 10], [0, 0, 10, 10]], [0, 0], scores=[0.9, 0.8]),  # duplicate
        dets("empty", [[5, 5, 15, 15]], [0]),  # image without ground truth
    ]
    assert failure_modes(ds, preds) == {"fp": 2, "missed": 0, "wrong_class": 0, "poor_loc": 0}


def test_failure_modes_score_threshold():
    ds = DetectionDataset("toy", ("cat",), (record("x", [[0, 0, 10, 10]], [0]),))
    preds = [dets("x", [[0, 0, 10, 10]], [0], scores=[0.3])]
    assert failure_modes(ds, preds)["missed"] == 1
    assert failure_modes(ds, preds, score_threshold=0.2)["missed"] == 0
