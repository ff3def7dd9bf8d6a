"""Pseudo-label self-training: precision on hand-made predictions, the online teacher hook, EMA,
bad thresholds, and one round end to end on the tiny detector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from alrun.data.dataset import ImageRecord
from alrun.engine import Batch, BatchSource, Step
from alrun.errors import AlrunError
from alrun.loop import build_experiment, run_experiment
from alrun.supervision.pseudo_label import (
    PseudoLabelHook,
    PseudoLabelSelfTraining,
    ema_update,
    teacher_targets,
)
from alrun.truth import HiddenTruth, TruthAudit, flip_boxes, true_positives
from tests.helpers import compose_config
from tests.supervision._cli import alrun_errors

T = torch.tensor


def test_true_positives_match_class_iou_and_each_object_once():
    gt_boxes, gt_labels = T([[0.0, 0, 10, 10], [20, 20, 30, 30]]), T([0, 1])
    boxes = T(
        [
            [0.0, 0, 10, 10],  # object 0, right class: hit
            [1.0, 0, 10, 10],  # object 0 again, lower score: a duplicate, not a hit
            [20.0, 20, 30, 30],  # object 1 but wrong class
            [20.0, 20, 24, 24],  # object 1, right class, IoU 0.16: miss
            [50.0, 50, 60, 60],  # nothing there
        ]
    )
    labels, scores = T([0, 0, 0, 1, 1]), T([0.9, 0.8, 0.95, 0.7, 0.6])
    assert true_positives(boxes, labels, scores, gt_boxes, gt_labels) == 1
    # the higher-scored duplicate claims the object, whichever comes first in the list
    assert true_positives(boxes[[1, 0]], labels[[1, 0]], T([0.9, 0.8]), gt_boxes, gt_labels) == 1
    assert true_positives(boxes[:1], labels[:1], scores[:1], gt_boxes[:0], gt_labels[:0]) == 0
    assert true_positives(boxes[3:4], labels[3:4], scores[3:4], gt_boxes, gt_labels, 0.1) == 1


def test_flip_boxes_mirrors_x():
    out = flip_boxes(np.array([[2.0, 1, 5, 4]], np.float32), 10)
    assert out.tolist() == [[5.0, 1, 8, 4]]


class FixedTeacher(nn.Module):
    """A 'teacher' whose post-processed detections are given (label_offset 1 in its output)."""

    def __init__(self, found):
        super().__init__()
        self.found = found

    def forward(self, images):
        return [self.found[i] for i in range(len(images))]


class RecordingDetector:
    label_offset = 1
    capabilities = frozenset({"teacher"})
    device = torch.device("cpu")

    def __init__(self):
        self.model = nn.Linear(1, 1)
        self.seen = []

    def teacher_module(self):
        return self.model

    def losses(self, images, targets):
        self.seen.append(targets)
        return {"cls": torch.tensor(2.0)}


def audit_of(truth):
    """The evaluator's audit over image id -> (boxes, labels) of hidden truth."""
    records = [ImageRecord(i, Path(f"{i}.png"), 60, 60, b, c) for i, (b, c) in truth.items()]
    return TruthAudit(HiddenTruth(records))


def test_hook_trains_on_boxes_above_the_threshold_and_measures_them():
    found = [
        {
            "boxes": T([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]),
            "labels": T([1, 2, 1]),  # head classes: dataset class + 1
            "scores": T([0.9, 0.6, 0.3]),
        },
        {"boxes": torch.zeros(0, 4), "labels": T([], dtype=torch.long), "scores": T([])},
    ]
    truth = audit_of(
        {
            "a": (np.array([[0, 0, 10, 10], [40, 40, 50, 50]], np.float32), np.array([0, 0])),
            "b": (np.array([[1, 1, 5, 5]], np.float32), np.array([1])),
        }
    )
    hook = PseudoLabelHook("u", 0.5, 0.25, FixedTeacher(found), audit=truth)
    detector = RecordingDetector()
    hook.before_training(detector, 1)
    images = [torch.zeros(3, 60, 60), torch.zeros(3, 60, 60)]
    batch = Batch(
        BatchSource("u", None, role="unlabelled"), images, None, ("a", "b"), (False, False)
    )
    losses = hook.extra_losses(Step(0, 1, 0.1, detector, {"u": batch}))
    assert float(losses["cls"]) == pytest.approx(0.5)  # 2.0 x weight 0.25
    (first,) = detector.seen[0]  # image "b" has no pseudo-box: skipped (empty=skip)
    assert first["boxes"].tolist() == [[0, 0, 10, 10], [20, 20, 30, 30]]  # 0.3 < 0.5 dropped
    assert first["labels"].tolist() == [0, 1]  # back to dataset classes
    hook.empty = "background"
    hook.extra_losses(Step(1, 2, 0.1, detector, {"u": batch}))
    assert len(detector.seen[1]) == 2 and len(detector.seen[1][1]["boxes"]) == 0
    hook.before_training(detector, 1)  # counts restart
    hook.extra_losses(Step(0, 1, 0.1, detector, {"u": batch}))
    stats = hook.after_training()
    assert stats["threshold"] == 0.5 and stats["boxes"] == 2 and stats["images"] == 2
    assert stats["precision"] == pytest.approx(0.5)  # [0,0,10,10] class 0 right; class 1 box wrong
    assert stats["recall"] == pytest.approx(1 / 3)  # 3 hidden objects, 1 found


