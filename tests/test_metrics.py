from pathlib import Path

import numpy as np
import pytest
import torch

from alrun.data.dataset import DetectionDataset, ImageRecord
from alrun.errors import AlrunError
from alrun.metrics import (
    MetricConfig,
    error_impact,
    evaluate,
    failure_analysis,
    failure_modes,
    interpolated_ap,
    pool_misses,
)
from alrun.types import Detections


def record(image_id, boxes, labels, ignore_boxes=None, ignore_labels=None, areas=None):
    return ImageRecord(
        image_id,
        Path(f"{image_id}.png"),
        640,
        480,
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(labels, np.int64),
        ignore_boxes=None if ignore_boxes is None else np.array(ignore_boxes, np.float32),
        ignore_labels=None if ignore_labels is None else np.array(ignore_labels, np.int64),
        areas=None if areas is None else np.array(areas, np.float32),
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


NO_ERRORS = {"wrong_class": 0, "poor_loc": 0, "both": 0, "dupe": 0, "fp": 0, "missed": 0}


def test_failure_modes_perfect(dataset):
    preds = [dets(i, b, lab) for i, (b, lab) in GT.items()]
    assert failure_modes(dataset, preds) == NO_ERRORS


def six_errors():
    """One object of each TIDE error type, plus a true positive and a sub-threshold match."""
    ds = DetectionDataset(
        "toy",
        ("cat", "dog"),
        (
            record(
                "x",
                [
                    [0, 0, 10, 10],  # G0 cat: found, then found again (duplicate)
                    [100, 100, 120, 120],  # G1 cat: found with a shifted box
                    [200, 200, 220, 220],  # G2 dog: found as a cat
                    [300, 300, 310, 310],  # G3 dog: found only below the threshold
                    [400, 400, 420, 420],  # G4 dog: near a shifted cat box ("both")
                ],
                [0, 0, 1, 1, 1],
                ignore_boxes=[[600, 0, 640, 40]],  # a crowd / difficult cat region
                ignore_labels=[0],
            ),
        ),
    )
    preds = [
        dets(
            "x",
            [
                [0, 0, 10, 10],  # TP on G0
                [0, 0, 10, 10],  # dupe of G0
                [110, 100, 130, 120],  # poor_loc on G1: IoU 200/600 = 1/3
                [200, 200, 220, 220],  # wrong_class on G2
                [410, 400, 430, 420],  # cat on dog G4 with IoU 1/3: both
                [500, 400, 510, 410],  # background: fp
                [605, 5, 635, 35],  # inside the cat ignore region: neither TP nor error
                [300, 300, 310, 310],  # matches G3, but scored 0.3
            ],
            [0, 0, 0, 0, 0, 1, 0, 1],
            scores=[0.95, 0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.3],
        )
    ]
    return ds, preds


def test_failure_modes_counts_each_tide_error_once():
    ds, preds = six_errors()
    # G3 (only matched at 0.3) and G4 (a "both" error does not explain an object, as in TIDE)
    # are missed; G1 and G2 are explained by their poor_loc / wrong_class errors.
    expected = {"wrong_class": 1, "poor_loc": 1, "both": 1, "dupe": 1, "fp": 1, "missed": 2}
    assert failure_modes(ds, preds, score_threshold=0.5) == expected
    assert failure_modes(ds, preds, score_threshold=0.2) == {**expected, "missed": 1}
    # without the ignore region the detection on it is a background error
    (rec,) = ds.images
    plain = DetectionDataset("toy", ds.classes, (record("x", rec.boxes, rec.labels),))
    assert failure_modes(plain, preds, score_threshold=0.5) == {**expected, "fp": 2}


def test_failure_analysis_records_the_threshold():
    ds, preds = six_errors()
    out = failure_analysis(ds, preds, 0.2)
    assert out["failure_score_threshold"] == 0.2
    assert out["missed"] == 1
    assert set(out["error_impact_AP50"]) == {"AP50", *(f"d_{t}" for t in NO_ERRORS)}


def test_error_impact_background_hand_computed():
    # one class, G0 and G1 found, but a background box scores highest:
    # FP, TP, TP -> recall 0, 1/2, 1; precision 0, 1/2, 2/3 -> envelope 2/3 -> AP 2/3.
    ds = DetectionDataset(
        "toy", ("cat",), (record("x", [[0, 0, 10, 10], [100, 100, 110, 110]], [0, 0]),)
    )
    preds = [
        dets(
            "x",
            [[50, 50, 60, 60], [0, 0, 10, 10], [100, 100, 110, 110]],
            [0, 0, 0],
            scores=[0.9, 0.8, 0.7],
        )
    ]
    impact = error_impact(ds, preds)
    assert impact["AP50"] == pytest.approx(2 / 3)
    assert impact["d_fp"] == pytest.approx(1 / 3)  # dropping it gives AP 1
    for error in ("wrong_class", "poor_loc", "both", "dupe", "missed"):
        assert impact[f"d_{error}"] == pytest.approx(0.0)


def test_error_impact_dupe_missed_loc_class_hand_computed():
    # G0 found then duplicated, G1 missed: TP, FP with 2 objects -> AP = 1/2 * 1 = 1/2.
    ds = DetectionDataset(
        "toy", ("cat",), (record("x", [[0, 0, 10, 10], [100, 100, 110, 110]], [0, 0]),)
    )
    preds = [dets("x", [[0, 0, 10, 10], [0, 0, 10, 10]], [0, 0], scores=[0.9, 0.8])]
    impact = error_impact(ds, preds)
    assert impact["AP50"] == pytest.approx(0.5)
    assert impact["d_dupe"] == pytest.approx(0.0)  # TP, (dropped): recall stays 1/2
    assert impact["d_missed"] == pytest.approx(0.5)  # G1 removed: TP, FP of 1 -> AP 1

    # a shifted box (IoU 1/3) gets the object's box; a dog on a cat gets the cat class
    ds2 = DetectionDataset(
        "toy", ("cat", "dog"), (record("x", [[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0]),)
    )
    preds2 = [dets("x", [[5, 0, 15, 10], [50, 50, 60, 60]], [0, 1], scores=[0.9, 0.8])]
    impact2 = error_impact(ds2, preds2)
    assert impact2["AP50"] == pytest.approx(0.0)  # dog has no ground truth: cat AP only
    assert impact2["d_poor_loc"] == pytest.approx(0.5)  # TP on G0 -> recall 1/2 at precision 1
    # the dog becomes a TP on G1 but ranks below the still shifted box: FP, TP -> 1/2 * 1/2
    assert impact2["d_wrong_class"] == pytest.approx(0.25)


# ---- VOC protocol, hand-computed ------------------------------------------------------------


def voc_case(with_difficult=True):
    """Class 0: A has G0, G1 and a difficult object D; B has G2. npos = 3.

    Detections (class 0) by score: 0.9 on G0 (TP), 0.8 on D (ignored), 0.7 background in B
    (FP), 0.5 on G2 (TP) -> TP, FP, TP: recall 1/3, 1/3, 2/3, precision 1, 1/2, 2/3.
    A class-1 detection where class 1 has no ground truth does not enter the mean.
    """
    difficult = {"ignore_boxes": [[40, 40, 50, 50]], "ignore_labels": [0]} if with_difficult else {}
    ds = DetectionDataset(
        "toy",
        ("cat", "dog"),
        (
            record("A", [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], **difficult),
            record("B", [[0, 0, 10, 10]], [0]),
        ),
    )
    preds = [
        dets("A", [[0, 0, 10, 10], [40, 40, 50, 50]], [0, 0], scores=[0.9, 0.8]),
        dets("B", [[50, 50, 60, 60], [0, 0, 10, 10], [0, 0, 9, 9]], [0, 0, 1], [0.7, 0.5, 0.4]),
    ]
    return ds, preds


def test_voc12_all_point_ap_hand_computed():
    ds, preds = voc_case()
    out = evaluate(ds, preds, "voc12")
    # envelope: precision 1 up to recall 1/3, then 2/3 up to 2/3 -> 1/3 + 1/3 * 2/3 = 5/9
    assert out["mAP50"] == pytest.approx(5 / 9)
    assert out["mAP"] == out["mAP50"]
    assert out["protocol"] == "voc12"
    assert out["mAR"] == pytest.approx(2 / 3)
    assert out["per_class"] == {"cat": {"AP50": pytest.approx(5 / 9)}, "dog": {"AP50": None}}


def test_voc07_eleven_point_ap_hand_computed():
    ds, preds = voc_case()
    # recall levels 0, .1, .2, .3 -> precision 1; .4, .5, .6 -> 2/3; .7 .. 1 -> 0
    assert evaluate(ds, preds, "voc07")["mAP50"] == pytest.approx((4 * 1 + 3 * 2 / 3) / 11)


def test_voc_difficult_is_neither_tp_nor_fp():
    ds, preds = voc_case(with_difficult=False)
    # without the difficult mark the 0.8 box is an FP: TP, FP, FP, TP -> 1/3 + 1/3 * 1/2 = 1/2
    assert evaluate(ds, preds, "voc12")["mAP50"] == pytest.approx(0.5)


def test_interpolated_ap_reference_values():
    recall, precision = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    assert interpolated_ap(recall, precision, "all") == pytest.approx(0.75)
    # levels 0..0.5 (6 of 11) -> 1, 0.6..1 (5) -> 0.5
    assert interpolated_ap(recall, precision, "11point") == pytest.approx((6 + 2.5) / 11)


def test_unknown_protocol_is_one_line_error():
    with pytest.raises(AlrunError, match=r"^metric\.protocol: expected one of coco\|voc07\|voc12"):
        MetricConfig(protocol="voc2012")
    with pytest.raises(AlrunError, match="metric.failure_score_threshold"):
        MetricConfig(failure_score_threshold=2)


# ---- COCO protocol: ignore regions, areas, per-class AP ---------------------------------------


def test_coco_crowd_detection_is_not_a_false_positive():
    crowd = {"ignore_boxes": [[200, 200, 400, 400]], "ignore_labels": [0]}
    with_crowd = DetectionDataset("toy", ("cat",), (record("x", [[0, 0, 50, 50]], [0], **crowd),))
    without = DetectionDataset("toy", ("cat",), (record("x", [[0, 0, 50, 50]], [0]),))
    # the highest-scoring box lies inside the crowd region
    preds = [dets("x", [[250, 250, 300, 300], [0, 0, 50, 50]], [0, 0], scores=[0.95, 0.9])]
    assert evaluate(with_crowd, preds)["mAP50"] == pytest.approx(1.0)
    assert evaluate(without, preds)["mAP50"] == pytest.approx(0.5)


def test_coco_uses_annotation_area_for_size_ranges():
    box = [[0, 0, 100, 100]]  # 10,000 px as a box: "large" (> 96^2)
    plain = DetectionDataset("toy", ("cat",), (record("x", box, [0]),))
    small = DetectionDataset("toy", ("cat",), (record("x", box, [0], areas=[500.0]),))
    preds = [dets("x", box, [0])]
    assert evaluate(plain, preds)["mAP_large"] == pytest.approx(1.0)
    assert evaluate(plain, preds)["mAP_small"] == -1.0
    assert evaluate(small, preds)["mAP_small"] == pytest.approx(1.0)
    assert evaluate(small, preds)["mAP_large"] == -1.0


def test_coco_per_class_ap(dataset):
    # cat found, the two dogs not
    preds = [dets("a", [GT["a"][0][0]], [0]), Detections.empty("b")]
    out = evaluate(dataset, preds)
    assert out["per_class"]["cat"] == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)}
    assert out["per_class"]["dog"] == {"AP": 0.0, "AP50": 0.0}
    assert out["mAP"] == pytest.approx(0.5)


