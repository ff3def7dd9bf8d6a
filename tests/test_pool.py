from pathlib import Path

import numpy as np
import pytest

from alrun.data.dataset import DetectionDataset, ImageRecord
from alrun.errors import AlrunError
from alrun.oracle import CostModel, ImageLabels, SimulatedOracle
from alrun.pool import LabelPool
from alrun.truth import HiddenTruth


def record(image_id, n_boxes):
    boxes = np.array([[0.0, 0.0, 10.0 + i, 10.0] for i in range(n_boxes)], np.float32)
    return ImageRecord(
        image_id,
        Path(f"{image_id}.jpg"),
        32,
        32,
        boxes.reshape(n_boxes, 4),
        np.zeros(n_boxes, dtype=np.int64),
        domain="d0",
    )


TOY = DetectionDataset(
    "toy",
    ("cat", "dog"),
    tuple(record(i, n) for i, n in [("a", 1), ("b", 2), ("c", 0), ("d", 3)]),
)


@pytest.fixture
def pool():
    return LabelPool(TOY)


def oracle_of(kind=None):
    """A simulated oracle holding the toy pool's hidden truth (the pool holds none)."""
    oracle = SimulatedOracle(CostModel(), kind)
    oracle.hold_truth(HiddenTruth(TOY.images))
    return oracle


def test_pool_holds_references_without_ground_truth(pool):
    ref = pool.record("d")
    assert not hasattr(ref, "boxes") and not hasattr(ref, "labels")
    assert (ref.image_id, ref.file, ref.width, ref.height, ref.domain) == (
        "d",
        Path("d.jpg"),
        32,
        32,
        "d0",
    )
    assert pool.dataset.classes == ("cat", "dog") and pool.dataset.ids == ["a", "b", "c", "d"]
    with pytest.raises(AlrunError, match="no ground truth for image 'd'"):
        SimulatedOracle(CostModel(), "box").annotate([ref])  # an oracle without the truth


def test_initially_unlabelled(pool):
    assert len(pool) == 4
    assert pool.unlabelled_ids == ["a", "b", "c", "d"]
    assert pool.labelled_ids == []
    assert pool.labelled_round.tolist() == [-1, -1, -1, -1]
    totals = pool.totals()
    assert set(totals.values()) == {0} and totals["cost_s"] == 0.0
    assert {"images", "boxes", "clicks", "verified", "accepted", "image_classes"} <= set(totals)
    assert len(pool.training_set()) == 0


def test_add_tracks_rounds(pool):
    oracle = oracle_of("box")
    pool.add(oracle.annotate(pool.records(["d", "b"])), round_index=0)
    pool.add(oracle.annotate(pool.records(["c"])), round_index=1)
    assert pool.unlabelled_ids == ["a"]
    assert pool.labelled_ids == ["b", "c", "d"]  # dataset order, not labelling order
    assert pool.labelled_round.tolist() == [-1, 0, 1, 0]
    assert len(pool.labels["d"].labels) == 3  # bought: the 3 boxes of the hidden truth
    # 2 + 0 + 3 boxes; 2*25.5 + 1.0 (empty) + 3*25.5
    totals = pool.totals()
    assert (totals["images"], totals["boxes"], totals["clicks"]) == (3, 5, 0)
    assert totals["cost_s"] == pytest.approx(5 * 25.5 + 1.0)
    assert totals["images_box"] == 3 and totals["images_click"] == 0


def test_totals_counts_clicks_separately(pool):
    pool.add(oracle_of("box").annotate(pool.records(["b"])), 0)
    pool.add(oracle_of("center_click").annotate(pool.records(["d"])), 1)
    pool.add(oracle_of("image_label").annotate(pool.records(["a"])), 1)
    totals = pool.totals()
    assert totals["images"] == 3
    assert totals["boxes"] == 2
    assert totals["clicks"] == 3
    assert totals["cost_s"] == pytest.approx(2 * 25.5 + 3 * 1.87 + 1.0)
    assert totals["image_classes"] == 1  # image 'a' holds one class
    assert (totals["images_box"], totals["images_center_click"], totals["images_image_label"]) == (
        1,
        1,
        1,
    )


def test_totals_count_every_kind(pool):
    oracle = oracle_of()
    pool.add(oracle.annotate(pool.records(["a"]), "extreme"), 0)
    proposals = {
        "b": ImageLabels(
            "b", "box", np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([0, 0]), 0
        )
    }
    pool.add(oracle.annotate(pool.records(["b"]), "verify", proposals), 0)
    pool.add(oracle.annotate(pool.records(["d"]), "click"), 0)
    totals = pool.totals()
    assert (totals["boxes"], totals["verified"], totals["accepted"], totals["clicks"]) == (
        1,
        2,
        1,
        3,
    )
    assert totals["cost_s"] == pytest.approx(7.0 + 2 * 1.6 + 2.4)
    assert [totals[f"images_{k}"] for k in ("extreme", "verify", "click", "box")] == [1, 1, 1, 0]


