"""Weak point supervision: pseudo-boxes from clicks, Desai's hard and soft switches, one round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alrun.data.dataset import ImageRecord
from alrun.errors import AlrunError
from alrun.loop import run_experiment
from alrun.oracle import CostModel, SimulatedOracle
from alrun.supervision.base import LabelRequest
from alrun.supervision.weak_point import (
    WeakPointRegime,
    clicked_confidence,
    hard_switch_round,
    image_confidence,
    weak_round_rates,
)
from alrun.types import Detections
from tests.helpers import compose_config


class FixedDetector:
    """Returns hand-made predictions per image id (what the regime sees of a model)."""

    def __init__(self, preds: dict[str, Detections]):
        self.preds = preds
        self.calls = 0

    def predict(self, records, needs=None, progress=None):
        self.calls += 1
        return [self.preds[r.image_id] for r in records]


def dets(image_id, boxes, labels, scores, class_probs=None) -> Detections:
    return Detections(
        image_id,
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.int64),
        class_probs=None if class_probs is None else torch.tensor(class_probs),
        head="sigmoid",
    )


def record(image_id, boxes, labels) -> ImageRecord:
    return ImageRecord(
        image_id,
        Path("x.jpg"),
        64,
        64,
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(labels),
    )


def row(r, clicks, boxes, cost, m):
    return {"round": r, "clicks": clicks, "boxes": boxes, "cost_s": cost, "mAP": m}


# round 0: 300 boxes; round 1: +100 clicks for 200 s, +0.010 mAP (0.05 per 1000 s);
# round 2: +100 clicks for 200 s, +0.002 mAP (0.01 per 1000 s); round 3: boxes only, -0.1 mAP
HISTORY = (
    row(0, 0, 300, 7650.0, 0.300),
    row(1, 100, 300, 7850.0, 0.310),
    row(2, 200, 300, 8050.0, 0.312),
    row(3, 200, 400, 10600.0, 0.212),
)


def test_weak_round_rates_count_only_rounds_that_bought_clicks():
    rates = weak_round_rates(HISTORY, "mAP")
    assert [r["round"] for r in rates] == [1, 2]  # round 3 bought boxes: not a weak round
    assert [r["gain_per_ks"] for r in rates] == pytest.approx([0.05, 0.01])
    assert [r["cost_s"] for r in rates] == pytest.approx([200.0, 200.0])


@pytest.mark.parametrize(
    ("threshold", "switched"),
    [(0.0, None), (0.01, None), (0.011, 2), (0.05, 2), (0.0501, 1), (10.0, 1)],
)
def test_hard_switch_fires_at_the_first_weak_round_below_the_threshold(threshold, switched):
    # 0.01 per 1000 s is not *below* 0.01: no switch; the box round's loss never counts
    assert hard_switch_round(HISTORY, "mAP", threshold) == switched


def test_hard_switch_asks_for_boxes_from_the_switch_on_and_records_it():
    regime = WeakPointRegime(hard_threshold=0.03)
    assert regime.label_kind(LabelRequest(0)) == "box"  # Desai: the initial set is drawn
    assert regime.label_kind(LabelRequest(2, HISTORY[:2])) == "center_click"  # 0.05 >= 0.03
    assert regime.label_kind(LabelRequest(3, HISTORY[:3])) == "box"  # round 2: 0.01 < 0.03
    assert regime.label_kind(LabelRequest(4, HISTORY)) == "box"  # and stays switched
    assert WeakPointRegime().label_kind(LabelRequest(4, HISTORY)) == "center_click"  # no switch
    rec = record("a", [[0, 0, 10, 10]], [0])
    oracle = SimulatedOracle(CostModel())
    labels = regime.annotate(oracle, [rec], LabelRequest(3, HISTORY[:3]))
    assert labels[0].kind == "box"
    (entry,) = regime.round_record(2)["labels"]
    assert entry["requested"] == "box" and entry["received"] == {"box": 1}
    assert entry["hard_switch"]["switched_at_round"] == 2
    assert [w["gain_per_ks"] for w in entry["hard_switch"]["weak_rounds"]] == pytest.approx(
        [0.05, 0.01]
    )


def test_soft_switch_gives_boxes_exactly_to_images_below_the_threshold():
    recs = [record(i, [[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1]) for i in "abcd"]
    probs = {  # mean over boxes of the max class probability
        "a": [[0.2, 0.1], [0.3, 0.4]],  # (0.2 + 0.4) / 2 = 0.3 < 0.5 -> box
        "b": [[0.9, 0.1], [0.1, 0.1]],  # 0.5: not below -> click
        "c": [[0.7, 0.1]],  # 0.7 -> click
        "d": None,  # nothing predicted: confidence 0 -> box
    }
    preds = {
        i: dets(i, [[0, 0, 1, 1]] * len(p), [0] * len(p), [0.5] * len(p), p)
        if p
        else Detections.empty(i)
        for i, p in probs.items()
    }
    assert [image_confidence(preds[i]) for i in "abcd"] == pytest.approx([0.3, 0.5, 0.7, 0.0])
    regime = WeakPointRegime(soft_threshold=0.5, soft_rule="before_clicks")
    request = LabelRequest(1, HISTORY[:1], FixedDetector(preds))
    assert regime.label_kind(request) == "center_click"  # priced as clicks
    labels = regime.annotate(SimulatedOracle(CostModel()), recs, request)
    assert [lab.kind for lab in labels] == ["box", "center_click", "center_click", "box"]
    assert labels[0].cost_s == pytest.approx(2 * 25.5) and labels[1].cost_s == pytest.approx(
        2 * 1.87
    )
    soft = regime.round_record(0)["labels"][0]["soft_switch"]
    assert (soft["boxes"], soft["clicks"]) == (2, 2)
    assert [(x["image_id"], x["kind"]) for x in soft["images"]] == [
        ("a", "box"),
        ("b", "center_click"),
        ("c", "center_click"),
        ("d", "box"),
    ]


#: the issue's example: one object predicted at 0.60 and three background boxes near 0.33
OBJECT = record("img", [[10, 10, 30, 30]], [0])  # center click at (20, 20)
ONE_OBJECT_THREE_BACKGROUND = {
    "img": dets(
        "img",
        [[8, 8, 32, 32], [40, 40, 60, 60], [0, 40, 20, 60], [40, 0, 60, 20]],
        [0, 0, 0, 0],
        [0.60, 0.33, 0.33, 0.34],
    )
}


def test_desai_soft_switch_clicks_first_and_trusts_the_clicked_pseudo_boxes():
    """Desai et al. 2019 (soft switch): the click picks the 0.60 box, mean 0.60 >= 0.5: the
    image keeps its click; alrun's earlier rule averaged all four boxes (0.40) and bought boxes."""
    oracle = SimulatedOracle(CostModel())
    request = LabelRequest(1, HISTORY[:1], FixedDetector(ONE_OBJECT_THREE_BACKGROUND))
    paper = WeakPointRegime(soft_threshold=0.5)
    [label] = paper.annotate(oracle, [OBJECT], request)
    assert label.kind == "center_click" and label.cost_s == pytest.approx(1.87)
    soft = paper.round_record(0)["labels"][0]["soft_switch"]
    assert soft["rule"] == "after_clicks" and soft["images"][0]["confidence"] == pytest.approx(0.6)
    earlier = WeakPointRegime(soft_threshold=0.5, soft_rule="before_clicks")
    [label] = earlier.annotate(oracle, [OBJECT], request)
    assert label.kind == "box" and label.cost_s == pytest.approx(25.5)
    conf = earlier.round_record(0)["labels"][0]["soft_switch"]["images"][0]["confidence"]
    assert conf == pytest.approx((0.60 + 0.33 + 0.33 + 0.34) / 4)