# ---- pool misses ----------------------------------------------------------------------------


def test_pool_misses_selected_vs_rest():
    records = [
        record("p1", [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0]),  # one of two found
        record("p2", [[0, 0, 10, 10]], [0]),  # found only below the threshold
        record("p3", [[0, 0, 10, 10], [50, 50, 60, 60], [70, 70, 80, 80]], [0, 0, 0]),  # all found
    ]
    preds = [
        dets("p1", [[0, 0, 10, 10]], [0]),
        dets("p2", [[0, 0, 10, 10]], [0], scores=[0.2]),
        dets("p3", [[0, 0, 10, 10], [50, 50, 60, 60], [70, 70, 80, 80]], [0, 0, 0]),
    ]
    out = pool_misses(records, preds, ["p1", "p2"], score_threshold=0.5)
    assert out["selected"] == {
        "images": 2,
        "objects": 3,
        "missed": 2,
        "missed_per_image": 1.0,
        "missed_fraction": pytest.approx(2 / 3),
    }
    assert out["rest"]["images"] == 1 and out["rest"]["missed"] == 0
    assert pool_misses(records, preds, ["p1", "p2"], score_threshold=0.1)["selected"]["missed"] == 1


# ---- wired into the loop --------------------------------------------------------------------


def test_loop_records_protocol_threshold_tide_and_pool_misses(tmp_path, monkeypatch):
    import csv
    import json

    from alrun.loop import run_experiment
    from tests.helpers import compose_config

    monkeypatch.setenv("ALRUN_CACHE", str(tmp_path / "cache"))
    cfg = compose_config(
        [
            "experiment=smoke",
            "metric.protocol=voc12",
            "metric.failure_score_threshold=0.05",
            "budget.rounds=1",
            "trainer.iterations=1",
            "trainer.first_iterations=1",
            "dataset.num_pool=20",
            "dataset.num_test=5",
        ]
    )
    run_experiment(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "round_00" / "metrics.json").read_text())
    assert metrics["protocol"] == "voc12" and metrics["mAP"] == metrics["mAP50"]
    assert "mAP75" not in metrics  # a COCO-only number is not reported under VOC
    assert set(metrics["per_class"]) == {"circle", "rectangle", "triangle", "cross"}
    assert metrics["failure_score_threshold"] == 0.05
    assert {"d_both", "d_dupe", "d_missed"} <= set(metrics["error_impact_AP50"])
    misses = metrics["pool_misses"]  # entropy scored the 10 unlabelled images, picked 10
    assert misses["selected"]["images"] == 10 and misses["rest"]["images"] == 0
    with (tmp_path / "run" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert int(rows[0]["both"]) == metrics["both"] and int(rows[0]["dupe"]) == metrics["dupe"]
    last = json.loads((tmp_path / "run" / "round_01" / "metrics.json").read_text())
    assert last["pool_misses"] is None  # the last round scores no pool


@pytest.mark.integration
def test_cli_unknown_protocol_fails_before_any_round(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alrun.cli",
            "experiment=smoke",
            "metric.protocol=voc2012",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "alrun: error: metric.protocol: expected one of coco|voc07|voc12, got 'voc2012'\n"
        "  see docs/reports.md"
    )
    assert not list((tmp_path / "run").glob("round_*"))