def test_training_set_keeps_only_images_whose_labels_give_boxes(pool):
    oracle = oracle_of()
    pool.add(oracle.annotate(pool.records(["a"]), "box"), 0)
    pool.add(oracle.annotate(pool.records(["d"]), "click"), 0)
    pool.add(oracle.annotate(pool.records(["b"]), "image_label"), 0)
    assert pool.training_set().ids == ["a"]  # clicks and classes are not boxes to train on
    labelled = pool.labelled_set()
    assert labelled.ids == ["a", "b", "d"] and labelled.images[2].num_boxes == 0
    described = pool.describe("d")
    assert described["label_kind"] == "click" and len(described["points"]) == 3
    assert pool.describe("b")["image_classes"] == [0] and "points" not in pool.describe("a")


def test_training_set_uses_oracle_labels(pool):
    given = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    pool.add([ImageLabels("b", "box", given, np.array([1]), 5.0)], 0)
    train = pool.training_set()
    assert train.name == "toy:labelled"
    assert train.classes == ("cat", "dog")
    assert train.ids == ["b"]
    rec = train.images[0]
    np.testing.assert_array_equal(rec.boxes, given)
    assert rec.labels.tolist() == [1]
    assert TOY.by_id()["b"].num_boxes == 2  # the hidden ground truth is unchanged
    assert (rec.file, rec.width, rec.height, rec.domain) == (Path("b.jpg"), 32, 32, "d0")


def test_double_labelling_raises(pool):
    oracle = oracle_of("box")
    pool.add(oracle.annotate(pool.records(["a"])), 0)
    with pytest.raises(AlrunError, match="'a' is already labelled"):
        pool.add(oracle.annotate(pool.records(["a"])), 1)
    assert pool.labelled_round.tolist() == [0, -1, -1, -1]


def test_cost_total_does_not_depend_on_the_order_labels_were_added(pool):
    """Issue 25 case 6: a resumed pool is rebuilt in another order than the uninterrupted run
    bought it; a plain float sum then differed in the last digit (842.86 vs 842.8600000000001)."""
    costs = {"a": 0.1, "b": 0.7, "c": 0.2, "d": 841.86}

    def labels(image_id):
        empty = np.zeros((0, 4), np.float32)
        return ImageLabels(image_id, "box", empty, np.zeros(0, np.int64), costs[image_id])

    forward, backward = LabelPool(pool.dataset), LabelPool(pool.dataset)
    forward.add([labels(i) for i in "abcd"], 0)
    backward.add([labels(i) for i in "dcba"], 0)
    assert forward.totals()["cost_s"] == backward.totals()["cost_s"] == 842.86


def test_a_partly_labelled_image_is_asked_again_and_its_answers_merge(pool):
    """Box-level queries (issue 24): a second ``partial`` label merges into the first; the
    image keeps its first round, each query its own; any other second label is refused."""
    oracle = oracle_of("partial")
    d = TOY.images[3]  # three objects
    ask = {"d": (d.boxes[:1], d.labels[:1])}
    pool.add(oracle.annotate(pool.records(["d"]), queries=ask), 1)
    assert pool.partial_ids == ["d"] and "d" in pool.box_query_ids()
    assert pool.box_query_ids() == ["a", "b", "c", "d"] and pool.unlabelled_ids == ["a", "b", "c"]
    again = {"d": (d.boxes, d.labels)}
    known = {"d": pool.labels["d"].boxes}
    labs = oracle.annotate(pool.records(["d"]), queries=again, answered=known)
    assert labs[0].answers.tolist() == [-1, 0, 1]  # the first object was answered in round 1
    pool.add(labs, 2)
    lab = pool.labels["d"]
    np.testing.assert_array_equal(lab.boxes, d.boxes)  # both rounds' answers, each object once
    assert lab.answers.tolist() == [0, -1, 1, 2] and lab.query_rounds.tolist() == [1, 2, 2, 2]
    assert pool.labelled_round.tolist() == [-1, -1, -1, 1]
    totals = pool.totals()
    assert totals["boxes"] == 3 and totals["queries"] == 4 and totals["images_reasked"] == 1
    assert totals["cost_s"] == pytest.approx(4 * CostModel().verify_s)  # every box fits
    with pytest.raises(AlrunError, match="'d' is already labelled"):
        pool.add(oracle_of("box").annotate(pool.records(["d"])), 3)
