from pathlib import Path

import numpy as np
import pytest

from alrun.data.dataset import DetectionDataset, ImageRecord
from alrun.errors import AlrunError
from alrun.oracle import CostModel, ImageLabels, SimulatedOracle
from alrun.pool import LabelPool


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


@pytest.fixture
def pool():
    ds = DetectionDataset(
        "toy",
        ("cat", "dog"),
        tuple(record(i, n) for i, n in [("a", 1), ("b", 2), ("c", 0), ("d", 3)]),
    )
    return LabelPool(ds)


def test_initially_unlabelled(pool):
    assert len(pool) == 4
    assert pool.unlabelled_ids == ["a", "b", "c", "d"]
    assert pool.labelled_ids == []
    assert pool.labelled_round.tolist() == [-1, -1, -1, -1]
    assert pool.totals() == {"images": 0, "boxes": 0, "clicks": 0, "cost_s": 0.0}
    assert len(pool.training_set()) == 0


def test_add_tracks_rounds(pool):
    oracle = SimulatedOracle(CostModel(), "box")
    pool.add(oracle.annotate(pool.records(["d", "b"])), round_index=0)
    pool.add(oracle.annotate(pool.records(["c"])), round_index=1)
    assert pool.unlabelled_ids == ["a"]
    assert pool.labelled_ids == ["b", "c", "d"]  # dataset order, not labelling order
    assert pool.labelled_round.tolist() == [-1, 0, 1, 0]
    assert pool.record("d").num_boxes == 3
    # 2 + 0 + 3 boxes; 2*25.5 + 1.0 (empty) + 3*25.5
    assert pool.totals() == {
        "images": 3,
        "boxes": 5,
        "clicks": 0,
        "cost_s": pytest.approx(5 * 25.5 + 1.0),
    }


def test_totals_counts_clicks_separately(pool):
    pool.add(SimulatedOracle(CostModel(), "box").annotate(pool.records(["b"])), 0)
    pool.add(SimulatedOracle(CostModel(), "center_click").annotate(pool.records(["d"])), 1)
    pool.add(SimulatedOracle(CostModel(), "image_label").annotate(pool.records(["a"])), 1)
    totals = pool.totals()
    assert totals["images"] == 3
    assert totals["boxes"] == 2
    assert totals["clicks"] == 3
    assert totals["cost_s"] == pytest.approx(2 * 25.5 + 3 * 1.87 + 1.0)


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
    assert pool.record("b").num_boxes == 2  # the hidden ground truth is unchanged
    assert (rec.file, rec.width, rec.height, rec.domain) == (Path("b.jpg"), 32, 32, "d0")


def test_double_labelling_raises(pool):
    oracle = SimulatedOracle(CostModel(), "box")
    pool.add(oracle.annotate(pool.records(["a"])), 0)
    with pytest.raises(AlrunError, match="'a' is already labelled"):
        pool.add(oracle.annotate(pool.records(["a"])), 1)
    assert pool.labelled_round.tolist() == [0, -1, -1, -1]
