"""PPAL's difficulty-calibrated uncertainty sampling (DCUS; Yang et al. 2024).

Per-class difficulty (``quality: ema``, PPAL's ``RetinaQualityEMAHead``): during the round's
training, every positive anchor of a batch gives ``q = p^xi * IoU^(1 - xi)`` (p: the sigmoid
probability of its assigned class, IoU: of its regressed box with its assigned labelled box);
per batch the mean per class ``a_c = sum q / (count + 1e-5)`` updates a running average
``Q_c <- m_c Q_c + (1 - m_c) a_c``, and ``m_c`` returns to ``momentum`` when ``a_c > 0`` and is
multiplied by it otherwise (a class absent from a batch decays, faster the longer it is absent).
``Q`` starts at 0 and ``m`` at ``momentum`` every round, as PPAL builds a fresh head each round
(so a resumed run, which retrains the round, gets the same value). Defaults: xi 0.6 (the head's
``quality_xi``), momentum 0.99 (``al_train/retinanet_26e.py``; the class default is 0.999).
The detector reports the anchors through the ``anchor_quality`` capability (dense heads).

``quality: post_nms`` is alrun's earlier measure: after training, per labelled box the quality
of its best same-class post-NMS detection (0 when nothing overlaps), averaged per class; a class
never seen in the labelled set has quality 0 (hardest).

Class weights follow PPAL's sampler (``DCUSSampler._get_classwise_weight``)::

    w_c = 1 + alpha * log(b * (1 - q_c) + 1) * ub,   b = exp(1 / alpha) - 1

so an easy class (q = 1) weighs 1 and a hard one (q = 0) weighs 1 + ub. An image's score is
the sum over its boxes with score >= ``score_threshold`` of ``w_label * entropy(box)``, entropy
on the box's binary (detected / not) distribution; images without such a box score 0.

As ``DCUSSampler.al_acquisition`` does, only *valid* boxes count (``BaseALSampler.is_box_valid``:
``sqrt(w h) > 16`` px and both side ratios ``< 5``; alrun's detectors already clip boxes to the
image, as that function does first), and every detection NMS keeps is scored - two classes
kept at one anchor count twice (``count_sources: per_class``). ``count_sources: once`` is
alrun's one-row-per-anchor rule; ``min_box_size: 0`` and ``max_aspect_ratio: .inf`` switch the
validity filter off. Defaults follow PPAL's configs and sampler: score_thr 0.05,
class_weight_ub 0.2, class_weight_alpha 0.3, size_thr 16, ratio_thr 5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from torch import Tensor
from torchvision.ops import box_iou

import alrun.distributed as distributed
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.reduction import COUNT_SOURCES, CountSources, kept_rows
from alrun.acquisition.scores import binary, entropy
from alrun.detectors.base import ANCHOR_QUALITY, Detector
from alrun.engine import Step, TrainingHook
from alrun.errors import AlrunError
from alrun.params import Fraction, NonNegativeFloat, PositiveFloat, Range, ScoreThreshold
from alrun.types import Needs


def class_quality(
    preds: PredictionBatch | None,
    targets: Mapping[str, tuple[Tensor, Tensor]] | None,
    num_classes: int,
    xi: float,
) -> tuple[list[float], list[int]]:
    """Mean ``P^xi * IoU^(1-xi)`` of the best same-class detection per labelled box, per class
    (0 for a class without labelled boxes), and the number of labelled boxes per class."""
    total = [0.0] * num_classes
    count = [0] * num_classes
    if preds is None or not targets:
        return total, count
    row = {i: n for n, i in enumerate(preds.image_ids)}
    for image_id, (gt_boxes, gt_labels) in targets.items():
        if len(gt_labels) == 0:
            continue
        n = row.get(image_id)
        lo, hi = (0, 0) if n is None else (int(preds.offsets[n]), int(preds.offsets[n + 1]))
        boxes, labels = preds.boxes[lo:hi], preds.labels[lo:hi]
        probs = _class_probs(preds, lo, hi)
        iou = box_iou(gt_boxes.float(), boxes.float()) if hi > lo else None
        for g, c in enumerate(gt_labels.tolist()):
            if c >= num_classes:
                raise AlrunError(f"strategy.scorer: labelled box of class {c} >= {num_classes}")
            best = 0.0
            if iou is not None:
                same = labels == c
                if bool(same.any()):
                    p = probs[same, c].double().clamp(0, 1)
                    q = p.pow(xi) * iou[g, same].double().clamp(0, 1).pow(1.0 - xi)
                    best = float(q.max())
            total[c] += best
            count[c] += 1
    return [t / k if k else 0.0 for t, k in zip(total, count)], count


class ClassQualityEMA(TrainingHook):
    """PPAL's running class quality over positive anchors during training (module docstring)."""

    name = "ppal_quality"
    requires = (ANCHOR_QUALITY,)

    def __init__(self, xi: float = 0.6, momentum: float = 0.99):
        self.xi, self.base_momentum = float(xi), float(momentum)
        self.quality: Tensor | None = None  # (C,) float64, None before any training
        self.momentum: Tensor | None = None
        self._pending = distributed.StepNotes()  # each forward's (labels, quality) on the CPU
        self._stop = None

    def reset(self, num_classes: int) -> None:
        self.quality = torch.zeros(num_classes, dtype=torch.float64)
        self.momentum = torch.full((num_classes,), self.base_momentum, dtype=torch.float64)
        self._pending.clear()

    def before_training(self, detector: Detector, total: int) -> None:
        self.reset(detector.num_classes)
        if self._stop is not None:
            self._stop()
        self._stop = detector.watch_positive_anchors(self._collect)

    def _collect(self, labels: Tensor, probs: Tensor, ious: Tensor) -> None:
        q = probs.double().clamp(0, 1).pow(self.xi) * ious.double().clamp(0, 1).pow(1 - self.xi)
        self._pending.note((labels.cpu(), q.cpu()))

    def update(self, labels: Tensor, quality: Tensor) -> None:
        """One batch: per-class mean of ``quality`` over its positive anchors into the EMA."""
        num_classes = len(self.quality)
        counts = torch.bincount(labels, minlength=num_classes)[:num_classes].double()
        sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, quality)
        mean = sums / (counts + 1e-5)
        self.quality = self.momentum * self.quality + (1 - self.momentum) * mean
        self.momentum = torch.where(
            mean > 0,
            torch.full_like(self.momentum, self.base_momentum),
            self.momentum * self.base_momentum,
        )

    def after_step(self, step: Step) -> None:
        # every device's positive anchors of the step (one process: its own micro-batches)
        pending = self._pending.drain()
        if pending:
            labels = torch.cat([lab for lab, _ in pending]).long()
            quality = torch.cat([q for _, q in pending])
        else:
            labels, quality = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        self.update(labels, quality)

    def after_training(self) -> dict[str, float]:
        if self._stop is not None:
            self._stop()
            self._stop = None
        return {f"class_{c}": float(q) for c, q in enumerate(self.quality.tolist())}


