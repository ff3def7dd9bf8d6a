"""COCO evaluation (pycocotools) of detections against a dataset's ground truth."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from alrun.data.dataset import DetectionDataset
from alrun.types import Detections


def _coco_ground_truth(dataset: DetectionDataset) -> COCO:
    images, annotations = [], []
    for idx, rec in enumerate(dataset.images, start=1):
        images.append({"id": idx, "width": rec.width, "height": rec.height})
        for box, label in zip(rec.boxes.tolist(), rec.labels.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": idx,
                    "category_id": int(label) + 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(dataset.classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def evaluate(dataset: DetectionDataset, detections: Sequence[Detections]) -> dict[str, float]:
    """COCO mAP@[.5:.95], mAP50, mAP75, mAR@100 and per-size mAP; -1 where COCO gives -1."""
    gt = _coco_ground_truth(dataset)
    coco_id = {rec.image_id: i for i, rec in enumerate(dataset.images, start=1)}
    rows = []
    for det in detections:
        boxes = det.boxes.numpy()
        for box, score, label in zip(boxes, det.scores.tolist(), det.labels.tolist()):
            rows.append(
                [
                    coco_id[det.image_id],
                    box[0],
                    box[1],
                    box[2] - box[0],
                    box[3] - box[1],
                    score,
                    label + 1,
                ]
            )
    keys = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large")
    if not rows:
        return {**{k: 0.0 for k in keys}, "mAR": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(np.asarray(rows, dtype=np.float64))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats
    out = {k: float(stats[i]) for i, k in enumerate(keys)}
    out["mAR"] = float(stats[8])  # AR@100, all areas
    return out


def failure_modes(
    dataset: DetectionDataset, detections: Sequence[Detections], score_threshold: float = 0.5
) -> dict[str, int]:
    """Count why detections fail (a simplified TIDE, Bolya et al. 2020), confident boxes only.

    Each detection with score >= ``score_threshold``, in descending score order, is a true
    positive (same class, IoU >= 0.5 with an unmatched ground truth), ``poor_loc`` (same class,
    0.1 <= IoU < 0.5), ``wrong_class`` (another class, IoU >= 0.5) or ``fp`` (background or a
    duplicate). Ground truth that no detection matched or came near (neither a true positive
    nor the target of a ``poor_loc``/``wrong_class`` error) is ``missed``, as in TIDE.
    """
    import torch
    from torchvision.ops import box_iou

    records = dataset.by_id()
    counts = {"fp": 0, "missed": 0, "wrong_class": 0, "poor_loc": 0}
    for det in detections:
        rec = records[det.image_id]
        gt_boxes = torch.as_tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)
        gt_labels = torch.as_tensor(rec.labels, dtype=torch.int64)
        matched = torch.zeros(len(gt_labels), dtype=torch.bool)
        explained = torch.zeros(len(gt_labels), dtype=torch.bool)
        keep = det.scores >= score_threshold
        boxes, labels = det.boxes[keep], det.labels[keep]
        order = det.scores[keep].argsort(descending=True)
        ious = box_iou(boxes, gt_boxes) if len(gt_labels) else torch.zeros((len(boxes), 0))
        for i in order.tolist():
            same = gt_labels == labels[i]
            iou_same = torch.where(same & ~matched, ious[i], torch.zeros_like(ious[i]))
            if iou_same.numel() and iou_same.max() >= 0.5:
                matched[iou_same.argmax()] = True
                continue
            any_same = torch.where(same, ious[i], torch.zeros_like(ious[i]))
            other = torch.where(~same, ious[i], torch.zeros_like(ious[i]))
            if any_same.numel() and 0.1 <= any_same.max() < 0.5:
                counts["poor_loc"] += 1
                explained[any_same.argmax()] = True
            elif other.numel() and other.max() >= 0.5:
                counts["wrong_class"] += 1
                explained[other.argmax()] = True
            else:
                counts["fp"] += 1
        counts["missed"] += int((~(matched | explained)).sum())
    return counts
