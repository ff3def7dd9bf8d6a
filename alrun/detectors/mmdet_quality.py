"""PPAL's two capabilities on mmdet's RetinaNet (:mod:`alrun.detectors.mmdet`).

``anchor_quality``: PPAL's ``RetinaQualityEMAHead.loss_single`` reads, for every positive anchor
of a training batch, the sigmoid probability of its assigned class and the IoU of the box the
head regresses from it with its assigned ground-truth box. mmdet 3's ``AnchorHead.loss_by_feat``
assigns once and hands each level's assignment to ``loss_by_feat_single`` (labels with
background ``num_classes``, regression targets encoded by the head's ``bbox_coder`` unless
``reg_decoded_bbox``); watching that call gives the same anchors without a second assignment,
as :mod:`alrun.detectors.torchvision.quality` does with torchvision's ``compute_loss``.

``head_features``: PPAL's ``RetinaHeadFeat`` samples the classification tower's output at each
box's centre (CCMS); :func:`~alrun.detectors.torchvision.postprocess_dense.centre_features` does
it for both backends (mmdet's anchor rows have torchvision's location-major order).
mmdet is imported lazily, as in :mod:`alrun.detectors.mmdet`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from alrun.detectors.base import AnchorCallback
from alrun.detectors.torchvision.postprocess_dense import centre_features
from alrun.detectors.torchvision.quality import aligned_iou


def _boxes(boxes: Any) -> Tensor:
    """mmdet box structures (``HorizontalBoxes``) or plain tensors -> (N, 4) tensors."""
    from mmdet.structures.bbox import get_box_tensor

    return get_box_tensor(boxes)


def level_positives(
    head: nn.Module,
    cls_score: Tensor,
    bbox_pred: Tensor,
    anchors: Tensor,
    labels: Tensor,
    bbox_targets: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(labels, probabilities, IoUs) of one level's positive anchors (``0 <= label <
    num_classes``), from the arguments of ``AnchorHead.loss_by_feat_single``."""
    labels = labels.reshape(-1)
    pos = torch.where((labels >= 0) & (labels < head.num_classes))[0]
    scores = cls_score.permute(0, 2, 3, 1).reshape(-1, head.cls_out_channels)[pos]
    deltas = bbox_pred.permute(0, 2, 3, 1).reshape(-1, head.bbox_coder.encode_size)[pos]
    anchors = _boxes(anchors).reshape(-1, 4)[pos]
    targets = bbox_targets.reshape(-1, bbox_targets.shape[-1])[pos]
    predicted = _boxes(head.bbox_coder.decode(anchors, deltas))
    if not head.reg_decoded_bbox:  # the targets are encoded offsets: back to boxes
        targets = _boxes(head.bbox_coder.decode(anchors, targets))
    label = labels[pos]
    probs = torch.sigmoid(scores.gather(1, label[:, None]).squeeze(1))
    return label, probs, aligned_iou(predicted, targets)


def watch_head_loss(head: nn.Module, callback: AnchorCallback) -> Callable[[], None]:
    """Report each ``head.loss_by_feat`` call's positive anchors (every level, one call of
    ``callback``; no gradients); returns the function that stops watching."""
    original_single, original_loss = head.loss_by_feat_single, head.loss_by_feat
    before = {
        k: head.__dict__[k] for k in ("loss_by_feat", "loss_by_feat_single") if k in head.__dict__
    }
    found: list[tuple[Tensor, Tensor, Tensor]] = []

    def loss_by_feat_single(cls_score, bbox_pred, anchors, labels, *args, **kwargs):
        bbox_targets = args[1] if len(args) > 1 else kwargs["bbox_targets"]
        with torch.no_grad():
            found.append(level_positives(head, cls_score, bbox_pred, anchors, labels, bbox_targets))
        return original_single(cls_score, bbox_pred, anchors, labels, *args, **kwargs)

    def loss_by_feat(*args, **kwargs):
        found.clear()
        out = original_loss(*args, **kwargs)
        if found:
            callback(*(torch.cat(parts) for parts in zip(*found)))
        found.clear()
        return out

    head.loss_by_feat_single, head.loss_by_feat = loss_by_feat_single, loss_by_feat

    def stop() -> None:  # back to what was there (a mixture head's wrappers, or the class's)
        if head.__dict__.get("loss_by_feat") is loss_by_feat:
            del head.loss_by_feat, head.loss_by_feat_single
            head.__dict__.update(before)

    return stop


def head_features(
    cls_towers: list[Tensor],
    found: list[dict[str, Tensor]],
    per_location: int,
    padded: tuple[int, int],
) -> list[Tensor]:
    """Per image, the classification tower (one map per FPN level) at each kept box's centre
    (``found``: :func:`alrun.detectors.mmdet._dense`'s boxes in the resized image and anchor
    rows ``sources``, ``per_location`` anchors each); ``padded``: the batch's padded (H, W),
    which the maps cover."""
    total = per_location * sum(m.shape[2] * m.shape[3] for m in cls_towers)
    return centre_features(cls_towers, found, total, padded)
