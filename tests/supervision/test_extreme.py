"""Extreme clicking: tight boxes from four points, priced per object, noisy by config."""

from __future__ import annotations

import json

import pytest

from alrun.loop import run_experiment
from alrun.supervision.base import LabelRequest
from alrun.supervision.extreme import ExtremeRegime
from tests.helpers import compose_config

SMOKE = ["experiment=smoke", "quiet=true", "budget.rounds=1", "supervision=extreme"]


def test_extreme_round_trains_on_the_point_boxes_and_records_their_quality(tmp_path):
    assert ExtremeRegime().label_kind(LabelRequest(0)) == "extreme"
    rows = run_experiment(compose_config([*SMOKE, "oracle.extreme_jitter_px=1.5"]), tmp_path)
    assert [r["images"] for r in rows] == [10, 20]
    assert rows[1]["cost_s"] == pytest.approx(7.0 * rows[1]["boxes"])  # 7 s per object
    labelled = json.loads((tmp_path / "round_01/labelled.json").read_text())
    assert {im["label_kind"] for im in labelled["images"]} == {"extreme"}
    points = [p for im in labelled["images"] for p in im["extreme_points"]]
    assert len(points) == rows[1]["boxes"] and {len(p) for p in points} == {4}
    (initial, bought) = json.loads((tmp_path / "round_00/supervision.json").read_text())["labels"]
    assert initial["box_precision"] is not None and bought["jitter_px"] == 1.5
    # jitter moves the boxes off the truth: not free full supervision
    assert 0.5 < bought["box_mean_iou"] < 1.0


def test_without_jitter_the_boxes_are_the_ground_truth(tmp_path):
    run_experiment(
        compose_config([*SMOKE, "budget.rounds=0", "oracle.extreme_jitter_px=0"]), tmp_path
    )
    (initial,) = json.loads((tmp_path / "round_00/supervision.json").read_text())["labels"]
    assert initial["box_precision"] == initial["box_recall"] == pytest.approx(1.0)
    assert initial["box_mean_iou"] == pytest.approx(1.0, abs=1e-6)