def test_desai_soft_switch_low_confidence_images_pay_clicks_and_boxes():
    """Two objects; the click on the second finds no box of its class (counts 0): mean
    (0.60 + 0) / 2 = 0.30 < 0.5, so the image gets boxes too, priced 2 clicks + 2 boxes. An image
    without objects keeps its empty click answer."""
    two = record("two", [[10, 10, 30, 30], [40, 40, 60, 60]], [0, 1])
    empty = record("empty", [], [])
    preds = {"two": dets("two", [[8, 8, 32, 32]], [0], [0.6]), "empty": Detections.empty("empty")}
    request = LabelRequest(1, HISTORY[:1], FixedDetector(preds))
    regime = WeakPointRegime(soft_threshold=0.5)
    labels = regime.annotate(SimulatedOracle(CostModel()), [two, empty], request)
    assert [lab.kind for lab in labels] == ["box", "center_click"]
    assert labels[0].cost_s == pytest.approx(2 * 1.87 + 2 * 25.5)
    np.testing.assert_array_equal(labels[0].boxes, two.boxes)  # trains on the bought boxes
    entry = regime.round_record(0)["labels"][0]
    assert entry["cost_s"] == pytest.approx(2 * 1.87 + 2 * 25.5 + labels[1].cost_s)
    soft = entry["soft_switch"]
    assert (soft["boxes"], soft["clicks"]) == (1, 1)
    assert [x["confidence"] for x in soft["images"]] == [pytest.approx(0.3), None]
    assert soft["clicks_paid_for_boxed"] == pytest.approx(2 * 1.87)