def test_hook_flips_the_hidden_truth_of_flipped_images():
    found = [{"boxes": T([[50.0, 0, 60, 10]]), "labels": T([1]), "scores": T([0.9])}]
    truth = audit_of({"a": (np.array([[0, 0, 10, 10]], np.float32), np.array([0]))})
    hook = PseudoLabelHook("u", 0.5, 1.0, FixedTeacher(found), audit=truth)
    detector = RecordingDetector()
    hook.before_training(detector, 1)
    batch = Batch(BatchSource("u", None, role="unlabelled"), [torch.zeros(3, 60, 60)], None,
                  ("a",), (True,))  # fmt: skip
    hook.extra_losses(Step(0, 1, 0.1, detector, {"u": batch}))
    assert hook.after_training()["precision"] == 1.0


def test_teacher_targets_threshold_label_offset_and_no_zero_size_boxes():
    found = [{"boxes": T([[0.0, 0, 4, 4], [1, 1, 3, 3], [5, 5, 5, 7]]), "labels": T([3, 2, 1]),
              "scores": T([0.5, 0.49, 0.9])}]  # fmt: skip
    (out,) = teacher_targets(FixedTeacher(found), [torch.zeros(3, 8, 8)], 0.5, label_offset=1)
    assert out["labels"].tolist() == [2] and out["boxes"].tolist() == [[0, 0, 4, 4]]


def test_ema_update_moves_the_teacher_toward_the_student():
    teacher, student = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.fill_(0.0)
        student.weight.fill_(1.0)
    student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.9)
    assert teacher.weight.tolist() == pytest.approx([0.1, 0.1])
    assert int(teacher.num_batches_tracked) == 7


@pytest.mark.parametrize("bad", [1.5, -0.1, "high"])
def test_threshold_outside_unit_interval_is_refused(bad):
    with pytest.raises(AlrunError, match=r"^supervision\.threshold: expected a number in \[0, 1\]"):
        PseudoLabelSelfTraining(threshold=bad)
    with pytest.raises(AlrunError, match="supervision.teacher"):
        PseudoLabelSelfTraining(teacher="student")
    with pytest.raises(AlrunError, match="supervision.empty"):
        PseudoLabelSelfTraining(empty="ignore")


@pytest.mark.integration
def test_cli_bad_threshold_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    code, errors = alrun_errors(
        "experiment=smoke", "supervision=pseudo_label", "supervision.threshold=1.5",
        f"hydra.run.dir={out}",
    )  # fmt: skip
    assert code == 2
    assert errors == ["alrun: error: supervision.threshold: expected a number in [0, 1], got 1.5"]
    assert not (out / "state.json").exists() and not list(out.glob("round_*"))


SMOKE = ["experiment=smoke", "quiet=true", "budget.rounds=1", "supervision=pseudo_label"]


@pytest.mark.parametrize(
    "init", [pytest.param("continue", marks=pytest.mark.integration), "scratch"]
)
def test_one_round_end_to_end_records_the_pseudo_labels(tmp_path, init):
    cfg = compose_config([*SMOKE, "supervision.threshold=0.1", f"trainer.init={init}"])
    rows = run_experiment(cfg, tmp_path)
    assert [r["images"] for r in rows] == [10, 20]
    for r in (0, 1):
        train = json.loads((tmp_path / f"round_0{r}/metrics.json").read_text())["train"]
        assert train["pseudo/threshold"] == 0.1 and train["pseudo/has_teacher"] == 1.0
        assert train["pseudo/images"] >= train["iterations"]  # an unlabelled batch every step
        if train["pseudo/boxes"]:
            assert 0.0 <= train["pseudo/precision"] <= 1.0
    assert train["pseudo/boxes"] > 0  # round 1's EMA teacher is sure of something at 0.1


@pytest.mark.integration
def test_previous_round_teacher_has_none_in_round_zero(tmp_path):
    cfg = compose_config([*SMOKE, "supervision.teacher=previous_round", "trainer.init=scratch",
                          "supervision.threshold=0.0"])  # fmt: skip
    run_experiment(cfg, tmp_path)
    trains = [json.loads((tmp_path / f"round_0{r}/metrics.json").read_text())["train"]
              for r in (0, 1)]  # fmt: skip
    assert [t["pseudo/has_teacher"] for t in trains] == [0.0, 1.0]
    assert trains[0]["pseudo/boxes"] == 0 and trains[1]["pseudo/boxes"] > 0


@pytest.mark.parametrize(
    "regime",
    [
        ["supervision=pseudo_label"],
        ["supervision=consistency"],
        ["supervision=synthetic_pretrain"],
        ["experiment=uda_synthetic", "supervision.source.num_pool=8",
         "dataset.max_pool_images=20", "dataset.max_test_images=5"],
    ],
)  # fmt: skip
def test_regimes_compose_with_every_strategy(regime):
    for strategy in ("random", "entropy", "margin", "least_confidence"):
        smoke = [] if regime[0].startswith("experiment=") else ["experiment=smoke"]
        exp = build_experiment(compose_config([*smoke, *regime, f"strategy={strategy}"]))
        assert exp.strategy.name == strategy and exp.regime.label_kinds == ("box",)
