"""Parity with BLAD's WhiteBoxQBC (github.com/lyumengyao/blad, ``acdet/apis/test.py``
``single_gpu_test_wbqbc`` and its ``bbox_overlaps``).

:func:`_reference` transcribes BLAD's loop on numpy arrays (one list of (n, 5) boxes+score
arrays per class, one array per member), as the reference computes it; the hand-worked case
checks both against numbers worked out on paper.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alrun.acquisition.context import PredictionBatch
from alrun.acquisition.qbc import CommitteeDisagreement, committee_disagreement
from alrun.cli import user_error
from alrun.errors import AlrunError
from alrun.loop import build_experiment, run_experiment
from alrun.types import Detections
from tests.helpers import compose_config


def _bbox_overlaps(b1, b2, eps=1e-6):
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    lt = np.maximum(b1[:, None, :2], b2[None, :, :2])
    rb = np.minimum(b1[:, None, 2:], b2[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    overlap = wh[..., 0] * wh[..., 1]
    return overlap / np.maximum(area1[:, None] + area2[None, :] - overlap, eps)


def _reference(results_classes):
    """BLAD single_gpu_test_wbqbc, one image: results_classes[c][m] is member m's (n, 5)."""
    num_classes = len(results_classes)
    confs, margins = np.zeros(num_classes), np.zeros(num_classes)
    for class_i, class_results in enumerate(results_classes):
        total_boxes = np.concatenate(class_results, 0)
        if total_boxes.shape[0] == 0:
            continue
        cls_box_confs = total_boxes[:, -1]
        cls_box_margins = []
        for member_i, det_boxes in enumerate(class_results):
            for det_box in det_boxes:
                score = det_box[-1]
                if score <= 0.1 or score >= 0.9:
                    continue
                aux_boxes = np.vstack(class_results[:member_i] + class_results[member_i + 1 :])
                if aux_boxes.shape[0]:
                    overlaps = _bbox_overlaps(aux_boxes[:, :4], det_box[None, :4])
                    aux_boxes = aux_boxes[overlaps.squeeze(1) > 0.3]
                second = 0 if aux_boxes.shape[0] == 0 else np.max(aux_boxes[:, -1])
                cls_box_margins.append(np.abs(score - second))
        margins[class_i] = sum(cls_box_margins) / total_boxes.shape[0]
        confs[class_i] = np.max(cls_box_confs)
    return float(np.sum(confs * margins / np.sum(confs)))


def _split(results_classes):
    """BLAD's per-class arrays as alrun's per-member (boxes, scores, labels)."""
    members = len(results_classes[0])
    out = []
    for m in range(members):
        rows = [(r, c) for c, per in enumerate(results_classes) for r in per[m]]
        boxes = torch.tensor(np.array([r[:4] for r, _ in rows]), dtype=torch.float64).reshape(-1, 4)
        scores = torch.tensor([r[4] for r, _ in rows], dtype=torch.float64)
        labels = torch.tensor([c for _, c in rows], dtype=torch.int64)
        out.append((boxes, scores, labels))
    return out


def _alrun(results_classes):
    parts = _split(results_classes)
    return committee_disagreement([p[0] for p in parts], [p[1] for p in parts],
                                  [p[2] for p in parts])  # fmt: skip


def _arr(*rows):
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def test_hand_worked_two_members_two_classes():
    # class 0: member 0 box A (0.8), member 1 box A' (IoU 0.81 with A, 0.5) and a far box (0.95)
    # class 1: member 0 only, one box 0.4 (no rival: margin 0.4)
    a, a2 = [0, 0, 10, 10, 0.8], [0, 0, 10, 8.1, 0.5]
    far = [50, 50, 60, 60, 0.95]
    results = [[_arr(a), _arr(a2, far)], [_arr([20, 20, 30, 30, 0.4]), _arr()]]
    # class 0: margins |0.8-0.5| + |0.5-0.8| (0.95 >= 0.9 skipped) = 0.6 over 3 boxes = 0.2,
    # conf 0.95; class 1: 0.4 / 1, conf 0.4 -> (0.95 * 0.2 + 0.4 * 0.4) / 1.35
    expected = (0.95 * 0.2 + 0.4 * 0.4) / 1.35
    assert _reference(results) == pytest.approx(expected)
    assert _alrun(results) == pytest.approx(expected)


