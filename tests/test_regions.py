"""Box-level queries (alrun/regions.py) and the oracle's ``partial`` labels: which object a
region is answered with, what each query costs in boxes and seconds, and the label's record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alrun.data.dataset import ImageRecord
from alrun.errors import AlrunError
from alrun.oracle import CostModel, SimulatedOracle
from alrun.regions import answer_regions, query_charges
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
