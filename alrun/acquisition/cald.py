"""CALD: consistency-based active learning for object detection (Yu et al., CVPR-W 2022), as its
code computes it (we1pingyu/CALD ``cald_train.py``: ``get_uncertainty``, ``cls_kldiv``).

Stage 1, :class:`CaldConsistency` (scorer). For each test-time view and each reference box b
(the un-augmented pass), take the view's box of highest IoU with b (any class) and

    c(b, view) = | IoU + 1/2 (1 - JS(p_b, p_view)) (P_b + P_view) - base_point |

with p the boxes' class distributions (JS in nats) and P their max class probabilities. A view's
consistency is ``min(1, min_b c)`` (0 when the view has no box), the image's the mean over views
(0 when the image has no box). CALD picks the *lowest* consistency; alrun's score is
``1 - consistency`` so that higher is more informative (an image without boxes scores 1, first).

Stage 2, :class:`CaldClassDiversity` (selector, inside ``TwoPhase`` with ``expand_ratio`` 1.2 -
CALD's ``mr``): per candidate the mean over passes (reference + views) of the per-class max
detector score; candidates where that vector is all zero first, then by descending
``JS(softmax(mean labelled class counts), softmax(candidate vector))``.

Deviations, named: CALD's default views are flip, cut-out, 0.8 resize and 5 degree rotation;
alrun has no cut-out or rotation view, so the preset uses ``hflip`` and ``scale:0.8``. CALD
thins an image with over 40 boxes to 50 evenly spaced ones; alrun scores all boxes with score
>= ``score_threshold``. The class distribution is the C+1 softmax row on softmax heads and the
normalised class sigmoids on sigmoid heads (what CALD's ``scipy.stats.entropy`` makes of them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.diversity import candidate_ids, check_scores
from alrun.acquisition.scores import js_divergence
from alrun.acquisition.select import fill_budget
from alrun.acquisition.strategies import score_pool
from alrun.detectors.views import parse_view
from alrun.errors import AlrunError
from alrun.params import NonNegativeFloat, ScoreThreshold
from alrun.types import Needs


def _rows(batch: PredictionBatch, image: int, threshold: float) -> Tensor:
    lo, hi = int(batch.offsets[image]), int(batch.offsets[image + 1])
    return torch.nonzero(batch.scores[lo:hi] >= threshold).flatten() + lo


def class_rows(batch: PredictionBatch, rows: Tensor) -> tuple[Tensor, Tensor]:
    """(class distributions (n, K), max class probabilities (n,)) of ``rows``."""
    if batch.head == "softmax" and batch.probs is not None:
        dist = batch.probs[rows].double()
    else:
        source = batch.class_probs if batch.class_probs is not None else batch.probs[:, :-1]
        dist = source[rows].double()
    dist = dist / dist.sum(dim=1, keepdim=True).clamp_min(1e-12)
    fg = batch.class_probs if batch.class_probs is not None else batch.probs[:, :-1]
    return dist, fg[rows].double().max(dim=1).values


def view_consistency(
    ref_boxes: Tensor,
    ref_dist: Tensor,
    ref_pm: Tensor,
    boxes: Tensor,
    dist: Tensor,
    pm: Tensor,
    base_point: float,
) -> float:
    """One view's consistency with the reference (see the module docstring)."""
    if len(boxes) == 0:
        return 0.0
    best, idx = box_iou(ref_boxes.double(), boxes.double()).max(dim=1)
    js = js_divergence(ref_dist, dist[idx]).clamp_min(0.0)
    values = (best + 0.5 * (1.0 - js) * (ref_pm + pm[idx]) - base_point).abs()
    return min(1.0, float(values.min()))


def image_consistency(batch: PredictionBatch, image: int, threshold: float, base: float) -> float:
    ref = _rows(batch, image, threshold)
    if len(ref) == 0:
        return 0.0
    ref_dist, ref_pm = class_rows(batch, ref)
    per_view = []
    for view in batch.passes:
        rows = _rows(view, image, threshold)
        dist, pm = class_rows(view, rows)
        per_view.append(
            view_consistency(batch.boxes[ref], ref_dist, ref_pm, view.boxes[rows], dist, pm, base)
        )
    return sum(per_view) / len(per_view)


