"""Pseudo-boxes from predictions: the nearest-center rule, priors, present classes, precision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alrun.data.dataset import DetectionDataset, ImageRecord
from alrun.errors import AlrunError
from alrun.oracle import CostModel, SimulatedOracle
from alrun.pool import LabelPool
from alrun.supervision.pseudo_boxes import (
    PseudoBoxTally,
    RoundLog,
    check_fraction,
    class_prior_sizes,
    nearest_center,
    present_class_boxes,
    prior_boxes,
)
from alrun.truth import HiddenTruth, TruthAudit, match_quality

# predictions: two class-0 boxes, one class-1 box whose center is nearest the first click
BOXES = np.array(
    [
        [0, 0, 40, 40],  # class 0, center (20, 20)
        [30, 30, 50, 50],  # class 0, center (40, 40)
        [10, 10, 30, 30],  # class 1, center (20, 20)
    ],
    np.float32,
)
LABELS = np.array([0, 0, 1])
SCORES = np.array([0.9, 0.8, 0.95], np.float32)


def test_nearest_center_picks_the_same_class_box_whose_center_is_nearest():
    clicks = np.array([[21, 21], [38, 39], [20, 20]], np.float32)
    chosen = nearest_center(clicks, np.array([0, 0, 1]), BOXES, LABELS, SCORES)
    # click 1 (class 0) at (21, 21): box 0's center is nearest (box 2 is nearer but class 1)
    # click 2 (class 0) at (38, 39): box 1; click 3 (class 1): box 2
    assert chosen.tolist() == [0, 1, 2]


def test_nearest_center_ignores_low_scores_and_boxes_not_containing_the_click():
    clicks = np.array([[38, 39]], np.float32)
    # box 1 is below min_score: the nearest usable one is box 0 (which contains the click)
    assert nearest_center(clicks, np.array([0]), BOXES, LABELS, SCORES, 0.85).tolist() == [0]
    # a click outside every class-0 box: no usable prediction unless containment is waived
    far = np.array([[5, 45]], np.float32)
    assert nearest_center(far, np.array([0]), BOXES, LABELS, SCORES).tolist() == [-1]
    waived = nearest_center(far, np.array([0]), BOXES, LABELS, SCORES, require_inside=False)
    assert waived.tolist() == [0]  # center (20, 20) is nearer (5, 45) than (40, 40)
    # a class nobody predicted, no predictions at all, no clicks
    assert nearest_center(clicks, np.array([3]), BOXES, LABELS, SCORES).tolist() == [-1]
    empty = np.zeros((0, 4), np.float32)
    assert nearest_center(clicks, np.array([0]), empty, [], []).tolist() == [-1]
    assert nearest_center(np.zeros((0, 2)), [], BOXES, LABELS, SCORES).shape == (0,)


def pool_with_boxes() -> LabelPool:
    recs = tuple(
        ImageRecord(
            f"im{i}",
            Path("x.jpg"),
            100,
            80,
            np.array([[0, 0, 10 + i, 20], [0, 0, 30, 30]], np.float32),
            np.array([0, 2]),
        )
        for i in range(3)
    )
    pool = LabelPool(DetectionDataset("toy", ("a", "b", "c"), recs))
    oracle = SimulatedOracle(CostModel())
    pool.add(oracle.annotate(recs[:2], "box"), 0)
    pool.add(oracle.annotate(recs[2:], "center_click"), 1)  # clicks give no size
    return pool


def test_priors_are_median_sizes_of_bought_boxes_and_default_elsewhere():
    prior = class_prior_sizes(pool_with_boxes(), 3, default_px=24.0)
    # class 0: widths 10, 11 -> median 10.5, heights 20; class 1 unseen; class 2: 30 x 30
    np.testing.assert_allclose(prior, [[10.5, 20], [24, 24], [30, 30]])
    boxes = prior_boxes(np.array([[50, 40], [2, 79]]), np.array([1, 2]), prior, 100, 80)
    np.testing.assert_allclose(boxes, [[38, 28, 62, 52], [0, 64, 17, 80]])  # clipped


def test_present_class_boxes_keep_present_classes_and_a_best_box_for_each():
    boxes = np.arange(20, dtype=np.float32).reshape(5, 4)
    labels = np.array([0, 0, 1, 2, 2])
    scores = np.array([0.9, 0.2, 0.7, 0.3, 0.4], np.float32)
    kept, kept_labels, missing = present_class_boxes(
        np.array([0, 2, 3]), boxes, labels, scores, 0.5
    )
    # class 0: the confident box only; class 1 absent: dropped; class 2: none >= 0.5 -> its best
    # (score 0.4); class 3: never predicted -> reported missing
    np.testing.assert_array_equal(kept, boxes[[0, 4]])
    assert kept_labels.tolist() == [0, 2] and missing == [3]


def test_match_quality_is_one_to_one_per_class():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30]], np.float32)
    # the duplicate of object 1 does not count; object 2's box has the wrong class
    count, iou_sum = match_quality(pred, np.array([0, 0, 1]), gt, np.array([0, 0]))
    assert count == 1 and iou_sum == pytest.approx(1.0)
    rec = ImageRecord("a", Path("x"), 40, 40, gt, np.array([0, 1]))
    tally = PseudoBoxTally(TruthAudit(HiddenTruth([rec])))
    tally.add(pred, np.array([0, 0, 1]), "a")
    summary = tally.summary()
    assert summary["pseudo_precision"] == pytest.approx(2 / 3)
    assert summary["pseudo_recall"] == pytest.approx(1.0)
    assert np.isnan(PseudoBoxTally().summary()["pseudo_precision"])


def test_round_log_is_strict_json_and_resets():
    class Logged(RoundLog):
        pass

    log = Logged()
    log._log("labels", {"precision": float("nan"), "nested": [float("inf"), 1.0]})
    record = log.round_record(3)
    assert json.loads(json.dumps(record, allow_nan=False)) == {
        "round": 3,
        "labels": [{"precision": None, "nested": [None, 1.0]}],
    }
    assert log.round_record(4) == {"round": 4}


@pytest.mark.parametrize("value", [-0.1, 1.5, "high", None])
def test_fractions_out_of_range_are_one_line_errors(value):
    with pytest.raises(AlrunError, match=r"^supervision\.x: expected a number in \[0, 1\]"):
        check_fraction("supervision.x", value)
