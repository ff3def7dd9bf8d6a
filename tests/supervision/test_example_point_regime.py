"""Seam example (docs/extending.md): clicks -> pseudo-boxes + an extra loss via an engine hook."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from alrun.data.dataset import DetectionDataset
from alrun.engine import BatchSource, TrainingHook, train_round
from alrun.loop import run_experiment
from alrun.supervision.base import BaseRegime
from tests.helpers import compose_config


class L2Hook(TrainingHook):
    """An extra loss: a small L2 penalty on every weight, counted per iteration."""

    name = "l2"

    def __init__(self):
        self.calls = 0

    def extra_losses(self, step):
        self.calls += 1
        return {"weights": 1e-5 * sum(p.pow(2).sum() for p in step.detector.parameters())}

    def after_training(self):
        return {"calls": self.calls}


class ClickRegime(BaseRegime):
    label_kinds = ("center_click",)

    def __init__(self, box_px: float = 16.0):
        self.box_px = box_px

    def train(self, detector, pool, schedule, seed, round_index, progress=None, strategy=None):
        records = []
        for rec in pool.labelled_set().images:
            lab, half = pool.labels[rec.image_id], self.box_px / 2
            boxes = np.concatenate([lab.points - half, lab.points + half], axis=1)
            boxes = boxes.clip(0, [rec.width, rec.height] * 2).astype(np.float32)
            records.append(replace(rec, boxes=boxes, labels=lab.labels))
        pseudo = DetectionDataset("clicks", pool.dataset.classes, tuple(records))
        source = BatchSource("clicks", pseudo, role="pseudo")
        hooks = [L2Hook()]
        return train_round(
            detector, [source], schedule, seed, round_index, hooks, progress, strategy
        )


def test_click_regime_trains_from_pseudo_boxes_with_an_extra_loss(tmp_path):
    overrides = ["experiment=smoke", "quiet=true", "budget.rounds=1"]
    cfg = compose_config([*overrides, f"supervision._target_={__name__}.ClickRegime"])
    rows = run_experiment(cfg, tmp_path)
    assert [(r["images"], r["boxes"]) for r in rows] == [(10, 0), (20, 0)]
    assert rows[1]["cost_s"] == pytest.approx(1.87 * rows[1]["clicks"])  # billed as clicks
    labelled = json.loads((tmp_path / "round_01/labelled.json").read_text())
    assert {im["label_kind"] for im in labelled["images"]} == {"center_click"}
    assert sum(len(im["points"]) for im in labelled["images"]) == rows[1]["clicks"]
    train = json.loads((tmp_path / "round_01/metrics.json").read_text())["train"]
    assert train["l2/calls"] == train["iterations"] == 5
