from pathlib import Path

import numpy as np
import pytest

from alrun.data.dataset import ImageRecord
from alrun.errors import AlrunError
from alrun.oracle import LABEL_KINDS, CostModel, ImageLabels, SimulatedOracle


def record(image_id="img", labels=(0, 0, 2)):
    n = len(labels)
    boxes = np.array([[10.0 * i, 0.0, 10.0 * i + 5, 5.0] for i in range(n)], np.float32)
    return ImageRecord(
        image_id,
        Path("never-opened.jpg"),
        64,
        48,
        boxes.reshape(n, 4),
        np.array(labels, dtype=np.int64),
    )


# 3 boxes, 2 distinct classes
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("box", 3 * 25.5),  # 76.5
        ("extreme", 3 * 7.0),  # 21.0
        ("click", 2.4 + 0.9 * (2 - 1)),  # 3.3
        ("center_click", 3 * 1.87),  # 5.61
        ("verify", 3 * 1.6),  # 4.8
        ("image_label", 2 * 1.0),  # one second per class present
    ],
)
def test_costs_with_boxes(kind, expected):
    assert CostModel().cost(record(), kind) == pytest.approx(expected)


@pytest.mark.parametrize("kind", [k for k in LABEL_KINDS if k != "image_label"])
def test_empty_image_costs_empty_image_s(kind):
    assert CostModel(empty_image_s=1.5).cost(record(labels=()), kind) == pytest.approx(1.5)


def test_empty_image_label_costs_one_class():
    # "nothing here" is answered like one class label
    model = CostModel(empty_image_s=1.5, image_label_per_class_s=0.7)
    assert model.cost(record(labels=()), "image_label") == pytest.approx(0.7)


def test_click_single_class_and_many_classes():
    assert CostModel().cost(record(labels=(1, 1, 1, 1)), "click") == pytest.approx(2.4)
    # 4 classes: 2.4 + 3 * 0.9 = 5.1
    assert CostModel().cost(record(labels=(0, 1, 2, 3)), "click") == pytest.approx(5.1)


def test_cost_model_overrides():
    model = CostModel(box_s=10.0, image_label_per_class_s=0.5)
    assert model.cost(record(), "box") == pytest.approx(30.0)
    assert model.cost(record(), "image_label") == pytest.approx(1.0)


def test_unknown_kind_raises():
    with pytest.raises(AlrunError, match=r"oracle\.kind"):
        CostModel().cost(record(), "polygon")
    with pytest.raises(AlrunError, match=r"oracle\.kind"):
        SimulatedOracle(CostModel(), kind="polygon")


def test_annotate_returns_copies_of_ground_truth_and_costs():
    recs = [record("a"), record("b", labels=(1,)), record("c", labels=())]
    oracle = SimulatedOracle(CostModel(), kind="box")
    out = oracle.annotate(recs)
    assert [x.image_id for x in out] == ["a", "b", "c"]
    assert all(isinstance(x, ImageLabels) and x.kind == "box" for x in out)
    assert [x.cost_s for x in out] == pytest.approx([76.5, 25.5, 1.0])
    assert oracle.cost(recs[0]) == pytest.approx(76.5)
    for lab, rec in zip(out, recs, strict=True):
        np.testing.assert_array_equal(lab.boxes, rec.boxes)
        np.testing.assert_array_equal(lab.labels, rec.labels)
        assert lab.boxes is not rec.boxes
        assert lab.labels is not rec.labels
    out[0].boxes[:] = -1
    out[0].labels[:] = 99
    assert (recs[0].boxes >= 0).all()
    assert recs[0].labels.tolist() == [0, 0, 2]


def test_annotate_with_click_kind():
    out = SimulatedOracle(CostModel(), kind="click").annotate([record()])
    assert out[0].kind == "click"
    assert out[0].cost_s == pytest.approx(3.3)