def test_clicked_confidence_uses_the_pseudo_box_each_click_picks():
    lab = SimulatedOracle(CostModel()).annotate([OBJECT], "center_click")[0]
    det = ONE_OBJECT_THREE_BACKGROUND["img"]
    assert clicked_confidence(lab, det, 0.3, True) == pytest.approx(0.60)
    assert clicked_confidence(lab, det, 0.7, True) == 0.0  # the 0.60 box is below min_score
    assert clicked_confidence(lab, Detections.empty("img"), 0.3, True) == 0.0


def test_click_pseudo_boxes_use_the_nearest_prediction_or_the_prior():
    rec = record("a", [[0, 0, 20, 20], [40, 40, 60, 60]], [0, 1])
    lab = SimulatedOracle(CostModel()).annotate([rec], "center_click")[0]  # (10,10), (50,50)
    det = dets("a", [[2, 2, 19, 18], [0, 0, 30, 30], [45, 45, 55, 55]], [0, 0, 0], [0.9] * 3)
    prior = np.array([[8.0, 8.0], [16.0, 12.0]], np.float32)
    boxes, matched = WeakPointRegime().pseudo_boxes(lab, rec, det, prior)
    # click 1: box 0 (center (10.5, 10)) is nearer than box 1 (center (15, 15));
    # click 2 (class 1): no class-1 prediction -> prior 16 x 12 on (50, 50)
    assert matched.tolist() == [True, False]
    np.testing.assert_allclose(boxes, [[2, 2, 19, 18], [42, 44, 58, 56]])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("soft_threshold", 1.5, r"supervision\.soft_threshold: expected a number in \[0, 1\]"),
        ("soft_threshold", -0.2, r"supervision\.soft_threshold: expected a number in \[0, 1\]"),
        ("soft_rule", "before_clicks", r"supervision\.soft_rule: only with the soft switch"),
        ("hard_threshold", -1.0, r"supervision\.hard_threshold: expected null or a finite gain"),
        ("hard_threshold", float("inf"), r"supervision\.hard_threshold: expected null"),
        ("no_match", "ignore", r"supervision\.no_match: expected one of prior\|drop"),
        ("click_kind", "box", r"supervision\.click_kind: expected one of click\|center_click"),
        ("prior_box_px", 0, r"supervision\.prior_box_px: expected > 0"),
        ("hard_metric", "AP", r"supervision\.hard_metric: expected one of mAP"),
    ],
)
def test_bad_settings_are_one_line_errors(key, value, message):
    with pytest.raises(AlrunError, match=message):
        WeakPointRegime(**{key: value})