def test_overlap_is_strict_and_a_boxs_own_member_never_rivals():
    # IoU exactly 0.3 is not a rival (BLAD: overlaps > 0.3); member 0's second box overlaps its
    # first, but only other members count
    results = [[_arr([0, 0, 10, 10, 0.6], [0, 0, 10, 9, 0.7]), _arr([0, 0, 10, 3, 0.2])]]
    assert _alrun(results) == pytest.approx(_reference(results))
    # 0.6: no rival (IoU 0.3); 0.7 vs 0.2 (IoU 1/3) and 0.2 vs 0.7: margins 0.5 each
    assert _alrun(results) == pytest.approx((0.6 + 0.5 + 0.5) / 3)


@pytest.mark.parametrize("seed", range(20))
def test_random_committees_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    members, classes = int(rng.integers(2, 5)), int(rng.integers(1, 4))
    results = []
    for _ in range(classes):
        per = []
        for _ in range(members):
            n = int(rng.integers(0, 5))
            xy = rng.uniform(0, 40, (n, 2))
            wh = rng.uniform(4, 20, (n, 2))
            per.append(np.concatenate([xy, xy + wh, rng.uniform(0.05, 1.0, (n, 1))], 1))
        results.append(per)
    if sum(len(b) for per in results for b in per) == 0:
        assert _alrun(results) is None
        return
    assert _alrun(results) == pytest.approx(_reference(results), abs=1e-12)


def test_scorer_reads_the_members_passes_and_applies_empty():
    def det(image_id, rows, labels):
        boxes = torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4)
        scores = torch.tensor([r[4] for r in rows], dtype=torch.float32)
        k = len(rows)
        return Detections(image_id, boxes, scores, torch.tensor(labels, dtype=torch.int64),
                          probs=torch.full((k, 2), 0.5))  # fmt: skip

    m0 = [det("a", [[0, 0, 10, 10, 0.8]], [0]), det("b", [], [])]
    m1 = [det("a", [[0, 0, 10, 8.1, 0.5], [0, 0, 10, 10, 0.03]], [0, 0]), det("b", [], [])]
    preds = [
        Detections(d.image_id, d.boxes, d.scores, d.labels, probs=d.probs, passes=(d, e))
        for d, e in zip(m0, m1)
    ]
    batch = PredictionBatch.from_detections(preds)
    scorer = CommitteeDisagreement(members=2)
    scores = scorer.batch_scores(batch)
    # the 0.03 box is below score_threshold 0.05: class 0 has 2 boxes, margins 0.3 + 0.3
    assert scores[0] == pytest.approx(0.3) and scores[1] == float("-inf")
    assert CommitteeDisagreement(members=2, empty="skip").batch_scores(batch)[1] is None
    assert scorer.needs.ensemble == 2 and scorer.needs.passes == 2
    with pytest.raises(AlrunError, match="^strategy.scorer.members: a committee needs >= 2"):
        CommitteeDisagreement(members=1)


SMOKE = ["experiment=smoke", "quiet=true"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["strategy.scorer.members=1"], "strategy.scorer.members: expected an integer >= 2"),
        (["strategy.scorer.low=0.9", "strategy.scorer.high=0.5"], "strategy.scorer.low"),
        (["strategy.scorer.overlap=1.5"], "strategy.scorer.overlap"),
    ],
)
def test_bad_committee_is_one_line_naming_the_key(overrides, needle):
    with pytest.raises(Exception) as err:
        build_experiment(compose_config([*SMOKE, "strategy=qbc", *overrides]))
    message = user_error(err.value)
    assert message is not None and needle in message and "\n" not in message, message


@pytest.mark.integration
def test_one_qbc_round_on_the_smoke_experiment(tmp_path):
    torch.set_num_threads(1)
    overrides = ["strategy=qbc", "strategy.scorer.members=2", "budget.rounds=1"]
    rows = run_experiment(compose_config(SMOKE + overrides), tmp_path)
    assert [r["round"] for r in rows] == [0, 1]
    selection = json.loads((tmp_path / "round_00" / "selection.json").read_text())
    assert selection["strategy"] == "qbc" and selection["scorer"] == "committee_disagreement"
    assert selection["members"] == 2 and len(selection["selected"]) == 10
    scores = [s["score"] for s in selection["selected"]]
    assert scores == sorted(scores, reverse=True)
    checkpoint = torch.load(tmp_path / "round_01" / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("member1.") for k in checkpoint)
