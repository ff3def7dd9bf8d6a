"""Faster R-CNN post-processing that keeps each box's softmax row (background moved last), its
box-head feature and the RPN proposal it was regressed from; and one MC-dropout pass of the box
predictor read at the reference boxes' proposals."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.ops import boxes as box_ops

from alrun.detectors.torchvision.probs import move_background_last


def two_stage_features(
    model: FasterRCNN, batch, features: dict[str, Tensor]
) -> tuple[list[Tensor], Tensor]:
    """RPN proposals and their box-head features (what MC-dropout passes reuse)."""
    proposals, _ = model.rpn(batch, features)
    heads = model.roi_heads
    return proposals, heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))


def two_stage_at_sources(
    model: FasterRCNN,
    batch,
    proposals: list[Tensor],
    box_feats: Tensor,
    found: list[dict[str, Tensor]],
) -> list[dict[str, Tensor]]:
    """One MC-dropout pass of the box predictor, read at the reference boxes' proposals (row i
    of the pass = row i of the reference: same proposal, same class)."""
    heads = model.roi_heads
    class_logits, box_regression = heads.box_predictor(box_feats)
    decoded = heads.box_coder.decode(box_regression, proposals)  # (sum N, C+1, 4)
    counts = [len(p) for p in proposals]
    results = []
    for b, (boxes, logits, ref) in enumerate(
        zip(decoded.split(counts), class_logits.split(counts), found)
    ):
        rows, labels = ref["sources"], ref["labels"]
        probs = torch.softmax(logits[rows], -1)
        results.append(
            {
                "boxes": box_ops.clip_boxes_to_image(boxes[rows, labels], batch.image_sizes[b]),
                "scores": probs.gather(1, labels.reshape(-1, 1)).reshape(-1),
                "labels": labels,
                "probs": move_background_last(probs),
                "class_probs": probs[:, 1:],
                "feats": ref["feats"],
                "proposals": ref["proposals"],
                "sources": rows,
            }
        )
    return results


def two_stage_detections(
    model: FasterRCNN,
    batch,
    features: dict[str, Tensor],
    cached: tuple[list[Tensor], Tensor] | None = None,
) -> list[dict[str, Tensor]]:
    """Faster R-CNN post-processing that keeps probs (background last), box features, proposals."""
    proposals, box_feats = cached or two_stage_features(model, batch, features)
    heads = model.roi_heads
    class_logits, box_regression = heads.box_predictor(box_feats)
    decoded = heads.box_coder.decode(box_regression, proposals)  # (sum N, C+1, 4)
    probs_all = torch.softmax(class_logits, -1)
    counts = [len(p) for p in proposals]
    results = []
    for b, (boxes, probs, feats, props) in enumerate(
        zip(decoded.split(counts), probs_all.split(counts), box_feats.split(counts), proposals)
    ):
        boxes = box_ops.clip_boxes_to_image(boxes, batch.image_sizes[b])
        num_cls = probs.shape[1]
        # every (proposal, foreground class) pair is a candidate, as in torchvision
        row = torch.arange(len(probs), device=probs.device)[:, None].expand(-1, num_cls - 1)
        labels = torch.arange(1, num_cls, device=probs.device)[None].expand(len(probs), -1)
        cand_boxes = boxes[:, 1:].reshape(-1, 4)
        cand_scores = probs[:, 1:].reshape(-1)
        row, labels = row.reshape(-1), labels.reshape(-1)
        keep = torch.where(cand_scores > heads.score_thresh)[0]
        keep = keep[box_ops.remove_small_boxes(cand_boxes[keep], 1e-2)]
        keep = keep[
            box_ops.batched_nms(cand_boxes[keep], cand_scores[keep], labels[keep], heads.nms_thresh)
        ][: heads.detections_per_img]
        dist = move_background_last(probs)
        results.append(
            {
                "boxes": cand_boxes[keep],
                "scores": cand_scores[keep],
                "labels": labels[keep],
                "probs": dist[row[keep]],
                "class_probs": probs[row[keep]][:, 1:],
                "feats": feats[row[keep]],
                "proposals": props[row[keep]],
                "sources": row[keep],
            }
        )
    return results