def _class_probs(preds: PredictionBatch, lo: int, hi: int) -> Tensor:
    if preds.class_probs is not None:
        return preds.class_probs[lo:hi]
    if preds.probs is not None:
        return preds.probs[lo:hi, :-1]
    raise AlrunError("strategy.scorer: PPAL needs class probabilities on the labelled set")


def class_weights(quality: list[float], upper_bound: float, alpha: float) -> list[float]:
    """PPAL's difficulty weights: 1 for quality 1, ``1 + upper_bound`` for quality 0."""
    b = math.exp(1.0 / alpha) - 1.0
    return [1.0 + alpha * math.log(b * (1.0 - q) + 1.0) * upper_bound for q in quality]


class DifficultyCalibratedUncertainty:
    """Scorer: class-difficulty-weighted sum of per-box binary entropies (PPAL's DCUS)."""

    def __init__(
        self,
        score_threshold: ScoreThreshold = 0.05,
        class_weight_ub: NonNegativeFloat = 0.2,
        class_weight_alpha: PositiveFloat = 0.3,
        xi: Fraction = 0.6,
        count_sources: CountSources = "per_class",
        min_box_size: NonNegativeFloat = 16.0,
        max_aspect_ratio: Annotated[float, Range(1, low_open=True)] = 5.0,
        quality: Literal["ema", "post_nms"] = "ema",
        quality_momentum: Annotated[float, Range(0, 1, high_open=True)] = 0.99,
    ):
        if not 0.0 <= score_threshold < 1.0:
            raise AlrunError(
                f"strategy.scorer.score_threshold: expected a number in [0, 1), got "
                f"{score_threshold}"
            )
        if class_weight_alpha <= 0 or class_weight_ub < 0:
            raise AlrunError(
                "strategy.scorer: expected class_weight_alpha > 0 and class_weight_ub >= 0"
            )
        if not 0.0 <= xi <= 1.0:
            raise AlrunError(f"strategy.scorer.xi: expected a number in [0, 1], got {xi}")
        if count_sources not in COUNT_SOURCES:
            raise AlrunError(
                f"strategy.scorer.count_sources: expected one of {'|'.join(COUNT_SOURCES)}, "
                f"got '{count_sources}'"
            )
        if not min_box_size >= 0:
            raise AlrunError(
                f"strategy.scorer.min_box_size: expected a number >= 0 (pixels), got {min_box_size}"
            )
        if not max_aspect_ratio > 1:
            raise AlrunError(
                f"strategy.scorer.max_aspect_ratio: expected a number > 1, got {max_aspect_ratio}"
            )
        if quality not in ("ema", "post_nms"):
            raise AlrunError(
                f"strategy.scorer.quality: expected 'ema' (PPAL's running average over positive "
                f"anchors in training) or 'post_nms', got '{quality}'"
            )
        if not 0.0 <= quality_momentum < 1.0:
            raise AlrunError(
                f"strategy.scorer.quality_momentum: expected a number in [0, 1), got "
                f"{quality_momentum}"
            )
        self.quality = quality
        self.quality_momentum = float(quality_momentum)
        self.quality_hook = ClassQualityEMA(xi, quality_momentum) if quality == "ema" else None
        self.count_sources = count_sources
        self.min_box_size = float(min_box_size)
        self.max_aspect_ratio = float(max_aspect_ratio)
        self.score_threshold = float(score_threshold)
        self.class_weight_ub = float(class_weight_ub)
        self.class_weight_alpha = float(class_weight_alpha)
        self.xi = float(xi)
        self.needs = Needs(probs=True, labelled_detections=quality == "post_nms")
        self.last_quality: list[float] = []
        self.last_weights: list[float] = []

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        batch = context.preds
        if batch is None or batch.probs is None:
            raise AlrunError("strategy.scorer: PPAL needs class probabilities of the pool")
        num_classes = batch.probs.shape[1] - 1
        quality = self._class_quality(context, num_classes)
        weights = class_weights(quality, self.class_weight_ub, self.class_weight_alpha)
        self.last_quality, self.last_weights = quality, weights
        if len(batch) == 0:
            return {}
        keep = kept_rows(
            batch,
            self.score_threshold,
            self.count_sources,
            (self.min_box_size, self.max_aspect_ratio),
        )
        labels = batch.labels[keep]
        class_probs = batch.class_probs[keep] if batch.class_probs is not None else None
        dist = binary(class_probs if class_probs is not None else batch.probs[keep, :-1], labels)
        box = entropy(dist).double() * torch.tensor(weights, dtype=torch.float64)[labels]
        per_image = torch.zeros(len(batch), dtype=torch.float64).index_add_(
            0, batch.segment[keep], box
        )
        if not bool(torch.isfinite(per_image).all()):
            raise AlrunError("strategy.scorer: PPAL uncertainty is NaN or inf (diverged model?)")
        return dict(zip(batch.image_ids, per_image.tolist()))

    @property
    def training_hooks(self) -> tuple[TrainingHook, ...]:
        return (self.quality_hook,) if self.quality_hook is not None else ()

    def _class_quality(self, context: AcquisitionContext, num_classes: int) -> list[float]:
        if self.quality_hook is None:
            return class_quality(
                context.labelled_preds, context.labelled_targets, num_classes, self.xi
            )[0]
        found = self.quality_hook.quality
        if found is None:
            raise AlrunError(
                "strategy.scorer.quality=ema: the class-quality hook has not run (no training "
                "this round); use strategy.scorer.quality=post_nms"
            )
        if len(found) != num_classes:
            raise AlrunError(
                f"strategy.scorer.quality=ema: {len(found)} class qualities for a "
                f"{num_classes}-class pool"
            )
        return found.tolist()

    def describe(self) -> dict[str, Any]:
        return {
            "scorer": "ppal_dcus",
            "quality": self.quality,
            "quality_momentum": self.quality_momentum,
            "score_threshold": self.score_threshold,
            "class_weight_ub": self.class_weight_ub,
            "class_weight_alpha": self.class_weight_alpha,
            "xi": self.xi,
            "count_sources": self.count_sources,
            "min_box_size": self.min_box_size,
            "max_aspect_ratio": self.max_aspect_ratio,
            "class_quality": self.last_quality,
            "class_weights": self.last_weights,
        }