SMOKE = ["experiment=smoke", "quiet=true"]


def test_weak_point_round_trains_on_click_pseudo_boxes(tmp_path):
    cfg = compose_config([*SMOKE, "budget.rounds=1", "supervision=weak_point"])
    rows = run_experiment(cfg, tmp_path)
    boxes = rows[0]["boxes"]  # round 1 bought clicks only
    assert [(r["images"], r["boxes"]) for r in rows] == [(10, boxes), (20, boxes)]
    assert rows[1]["clicks"] > 0 and rows[0]["clicks"] == 0
    labelled = json.loads((tmp_path / "round_01/labelled.json").read_text())
    kinds = [im["label_kind"] for im in labelled["images"]]
    assert sorted(kinds) == ["box"] * 10 + ["center_click"] * 10
    record0 = json.loads((tmp_path / "round_00/supervision.json").read_text())
    # the initial set (boxes) and the clicks bought after round 0 are both recorded
    assert [e["requested"] for e in record0["labels"]] == ["box", "center_click"]
    assert record0["labels"][1]["received"] == {"center_click": 10}
    record1 = json.loads((tmp_path / "round_01/supervision.json").read_text())
    (pseudo,) = record1["pseudo_boxes"]
    assert pseudo["clicks"] == rows[1]["clicks"] == pseudo["matched"] + pseudo["prior"]
    assert pseudo["pseudo_boxes"] == pseudo["clicks"]  # no_match=prior keeps every click
    assert 0.0 <= pseudo["pseudo_precision"] <= 1.0
    train = json.loads((tmp_path / "round_01/metrics.json").read_text())["train"]
    assert train["weak/pseudo_boxes"] == pseudo["pseudo_boxes"]


@pytest.mark.integration
def test_hard_switch_end_to_end_requests_boxes_after_a_weak_round(tmp_path):
    # an unreachable threshold: the first weak round (round 1) switches, round 2 buys boxes
    cfg = compose_config([*SMOKE, "supervision=weak_point_hard", "supervision.hard_threshold=1e6"])
    rows = run_experiment(cfg, tmp_path)
    labelled = json.loads((tmp_path / "round_02/labelled.json").read_text())
    by_round = {}
    for im in labelled["images"]:
        by_round.setdefault(im["round"], set()).add(im["label_kind"])
    assert by_round == {0: {"box"}, 1: {"center_click"}, 2: {"box"}}
    decision = json.loads((tmp_path / "round_01/supervision.json").read_text())["labels"][0]
    assert decision["hard_switch"]["switched_at_round"] == 1
    assert decision["requested"] == "box"
    assert rows[2]["boxes"] > rows[1]["boxes"]


@pytest.mark.integration
def test_soft_switch_end_to_end_clicks_first_and_records_what_was_paid(tmp_path):
    """weak_point_soft (Desai's order): every selected image is clicked; the switched ones carry
    boxes priced clicks + boxes; the round's recorded cost is the sum of what was paid."""
    cfg = compose_config([*SMOKE, "budget.rounds=1", "supervision=weak_point_soft"])
    rows = run_experiment(cfg, tmp_path)
    entry = json.loads((tmp_path / "round_00/supervision.json").read_text())["labels"][1]
    soft = entry["soft_switch"]
    assert soft["rule"] == "after_clicks" and soft["boxes"] + soft["clicks"] == 10
    assert entry["cost_s"] == pytest.approx(sum(x["cost_s"] for x in soft["images"]))
    assert rows[1]["cost_s"] - rows[0]["cost_s"] == pytest.approx(entry["cost_s"])
    for image in soft["images"]:
        if image["kind"] == "box":  # boxes bought on top of the clicks
            assert image["confidence"] is not None and image["confidence"] < 0.5


