"""Parity with BLAD's ComPAS (github.com/lyumengyao/blad): ``ComPASMiningAlgorithm.value`` and
``ComPASMiningAlgorithm.mining`` (``acdet/mining/methods/compas_mining_algorithm.py``, with
mmdet 2.x's ``MaxIoUAssigner``), ``MixedTeacher.merge_gt_pseudo`` and the relative box spread of
``MixedTeacher.compute_uncertainty_with_aug`` (``acdet/models/mixed_teacher.py``).

Each ``_ref_*`` transcribes the reference on numpy / torch as it computes it; the inputs are
small and hand-made, and avoid the one case where alrun deviates on purpose (a query over 0.25
IoU with two objects: BLAD's assigner keeps the last, alrun the most overlapping one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alrun.acquisition.compas import BoxCandidates, box_disagreement, compas_values, plan_queries
from alrun.regions import answer_regions, query_charges
from alrun.supervision.box_level import merge_answers_and_pseudo

WEIGHT = {"score_cls": 1, "score_run": 0, "score_reg": 1}  # ComPASMiningAlgorithm.__init__


def _ref_value(data, scale_factors=None):
    """ComPASMiningAlgorithm.value."""
    if not data["bbox"]:
        return np.inf
    vs, ws = [], []
    for k, v in data.items():
        if k.startswith("score_"):
            w = WEIGHT[k]
            if w > 0:
                if scale_factors is not None:
                    v = (v - scale_factors[k][0]) / scale_factors[k][1]
                vs.append(v)
                ws.append(w)
    if np.isnan(np.array(vs)).any():
        return np.inf
    return np.nanprod(np.array(vs) * np.array(ws))


def _ref_scores(pred_data):
    """The scale factors and box scores of ComPASMiningAlgorithm.mining."""
    keys = [k for k in pred_data[0] if k.startswith("score_")]
    d = {k: [dic[k] for dic in pred_data] for k in keys}
    scale = {k: [np.nanmin(v), np.nanmax(v) - np.nanmin(v)] for k, v in d.items()}
    return np.array([_ref_value(p, scale) for p in pred_data])


def _iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _xyxy(xywh):
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def _ref_max_iou_assign(pred_xyxy, gt_xyxy, thr=0.25):
    """mmdet 2.x MaxIoUAssigner(pos=neg=min_pos=thr, gt_max_assign_all=False), gt_inds - 1."""
    overlaps = _iou(gt_xyxy, pred_xyxy)  # (num_gts, num_bboxes)
    assigned = np.full(pred_xyxy.shape[0], -1)
    max_ov, argmax_ov = overlaps.max(axis=0), overlaps.argmax(axis=0)
    gt_max_ov, gt_argmax_ov = overlaps.max(axis=1), overlaps.argmax(axis=1)
    assigned[(max_ov >= 0) & (max_ov < thr)] = 0
    pos = max_ov >= thr
    assigned[pos] = argmax_ov[pos] + 1
    for i in range(len(gt_xyxy)):
        if gt_max_ov[i] >= thr:
            assigned[gt_argmax_ov[i]] = i + 1
    return assigned - 1


def _ref_mining(pred_data, gts, budget):
    """ComPASMiningAlgorithm.mining: {image: labelled flags}, in the order GTs were labelled."""
    labelled = {img: np.zeros(len(g), bool) for img, g in gts.items()}
    order = []
    box_scores = _ref_scores(pred_data)
    to_select = int(budget)
    for idx in np.argsort(box_scores)[::-1]:
        if to_select <= 0:
            break
        preds = pred_data[idx]
        img = preds["image_id"]
        if len(gts[img]) == 0 or np.isinf(box_scores[idx]):
            continue
        tmp = _ref_max_iou_assign(_xyxy(np.array([preds["bbox"]])), _xyxy(gts[img]))
        if not (tmp >= 0).any():
            continue
        for m in tmp:
            if labelled[img][m]:
                continue
            labelled[img][m] = True
            order.append((img, int(m)))
            to_select -= 1
    return labelled, order


# three images' objects (xywh, as BLAD's COCO annotations) and predicted boxes with scores
GTS = {
    "a": np.array([[0.0, 0, 10, 10], [30, 30, 10, 10]]),
    "b": np.array([[0.0, 0, 20, 20]]),
    "c": np.array([[50.0, 50, 10, 10], [0, 0, 8, 8]]),
}
PREDS = [  # image, bbox xywh, class, score_cls, score_reg
    ("a", [1.0, 1, 10, 10], 0, 0.9, 0.05),  # object a0
    ("a", [0.0, 0, 9, 9], 1, 0.7, 0.08),  # object a0 again: wasted (already labelled)
    ("a", [31.0, 31, 9, 9], 0, 0.2, 0.01),  # object a1, low value
    ("b", [2.0, 2, 18, 18], 0, 0.8, 0.07),  # object b0
    ("b", [60.0, 60, 10, 10], 0, 0.95, 0.09),  # nothing there: free, skipped
    ("c", [50.0, 50, 10, 10], 1, np.nan, 0.02),  # NaN score: never asked (inf)
    ("c", [0.0, 0, 7, 7], 0, 0.5, 0.06),  # object c1
    ("c", [49.0, 49, 10, 12], 0, 0.4, 0.04),  # object c0
]


def _pred_data():
    return [
        {"image_id": i, "bbox": b, "category_id": c, "score": 0.9, "score_cls": s, "score_reg": r}
        for i, b, c, s, r in PREDS
    ]


def _candidates():
    ids = ("a", "b", "c")
    boxes = _xyxy(np.array([p[1] for p in PREDS])).astype(np.float32)
    value = compas_values(
        {"score_cls": np.array([p[3] for p in PREDS]), "score_reg": np.array([p[4] for p in PREDS])}
    )
    return BoxCandidates(
        ids,
        np.array([ids.index(p[0]) for p in PREDS]),
        boxes,
        np.array([p[2] for p in PREDS]),
        value,
    )


def test_value_matches_blad_compas_value():
    """lyumengyao/blad ComPASMiningAlgorithm.value with mining's pool-wide min-max scale."""
    ref = _ref_scores(_pred_data())
    ours = _candidates().value
    assert np.isinf(ref[5]) and np.isinf(ours[5])
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


