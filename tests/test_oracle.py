import json
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


@pytest.mark.parametrize("kind", [k for k in LABEL_KINDS if k not in ("image_label", "partial")])
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


# --- every label kind, simulated from ground truth ------------------------------------------
def boxed(image_id="img"):
    boxes = np.array([[4.0, 6.0, 20.0, 30.0], [30.0, 2.0, 60.0, 12.0]], np.float32)
    return ImageRecord(image_id, Path("x.jpg"), 64, 48, boxes, np.array([1, 3], np.int64))


def test_clicks_fall_inside_their_boxes_and_are_seeded_per_image():
    rec = boxed()
    out = SimulatedOracle(CostModel(), seed=3).annotate([rec], "click")[0]
    assert out.kind == "click" and out.boxes.shape == (0, 4) and out.box_targets() is None
    assert out.labels.tolist() == [1, 3] and out.points.shape == (2, 2)
    assert ((out.points >= rec.boxes[:, :2]) & (out.points <= rec.boxes[:, 2:])).all()
    assert out.cost_s == pytest.approx(2.4 + 0.9)  # two classes
    # same (seed, image) -> same clicks, whatever else is asked in the same call
    again = SimulatedOracle(CostModel(), seed=3).annotate([boxed("other"), rec], "click")[1]
    np.testing.assert_array_equal(again.points, out.points)
    other_seed = SimulatedOracle(CostModel(), seed=4).annotate([rec], "click")[0]
    assert not np.array_equal(other_seed.points, out.points)


def test_center_clicks_are_centers_and_jitter_stays_in_the_box():
    rec = boxed()
    exact = SimulatedOracle(CostModel()).annotate([rec], "center_click")[0]
    np.testing.assert_allclose(exact.points, [[12.0, 18.0], [45.0, 7.0]])
    assert exact.cost_s == pytest.approx(2 * 1.87)
    noisy = SimulatedOracle(CostModel(), center_jitter_px=50.0).annotate([rec], "center_click")[0]
    assert not np.allclose(noisy.points, exact.points)
    assert ((noisy.points >= rec.boxes[:, :2]) & (noisy.points <= rec.boxes[:, 2:])).all()


def test_extreme_points_recover_the_box_exactly_without_jitter():
    rec = boxed()
    out = SimulatedOracle(CostModel()).annotate([rec], "extreme")[0]
    assert out.extreme_points.shape == (2, 4, 2)
    np.testing.assert_allclose(out.boxes, rec.boxes)
    np.testing.assert_allclose(out.extreme_points[:, 0, 0], rec.boxes[:, 0])  # left point on x1
    np.testing.assert_allclose(out.extreme_points[:, 3, 1], rec.boxes[:, 3])  # bottom on y2
    boxes, labels = out.box_targets()
    assert labels.tolist() == [1, 3] and out.cost_s == pytest.approx(14.0)
    noisy = SimulatedOracle(CostModel(), extreme_jitter_px=3.0).annotate([rec], "extreme")[0]
    assert not np.allclose(noisy.boxes, rec.boxes)
    assert (noisy.boxes >= 0).all() and (noisy.boxes[:, [0, 2]] <= 64).all()


def test_image_level_labels_list_the_classes_present():
    out = SimulatedOracle(CostModel()).annotate([record(labels=(2, 0, 2))], "image_label")[0]
    assert out.image_classes.tolist() == [0, 2] and len(out.labels) == 0
    assert out.box_targets() is None and out.cost_s == pytest.approx(2.0)


def test_verification_accepts_boxes_that_match_a_same_class_object():
    rec = boxed()
    proposals = {
        "img": ImageLabels(
            "img",
            "box",
            np.array([[5, 6, 20, 29], [5, 6, 20, 29], [40, 30, 60, 40]], np.float32),
            np.array([1, 3, 3]),  # right box right class / right box wrong class / wrong place
            0.0,
        )
    }
    out = SimulatedOracle(CostModel()).annotate([rec], "verify", proposals)[0]
    assert out.verified.tolist() == [True, False, False]
    assert out.cost_s == pytest.approx(3 * 1.6)  # billed per proposal, not per object
    boxes, labels = out.box_targets()
    assert labels.tolist() == [1] and boxes.tolist() == [[5, 6, 20, 29]]
    back = ImageLabels.from_json(json.loads(json.dumps(out.to_json())))
    assert back.verified.dtype == np.bool_ and back.verified.tolist() == [True, False, False]
    with pytest.raises(AlrunError, match="need proposals"):
        SimulatedOracle(CostModel()).annotate([rec], "verify")


def test_restricted_oracle_refuses_other_kinds():
    oracle = SimulatedOracle(CostModel(), kind="click")
    assert oracle.kinds == ("click",) and SimulatedOracle(CostModel()).kinds == LABEL_KINDS
    with pytest.raises(
        AlrunError, match=r"asks the oracle for 'box' labels but oracle\.kind=click"
    ):
        oracle.annotate([boxed()], "box")
    with pytest.raises(AlrunError, match="unknown label kind 'polygon'"):
        SimulatedOracle(CostModel()).require(["polygon"], "supervision")


@pytest.mark.parametrize("kind", ["box", "extreme", "click", "center_click", "image_label"])
def test_labels_round_trip_through_json(kind):
    out = SimulatedOracle(CostModel(), seed=1).annotate([boxed()], kind)[0]
    back = ImageLabels.from_json(json.loads(json.dumps(out.to_json())))
    assert back.to_json() == out.to_json()
    for name in ("boxes", "labels", "points", "extreme_points", "image_classes"):
        a, b = getattr(out, name), getattr(back, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))


def test_click_region_keeps_click_anywhere_in_the_central_part_of_the_box():
    rec = boxed()
    recs = [ImageRecord(f"i{k}", rec.file, 64, 48, rec.boxes, rec.labels) for k in range(50)]
    oracle = SimulatedOracle(CostModel(), seed=0, click_region=0.5)
    points = np.stack([lab.points for lab in oracle.annotate(recs, "click")])  # (50, 2, 2)
    center = (rec.boxes[:, :2] + rec.boxes[:, 2:]) / 2
    quarter = (rec.boxes[:, 2:] - rec.boxes[:, :2]) / 4
    assert (np.abs(points - center) <= quarter + 1e-4).all()
    # ... and spreads over that region (not a constant point)
    assert (np.abs(points - center).max(axis=0) > 0.8 * quarter).all()
    anywhere = SimulatedOracle(CostModel(), seed=0).annotate(recs, "click")
    spread = np.stack([lab.points for lab in anywhere])
    assert (np.abs(spread - center).max(axis=0) > quarter).all()
    with pytest.raises(AlrunError, match=r"oracle\.click_region: expected a value in \(0, 1\]"):
        SimulatedOracle(CostModel(), click_region=0.0)


def test_default_oracle_config_makes_extreme_and_center_clicks_noisy():
    from hydra.utils import instantiate

    from tests.helpers import compose_config

    oracle = instantiate(compose_config([]).oracle)
    rec = boxed()
    extreme = oracle.annotate([rec], "extreme")[0]
    assert oracle.extreme_jitter_px > 0 and not np.allclose(extreme.boxes, rec.boxes)
    center = oracle.annotate([rec], "center_click")[0]
    assert not np.allclose(center.points, [[12.0, 18.0], [45.0, 7.0]])
