"""Image-level labels: present classes only; pseudo-boxes restricted to them."""

from __future__ import annotations

import json

import pytest

from alrun.errors import AlrunError
from alrun.loop import run_experiment
from alrun.supervision.image_level import ImageLevelRegime
from tests.helpers import compose_config


def test_image_level_round_end_to_end(tmp_path):
    overrides = ["experiment=smoke", "quiet=true", "budget.rounds=1", "supervision=image_level"]
    rows = run_experiment(compose_config(overrides), tmp_path)
    labelled = json.loads((tmp_path / "round_01/labelled.json").read_text())
    bought = [im for im in labelled["images"] if im["round"] == 1]
    assert len(bought) == 10 and {im["label_kind"] for im in bought} == {"image_label"}
    assert all("image_classes" in im and not im.get("boxes") for im in bought)
    # 1 s per class present (an empty image: one "nothing here" answer)
    spent = sum(max(len(im["image_classes"]), 1) for im in bought)
    assert rows[1]["cost_s"] - rows[0]["cost_s"] == pytest.approx(spent * 1.0)
    (pseudo,) = json.loads((tmp_path / "round_01/supervision.json").read_text())["pseudo_boxes"]
    assert pseudo["images"] + pseudo["dropped_images"] == 10
    train = json.loads((tmp_path / "round_01/metrics.json").read_text())["train"]
    assert train["image_level/images"] == pseudo["images"]


def test_bad_settings_are_one_line_errors():
    with pytest.raises(AlrunError, match=r"supervision\.min_score: expected a number in \[0, 1\]"):
        ImageLevelRegime(min_score=1.2)
    with pytest.raises(AlrunError, match=r"supervision\.initial_kind: expected one of box"):
        ImageLevelRegime(initial_kind="click")