@pytest.mark.parametrize("budget", [1, 2, 3, 4, 10])
def test_greedy_box_queries_match_blad_compas_mining(budget):
    """lyumengyao/blad ComPASMiningAlgorithm.mining: the objects labelled for a box budget."""
    ref_labelled, ref_order = _ref_mining(_pred_data(), GTS, budget)

    def charges(image_id, boxes, labels):
        truth = _xyxy(GTS[image_id])
        return query_charges(answer_regions(boxes, labels, truth, np.zeros(len(truth))), "boxes")

    planned = plan_queries(_candidates(), charges, budget)
    ours = {img: np.zeros(len(g), bool) for img, g in GTS.items()}
    for img, (boxes, labels) in planned.items():
        found = answer_regions(boxes, labels, _xyxy(GTS[img]), np.zeros(len(GTS[img])))
        ours[img][found.answers[found.answers >= 0]] = True
    assert {k: v.tolist() for k, v in ours.items()} == {
        k: v.tolist() for k, v in ref_labelled.items()
    }
    assert sum(v.sum() for v in ours.values()) == len(ref_order) == min(budget, 5)


def _ref_merge_gt_pseudo(gt_bbox, gt_label, pseudo_bbox, pseudo_label, thresh):
    """MixedTeacher.merge_gt_pseudo for one image (pseudo boxes without score columns)."""
    ix1 = torch.max(gt_bbox[:, None, 0], pseudo_bbox[None, :, 0])
    iy1 = torch.max(gt_bbox[:, None, 1], pseudo_bbox[None, :, 1])
    ix2 = torch.min(gt_bbox[:, None, 2], pseudo_bbox[None, :, 2])
    iy2 = torch.min(gt_bbox[:, None, 3], pseudo_bbox[None, :, 3])
    inter = (ix2 - ix1).clamp(min=0) * (iy2 - iy1).clamp(min=0)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    overlaps = inter / (area(gt_bbox)[:, None] + area(pseudo_bbox)[None, :] - inter)
    unlabel_idxs = torch.sum(overlaps > thresh, 0) == 0
    return (
        torch.cat([gt_bbox, pseudo_bbox[unlabel_idxs]]),
        torch.cat([gt_label, pseudo_label[unlabel_idxs]]),
    )


def test_merge_matches_blad_merge_gt_pseudo():
    """lyumengyao/blad MixedTeacher.merge_gt_pseudo (partial_boxmerge_iou_thresh 0.4)."""
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    gt_label = torch.tensor([1, 0])
    pseudo = torch.tensor(
        [[1.0, 1, 10, 10], [0, 0, 10, 16], [40, 40, 50, 50], [20, 25, 30, 35], [0, 0, 4, 4]]
    )  # IoU with gt0: 0.81, 0.625, 0, 0, 0.16; with gt1: 0, 0, 0, 0.33, 0
    pseudo_label = torch.tensor([1, 2, 3, 0, 1])
    ref = _ref_merge_gt_pseudo(gt, gt_label, pseudo, pseudo_label, 0.4)
    ours = merge_answers_and_pseudo(gt, gt_label, pseudo, pseudo_label, 0.4)
    assert ours[0].tolist() == ref[0].tolist() and ours[1].tolist() == ref[1].tolist()
    assert ours[1].tolist() == [1, 0, 3, 0, 1]


def _ref_relative_spread(bboxes):
    """MixedTeacher.compute_uncertainty_with_aug on (times, n, 4) boxes, then score_reg's
    ``un_reg_t.mean(dim=1)`` (compute_active_scores)."""
    box_unc = bboxes.std(dim=0)
    mean = bboxes.mean(dim=0)
    wh = (mean[:, 2:4] - mean[:, :2]).clamp(min=1.0)
    box_unc = box_unc / wh[:, None, :].expand(-1, 2, 2).reshape(-1, 4)
    return box_unc.mean(dim=1)


def test_localisation_spread_matches_blad_relative_std():
    """lyumengyao/blad MixedTeacher.compute_uncertainty_with_aug: std / (w, h, w, h)."""
    teacher = torch.tensor([[10.0, 10, 30, 40], [50, 50, 60, 58]], dtype=torch.float64)
    views = [
        torch.tensor([[11.0, 9, 31, 42], [50, 51, 61, 58]], dtype=torch.float64),
        torch.tensor([[9.0, 10, 28, 39], [49, 50, 60, 59]], dtype=torch.float64),
        torch.tensor([[10.0, 12, 30, 41], [51, 49, 59, 57]], dtype=torch.float64),
    ]
    probs = [torch.full((2, 3), 1 / 3, dtype=torch.float64)] * 3
    _, reg = box_disagreement(teacher, torch.tensor([0, 1]), views, probs)
    ref = _ref_relative_spread(torch.stack([teacher, *views]))
    torch.testing.assert_close(reg, ref)