@pytest.mark.integration
def test_cli_refuses_an_out_of_range_switch_threshold_in_one_line(tmp_path):
    from tests.test_cli import alrun, assert_clean_failure

    result = alrun(tmp_path, "supervision=weak_point_soft", "supervision.soft_threshold=1.5")
    assert_clean_failure(
        result, tmp_path, "alrun: error: supervision.soft_threshold: expected a number in [0, 1]"
    )
    assert result.stderr.strip().splitlines()[1:] == ["  see docs/supervision.md"]


def test_label_kinds_are_what_the_settings_can_ask_for():
    # all clicks from round 0 and no switch: an oracle restricted to center clicks is enough
    assert WeakPointRegime(initial_kind="center_click").label_kinds == ("center_click",)
    assert set(WeakPointRegime(initial_kind="center_click", soft_threshold=0.5).label_kinds) == {
        "box",
        "center_click",
    }
    assert set(WeakPointRegime(click_kind="click").label_kinds) == {"box", "click"}


def test_train_turns_clicks_into_nearest_predictions_priors_or_drops(monkeypatch):
    from alrun.data.dataset import DetectionDataset
    from alrun.pool import LabelPool
    from alrun.supervision import weak_point

    recs = (
        record("boxed", [[0, 0, 10, 20]], [0]),
        record("hit", [[0, 0, 20, 20], [40, 40, 60, 60]], [0, 1]),  # clicks (10,10), (50,50)
        record("miss", [[30, 30, 50, 50]], [1]),  # nothing predicted of class 1
    )
    from alrun.truth import HiddenTruth, TruthAudit

    truth = HiddenTruth(recs)  # the regime sees references; the audit measures its boxes
    pool = LabelPool(DetectionDataset("toy", ("a", "b"), recs), TruthAudit(truth))
    oracle = SimulatedOracle(CostModel())
    oracle.hold_truth(truth)
    pool.add(oracle.annotate(pool.records(["boxed"]), "box"), 0)
    pool.add(oracle.annotate(pool.records(["hit", "miss"]), "center_click"), 1)
    preds = {
        "hit": dets("hit", [[1, 1, 19, 19], [41, 40, 60, 61]], [0, 1], [0.9, 0.8]),
        "miss": dets("miss", [[30, 30, 50, 50]], [0], [0.9]),  # right place, wrong class
    }
    trained = {}

    def fake_train_round(
        detector, sources, schedule, seed, round_index, hooks=(), progress=None, strategy=None
    ):
        trained["images"] = {r.image_id: r for r in sources[0].dataset.images}
        return {"iterations": 1.0}

    monkeypatch.setattr(weak_point, "train_round", fake_train_round)
    stats = WeakPointRegime(prior_box_px=8).train(FixedDetector(preds), pool, None, 0, 1)
    images = trained["images"]
    assert sorted(images) == ["boxed", "hit", "miss"]
    np.testing.assert_allclose(images["hit"].boxes, [[1, 1, 19, 19], [41, 40, 60, 61]])
    # the class-1 prior is the default (no class-1 box bought yet): 8 x 8 on the click (40, 40)
    np.testing.assert_allclose(images["miss"].boxes, [[36, 36, 44, 44]])
    assert (stats["weak/clicks"], stats["weak/matched"], stats["weak/prior"]) == (3, 2, 1)
    assert stats["weak/pseudo_precision"] == pytest.approx(2 / 3)  # the prior box misses
    dropped = WeakPointRegime(no_match="drop").train(FixedDetector(preds), pool, None, 0, 1)
    assert sorted(trained["images"]) == ["boxed", "hit"]
    assert (dropped["weak/dropped_images"], dropped["weak/pseudo_boxes"]) == (1, 2)
    with pytest.raises(AlrunError, match=r"supervision\.no_match: 'drop' with initial_kind"):
        WeakPointRegime(no_match="drop", initial_kind="center_click")
