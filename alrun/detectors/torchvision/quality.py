"""PPAL's per-anchor quality inputs, read where the dense head computes its training loss.

``RetinaQualityEMAHead.loss_single`` (ChenhongyiYang/PPAL) takes, for every positive anchor of
a training batch, the sigmoid probability of its assigned class and the IoU of the box the head
regresses from it with the ground-truth box it is assigned to. torchvision's RetinaNet and FCOS
both hand their matching to ``head.compute_loss(targets, head_outputs, anchors, matched_idxs)``;
watching that call gives the same anchors without a second matching.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS

from alrun.detectors.base import AnchorCallback


def aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of row i of ``a`` with row i of ``b`` (mmdet's ``bbox_overlaps(is_aligned=True)``)."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


def positive_anchors(
    model: nn.Module,
    targets: list[dict[str, Tensor]],
    head_outputs: dict[str, Tensor],
    anchors: list[Tensor],
    matched_idxs: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """(labels, probabilities, IoUs) of every positive anchor (``matched_idxs >= 0``) of a batch,
    in the model's label space."""
    labels, probs, ious = [], [], []
    for b, (target, matched) in enumerate(zip(targets, matched_idxs)):
        pos = torch.where(matched >= 0)[0]
        if pos.numel() == 0:
            continue
        assigned = matched[pos]
        label = target["labels"][assigned]
        regression = head_outputs["bbox_regression"][b][pos]
        if isinstance(model, FCOS):
            predicted = model.box_coder.decode(regression, anchors[b][pos])
        else:
            predicted = model.box_coder.decode_single(regression, anchors[b][pos])
        logits = head_outputs["cls_logits"][b][pos]
        labels.append(label)
        probs.append(torch.sigmoid(logits.gather(1, label[:, None]).squeeze(1)))
        ious.append(aligned_iou(predicted, target["boxes"][assigned]))
    if not labels:
        empty = torch.zeros(0, device=anchors[0].device)
        return empty.long(), empty, empty
    return torch.cat(labels), torch.cat(probs), torch.cat(ious)


def watch_head_loss(model: nn.Module, label_offset: int, callback: AnchorCallback) -> Callable:
    """Report every ``model.head.compute_loss`` call's positive anchors (dataset classes) to
    ``callback`` (no gradients); returns the function that stops watching."""
    head = model.head
    original = head.compute_loss

    def compute_loss(targets, head_outputs, anchors, matched_idxs, *args, **kwargs):
        with torch.no_grad():
            labels, probs, ious = positive_anchors(
                model, targets, head_outputs, anchors, matched_idxs
            )
            callback(labels - label_offset, probs, ious)
        return original(targets, head_outputs, anchors, matched_idxs, *args, **kwargs)

    head.compute_loss = compute_loss

    def stop() -> None:
        if head.__dict__.get("compute_loss") is compute_loss:
            del head.compute_loss

    return stop
