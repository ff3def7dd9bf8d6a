"""Matching the boxes of one prediction pass to those of another (MC dropout, ensembles, TTA).

**Rule.** Every reference box is matched on its own to the candidate box with the highest
overlap (``iou`` or ``giou``, computed by ``torchvision.ops``); it is *matched* when that overlap
is >= ``threshold``. A candidate may serve several reference boxes: passes are compared per
reference box, not as a one-to-one assignment. An **unmatched** reference box counts as full
disagreement: in that pass the object was called background (binary distribution ``(0, 1)``,
``with_background`` one-hot on background) and its box overlaps the reference by 0.

**Aligned passes.** An MC-dropout pass of a dense head is read at the reference boxes' own
anchors (same rows, same ``sources``): there row i is compared with row i, and the same
threshold decides matched / unmatched (:func:`match_aligned`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou

from alrun.errors import AlrunError

MATCH_METRICS = ("iou", "giou")


def check_matching(metric: str, threshold: float, key: str = "strategy.scorer") -> None:
    """Start-up validation of a matching configuration (one-line errors)."""
    if metric not in MATCH_METRICS:
        raise AlrunError(
            f"{key}.match_metric: expected one of {'|'.join(MATCH_METRICS)}, got '{metric}'"
        )
    if not 0.0 < float(threshold) <= 1.0:
        raise AlrunError(f"{key}.match_threshold: expected a number in (0, 1], got {threshold}")


def overlap_matrix(a: Tensor, b: Tensor, metric: str = "iou") -> Tensor:
    """(N, M) overlaps of xyxy boxes ``a`` (N, 4) and ``b`` (M, 4) by ``metric``."""
    if metric == "iou":
        return box_iou(a, b)
    if metric == "giou":
        return generalized_box_iou(a, b)
    raise ValueError(f"unknown match metric '{metric}'")


def match_boxes(
    reference: Tensor, candidates: Tensor, metric: str = "iou", threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Match each of ``reference`` (N, 4) to ``candidates`` (M, 4) by the module's rule.

    Returns ``index`` (N,) int64, the matched candidate or -1, and ``overlap`` (N,), the
    matched pair's overlap by ``metric`` (0 when unmatched).
    """
    n = reference.shape[0]
    if n == 0 or candidates.shape[0] == 0:
        return torch.full((n,), -1, dtype=torch.int64), torch.zeros(n)
    best, index = overlap_matrix(reference.float(), candidates.float(), metric).max(dim=1)
    matched = best >= threshold
    index = torch.where(matched, index, torch.full_like(index, -1))
    return index, torch.where(matched, best, torch.zeros_like(best))


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of corresponding xyxy boxes ``a[..., :]`` and ``b[..., :]`` (same shape, (..., 4)).

    Degenerate (zero-area) pairs have IoU 0.
    """
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp_min(0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp_min(0).prod(dim=-1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def paired_overlap(a: Tensor, b: Tensor, metric: str = "iou") -> Tensor:
    """:func:`paired_iou` or its GIoU (IoU - empty share of the enclosing box) per pair."""
    iou = paired_iou(a, b)
    if metric == "iou":
        return iou
    if metric != "giou":
        raise ValueError(f"unknown match metric '{metric}'")
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    enclosing = (rb - lt).clamp_min(0).prod(dim=-1)
    inter_union = _union(a, b)
    extra = (enclosing - inter_union) / enclosing.clamp_min(1e-12)
    return torch.where(enclosing > 0, iou - extra, iou)


def _union(a: Tensor, b: Tensor) -> Tensor:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp_min(0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp_min(0).prod(dim=-1)
    return area_a + area_b - inter


def match_aligned(
    reference: Tensor, candidates: Tensor, metric: str = "iou", threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Row i of ``candidates`` is row i of ``reference`` (same anchor): matched when their
    overlap is >= ``threshold``. Same outputs as :func:`match_boxes`."""
    overlap = paired_overlap(reference.float(), candidates.float(), metric)
    matched = overlap >= threshold
    index = torch.where(
        matched, torch.arange(len(reference)), torch.full_like(matched, -1, dtype=torch.int64)
    )
    return index, torch.where(matched, overlap, torch.zeros_like(overlap))
