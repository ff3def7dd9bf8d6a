"""SSD post-processing. SSD's feature maps differ in width per level, so there is no fixed-size
box feature (``feats`` is None; ``needs.feats`` is refused by the adapter)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.ssd import SSD
from torchvision.ops import boxes as box_ops

from alrun.detectors.torchvision.probs import move_background_last


def ssd_detections(model: SSD, batch, levels: list[Tensor]) -> list[dict[str, Tensor]]:
    """SSD post-processing that keeps each box's softmax row (background moved last)."""
    head_outputs = model.head(levels)
    anchors = model.anchor_generator(batch, levels)
    probs_all = torch.softmax(head_outputs["cls_logits"], dim=-1)
    results = []
    for b, (regress, probs) in enumerate(zip(head_outputs["bbox_regression"], probs_all)):
        boxes = model.box_coder.decode_single(regress, anchors[b])
        boxes = box_ops.clip_boxes_to_image(boxes, batch.image_sizes[b])
        rows, labels, scores = [], [], []
        for label in range(1, probs.shape[1]):
            score = probs[:, label]
            idx = torch.where(score > model.score_thresh)[0]
            k = min(int(idx.numel()), model.topk_candidates)
            top, order = score[idx].topk(k)
            rows.append(idx[order])
            scores.append(top)
            labels.append(torch.full_like(top, label, dtype=torch.int64))
        row, label, score = torch.cat(rows), torch.cat(labels), torch.cat(scores)
        keep = box_ops.batched_nms(boxes[row], score, label, model.nms_thresh)
        keep = keep[: model.detections_per_img]
        dist = move_background_last(probs)
        results.append(
            {
                "boxes": boxes[row[keep]],
                "scores": score[keep],
                "labels": label[keep],
                "probs": dist[row[keep]],
                "class_probs": probs[row[keep]][:, 1:],
                "feats": None,
                "sources": row[keep],
            }
        )
    return results
