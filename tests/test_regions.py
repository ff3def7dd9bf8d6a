"""Box-level queries (alrun/regions.py) and the oracle's ``partial`` labels: which object a
region is answered with, what each query costs in boxes and seconds, and the label's record."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from alrun.data.dataset import ImageRecord
from alrun.errors import AlrunError
from alrun.oracle import CostModel, SimulatedOracle
from alrun.regions import (
    REASK_IOU,
    answer_regions,
    asked_before,
    asked_regions,
    merge_partial,
    query_charges,
)
from alrun.types import ImageLabels

TRUE_BOXES = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 0, 60, 10]], np.float32)
TRUE_LABELS = np.array([0, 1, 0])
QUERIES = np.array(
    [
        [0, 0, 10, 11],  # object 0, fits (IoU 0.91), right class: confirmed
        [22, 22, 38, 44],  # object 1, IoU 0.62 but wrong class: drawn
        [1, 1, 10, 10],  # object 0 again: nothing new, rejected
        [70, 70, 80, 80],  # nothing there: rejected
        [50, 0, 56, 10],  # object 2, IoU 0.6, right class: confirmed
        [48, 0, 53, 6],  # object 2 at IoU < 0.25 once taken: rejected
    ],
    np.float32,
)
Q_LABELS = np.array([0, 0, 0, 1, 0, 0])


def test_regions_are_answered_in_order_with_the_most_overlapping_new_object():
    found = answer_regions(QUERIES, Q_LABELS, TRUE_BOXES, TRUE_LABELS)
    assert found.answers.tolist() == [0, 1, -1, -1, 2, -1]
    assert found.confirmed.tolist() == [True, False, False, False, True, False]
    assert found.seconds.tolist() == pytest.approx([1.6, 25.5, 1.6, 1.6, 1.6, 1.6])
    low = answer_regions(QUERIES[3:4] * 0 + [0, 0, 4, 4], [0], TRUE_BOXES, TRUE_LABELS)
    assert low.answers.tolist() == [-1]  # IoU 0.16 < match_iou 0.25
    assert answer_regions(QUERIES[:1], [0], TRUE_BOXES, TRUE_LABELS, 0.1).answers.tolist() == [0]


def test_charges_per_unit():
    found = answer_regions(QUERIES, Q_LABELS, TRUE_BOXES, TRUE_LABELS)
    assert query_charges(found, "boxes").tolist() == [1, 1, 0, 0, 1, 0]  # BLAD: objects found
    assert query_charges(found, "boxes", "asked").tolist() == [1] * 6
    assert query_charges(found, "seconds").sum() == pytest.approx(25.5 + 5 * 1.6)
    with pytest.raises(AlrunError, match=r"^budget\.unit: box-level queries are bought by the box"):
        query_charges(found, "images")


def _oracle(**kwargs):
    oracle = SimulatedOracle(CostModel(), **kwargs)
    rec = ImageRecord("im", Path("im.png"), 64, 64, TRUE_BOXES, TRUE_LABELS)
    oracle.hold_truth({"im": rec})
    return oracle, rec.ref


def test_oracle_answers_regions_with_the_true_boxes_and_records_the_queries():
    oracle, ref = _oracle()
    (lab,) = oracle.annotate([ref], "partial", queries={"im": (QUERIES, Q_LABELS)})
    assert lab.kind == "partial" and lab.boxes.tolist() == TRUE_BOXES.tolist()
    assert lab.labels.tolist() == [0, 1, 0]
    assert lab.answers.tolist() == [0, 1, -1, -1, 2, -1] and lab.queries.shape == (6, 4)
    assert lab.cost_s == pytest.approx(25.5 + 5 * 1.6)
    assert lab.box_targets() is None  # partial: not a complete labelling of the image
    back = ImageLabels.from_json(lab.to_json())
    assert back.answers.tolist() == lab.answers.tolist()
    assert back.query_labels.tolist() == Q_LABELS.tolist()
    (two,) = oracle.annotate([ref], "partial", queries={"im": (QUERIES[[3, 1]], Q_LABELS[[3, 1]])})
    assert two.boxes.tolist() == [TRUE_BOXES[1].tolist()] and two.answers.tolist() == [-1, 0]
    charges = oracle.region_charges(ref, QUERIES, Q_LABELS, "boxes")
    assert charges.tolist() == [1, 1, 0, 0, 1, 0]


def test_oracle_refuses_partial_without_queries_and_per_image_prices():
    oracle, ref = _oracle()
    with pytest.raises(AlrunError, match="'partial' labels need queries"):
        oracle.annotate([ref], "partial")
    with pytest.raises(AlrunError, match="no queries for image 'im'"):
        oracle.annotate([ref], "partial", queries={})
    with pytest.raises(AlrunError, match="priced per region asked"):
        oracle.cost(ref, "partial")
    with pytest.raises(AlrunError, match=r"^oracle\.match_iou: expected a value in \(0, 1\]"):
        SimulatedOracle(CostModel(), match_iou=0.0)
    box_only, _ = _oracle(kind="box")
    with pytest.raises(AlrunError, match="asks the oracle for 'partial' labels"):
        box_only.region_charges(ref, QUERIES, Q_LABELS, "boxes")


# -- asking an image again (issue 24) ---------------------------------------------------------


def test_an_object_answered_before_is_not_answered_or_charged_again():
    first = answer_regions(QUERIES[:1], Q_LABELS[:1], TRUE_BOXES, TRUE_LABELS)
    answered = TRUE_BOXES[first.answers[first.answers >= 0]]
    again = answer_regions([[1, 1, 10, 10], [50, 0, 56, 10]], [0, 0], TRUE_BOXES, TRUE_LABELS,
                           answered=answered)  # fmt: skip
    assert again.answers.tolist() == [-1, 2]  # object 0 was answered in the first round
    assert query_charges(again, "boxes").tolist() == [0.0, 1.0]
    assert again.seconds.tolist() == pytest.approx([1.6, 1.6])  # a look, not a drawing


def test_regions_asked_before_are_queries_and_answers_at_blads_iou():
    oracle, ref = _oracle()
    (lab,) = oracle.annotate([ref], "partial", queries={"im": (QUERIES[3:5], Q_LABELS[3:5])})
    asked = asked_regions(lab)
    assert asked.shape == (3, 4)  # two queries and the one object found
    assert REASK_IOU == 0.25
    candidates = np.array([[70, 70, 79, 80], [52, 0, 60, 10], [0, 0, 10, 10], [20, 20, 40, 40]],
                          np.float32)  # fmt: skip
    # the rejected region, the answered object (IoU 0.8 with its box): skipped; the others: new
    assert asked_before(candidates, asked).tolist() == [True, True, False, False]
    assert asked_before(candidates, asked, iou=0.95).tolist() == [False, False, False, False]
    assert asked_before(candidates, np.zeros((0, 4))).tolist() == [False] * 4


def test_merged_partial_label_holds_both_rounds_answers():
    oracle, ref = _oracle()
    (first,) = oracle.annotate([ref], "partial", queries={"im": (QUERIES[3:5], Q_LABELS[3:5])})
    first = replace(first, query_rounds=np.array([1, 1]))
    (second,) = oracle.annotate([ref], "partial", queries={"im": (QUERIES[:3], Q_LABELS[:3])},
                                answered={"im": first.boxes})  # fmt: skip
    second = replace(second, query_rounds=np.array([2, 2, 2]))
    merged = merge_partial(first, second)
    np.testing.assert_array_equal(merged.boxes, TRUE_BOXES[[2, 0, 1]])  # each object once
    assert merged.labels.tolist() == [0, 0, 1]
    assert merged.answers.tolist() == [-1, 0, 1, 2, -1]  # the second round's shifted past the first
    np.testing.assert_array_equal(merged.queries, np.concatenate([QUERIES[3:5], QUERIES[:3]]))
    assert merged.query_rounds.tolist() == [1, 1, 2, 2, 2]
    assert merged.cost_s == pytest.approx(first.cost_s + second.cost_s)
    assert ImageLabels.from_json(merged.to_json()).query_rounds.tolist() == [1, 1, 2, 2, 2]
    with pytest.raises(AlrunError, match="only box-level"):
        merge_partial(first, ImageLabels("im", "box", TRUE_BOXES, TRUE_LABELS, 1.0))