class CaldConsistency:
    """Scorer: ``1 - `` CALD's consistency of the reference boxes under test-time views."""

    def __init__(
        self,
        views: Sequence[str] = ("hflip", "scale:0.8"),
        base_point: NonNegativeFloat = 1.3,
        score_threshold: ScoreThreshold = 0.05,
    ):
        if not views:
            raise AlrunError("strategy.scorer.views: CALD needs at least one view")
        for view in views:
            parse_view(view)
        if not base_point >= 0:
            raise AlrunError(
                f"strategy.scorer.base_point: expected a number >= 0, got {base_point}"
            )
        if not 0.0 <= score_threshold < 1.0:
            raise AlrunError(
                f"strategy.scorer.score_threshold: expected a number in [0, 1), got "
                f"{score_threshold}"
            )
        self.views = tuple(str(v) for v in views)
        self.base_point = float(base_point)
        self.score_threshold = float(score_threshold)
        self.needs = Needs(probs=True, augment=self.views)

    def batch_scores(self, batch: PredictionBatch) -> list[float]:
        if len(batch) and len(batch.passes) != len(self.views):
            raise AlrunError(
                f"strategy: CALD expected {len(self.views)} test-time views, the detector "
                f"returned {len(batch.passes)}"
            )
        if len(batch) and batch.probs is None and batch.class_probs is None:
            raise AlrunError("strategy: detector returned no class probabilities")
        return [
            1.0 - image_consistency(batch, n, self.score_threshold, self.base_point)
            for n in range(len(batch))
        ]

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        return score_pool(self, context)

    def describe(self) -> dict[str, Any]:
        return {
            "scorer": "cald_consistency",
            "views": list(self.views),
            "base_point": self.base_point,
            "score_threshold": self.score_threshold,
        }


def class_vector(batch: PredictionBatch, image: int, num_classes: int, threshold: float) -> Tensor:
    """CALD's ``cls_corr``: per class the max detector score of the image's boxes, averaged
    over the reference pass and every view."""
    out = torch.zeros(num_classes, dtype=torch.float64)
    passes = (batch, *batch.passes)
    for p in passes:
        rows = _rows(p, image, threshold)
        best = torch.zeros(num_classes, dtype=torch.float64).scatter_reduce_(
            0, p.labels[rows].long(), p.scores[rows].double(), reduce="amax"
        )
        out += best
    return out / len(passes)


def js_of_softmax(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """``(KL(p||m) + KL(q||m)) / 2`` of ``softmax(p_logits)`` (1, K) and rows ``q_logits``."""
    p = torch.softmax(p_logits, dim=-1).expand_as(q_logits)
    q = torch.softmax(q_logits, dim=-1)
    m = (p + q) / 2
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


class CaldClassDiversity:
    """Selector, CALD's second stage (``cls_kldiv``) over the candidates (see the module
    docstring); the labelled class counts come from the oracle's boxes of the labelled set."""

    def __init__(self, score_threshold: ScoreThreshold = 0.05):
        if not 0.0 <= score_threshold < 1.0:
            raise AlrunError(
                f"strategy.selector.score_threshold: expected a number in [0, 1), got "
                f"{score_threshold}"
            )
        self.score_threshold = float(score_threshold)
        self.needs = Needs(probs=True, labelled_detections=True)
        self.last: dict[str, Any] = {}

    def __call__(self, scores: Mapping[str, float], context: AcquisitionContext) -> list[str]:
        check_scores(scores)
        ids = candidate_ids(scores, context)
        if not ids:
            return []
        batch = context.preds
        width = batch.class_probs if batch.class_probs is not None else batch.probs[:, :-1]
        num_classes = int(width.shape[1])
        # the candidates in CALD's order: lowest consistency (highest score) first
        ids.sort(key=lambda i: -scores[i])
        row = {i: n for n, i in enumerate(batch.image_ids)}
        vectors = torch.stack(
            [class_vector(batch, row[i], num_classes, self.score_threshold) for i in ids]
        )
        counts = torch.zeros(num_classes, dtype=torch.float64)
        targets = context.labelled_targets or {}
        for _, labels in targets.values():
            counts += torch.bincount(labels.long(), minlength=num_classes)[:num_classes].double()
        mean_counts = counts / max(len(targets), 1)
        empty = [n for n in range(len(ids)) if float(vectors[n].sum()) == 0.0]
        js = js_of_softmax(mean_counts[None], vectors)
        js[empty] = -torch.inf
        rest = torch.argsort(-js, stable=True).tolist()[: len(ids) - len(empty)]
        order = empty + rest  # CALD takes every empty candidate, even past the budget: capped
        self.last = {"candidates_without_detections": len(empty), "labelled_images": len(targets)}
        return fill_budget([ids[n] for n in order], context.budget, context.cost_of, context.fill)

    def describe(self) -> dict[str, Any]:
        return {
            "selector": "cald_class_diversity",
            **{f"cald_{k}": v for k, v in self.last.items()},
        }
