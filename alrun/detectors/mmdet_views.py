"""Flipped views of mmdet's Faster R-CNN for CSD's two-stage variant (``flip_views``).

The same computation as the torchvision backend's (``alrun.supervision.consistency``
``two_stage_views``): one backbone pass over the batch and its mirror images (each mirrored
inside its own resized size, so padding stays put), the RPN's proposals on the plain view as at
inference (detached: inputs to the RoI head), and the RoI head on those proposals and on the
same proposals mirrored (``x1' = W - x2``, ``x2' = W - x1``) on the mirrored view, so row i of
both looks at the same content. Returned in torchvision's layout (background in column 0,
class-specific deltas with a background slot) for ``two_stage_consistency_terms``.
mmdet is imported lazily, as in :mod:`alrun.detectors.mmdet`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alrun.detectors.base import RoIFlipViewOutputs


def flip_within_sizes(inputs: Tensor, samples: list[Any]) -> Tensor:
    """Each preprocessed image mirrored inside its ``img_shape`` (the padding stays put)."""
    flipped = inputs.clone()
    for i, sample in enumerate(samples):
        h, w = sample.metainfo["img_shape"]
        flipped[i, :, :h, :w] = inputs[i, :, :h, :w].flip(-1)
    return flipped


def mirrored(boxes: Tensor, width: float) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


@torch.no_grad()
def plain_view_proposals(model: nn.Module, levels: list[Tensor], samples: list[Any]) -> list:
    """The RPN's proposals as at inference (its ``test_cfg``; no targets, no gradient)."""
    rpn, was_training = model.rpn_head, model.rpn_head.training
    rpn.eval()
    try:
        results = rpn.predict(tuple(levels), samples, rescale=False)
    finally:
        rpn.train(was_training)
    return [r.bboxes.detach() for r in results]


def torchvision_layout(cls_score: Tensor, bbox_pred: Tensor) -> tuple[Tensor, Tensor]:
    """mmdet's (N, C + 1) logits with background last and (N, C * 4) (or class-agnostic
    (N, 4)) deltas -> background first and (N, (C + 1) * 4) with a zero background slot."""
    num_classes = cls_score.shape[1] - 1
    logits = torch.cat([cls_score[:, -1:], cls_score[:, :-1]], dim=1)
    deltas = bbox_pred.repeat(1, num_classes) if bbox_pred.shape[1] == 4 else bbox_pred
    return logits, torch.cat([deltas.new_zeros(len(deltas), 4), deltas], dim=1)


def two_stage_flip_views(
    model: nn.Module, inputs: Tensor, samples: list[Any]
) -> RoIFlipViewOutputs:
    """The RoI head's outputs on the plain and mirrored views (module docstring)."""
    from mmdet.structures.bbox import bbox2roi

    n = len(samples)
    levels = model.extract_feat(torch.cat([inputs, flip_within_sizes(inputs, samples)]))
    proposals = plain_view_proposals(model, [level[:n] for level in levels], samples)
    widths = [float(s.metainfo["img_shape"][1]) for s in samples]
    flipped = [mirrored(p, w) for p, w in zip(proposals, widths)]
    roi_head = model.roi_head
    extractor = roi_head.bbox_roi_extractor
    feats = extractor(tuple(levels)[: extractor.num_inputs], bbox2roi(proposals + flipped))
    if getattr(roi_head, "with_shared_head", False):
        feats = roi_head.shared_head(feats)
    cls_score, bbox_pred = roi_head.bbox_head(feats)
    logits, deltas = torchvision_layout(cls_score, bbox_pred)
    return RoIFlipViewOutputs(logits, deltas, sum(len(p) for p in proposals))
