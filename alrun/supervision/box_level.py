"""Box-level supervision: BLAD's mixed supervision of partially labelled images.

BLAD (Lyu et al., CVPR 2023, github.com/lyumengyao/blad, ``acdet/models/mixed_teacher.py``
``MixedTeacher``; config ``faster_rcnn_r50_fpn_1x_voc0712_partial.py`` ``partial_wrapper``): the
initial set is labelled in full (boxes); after it, the annotator is asked about regions chosen by
a box-query strategy (``strategy=compas``) and answers with the true boxes there (``partial``
labels, :mod:`alrun.regions`). Each iteration trains on a batch of fully labelled images and a
batch of partial ones. On a partial image the targets are the answers plus a mean teacher's
pseudo-boxes (score >= ``threshold``) elsewhere: a pseudo-box overlapping an answer by IoU >
``merge_iou`` is dropped (``MixedTeacher.merge_gt_pseudo``), so queried regions are trained
with the answers and unqueried ones with pseudo-labels; the loss is multiplied by ``weight``
(``partial_weight``). ``unlabelled_weight`` > 0 also trains the untouched pool images on
pseudo-labels (BLAD's ``mixed`` config, ``unsup_weight`` 4.0; its ``partial`` config leaves
them out, the default here).

The rest of a partial image (neither answered nor pseudo-labelled) is background. BLAD weights
those background samples by the teacher's background probability (Soft Teacher's soft
background weighting, ``MixedTeacher.unsup_rcnn_cls_loss``); alrun trains them as hard
background through the backend's own loss (``background: hard``), which every backend has.
``rejected``: a region the annotator saw empty is ignored as in BLAD (``ignore``), or its
pseudo-boxes are dropped too (``drop``, alrun's option: the annotator said nothing is there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

import alrun.distributed as distributed
from alrun.data.dataset import ImageRef
from alrun.detectors.base import TEACHER, Detector, Progress, TrainSchedule
from alrun.engine import NO_STRATEGY_TRAINING, BatchSource, Step, StrategyTraining, train_round
from alrun.errors import AlrunError
from alrun.params import Fraction, NonNegativeFloat, PositiveInt
from alrun.pool import LabelPool
from alrun.supervision.base import BaseRegime, LabelRequest
from alrun.supervision.pseudo_label import (
    EMPTY_RULES,
    TEACHERS,
    PseudoLabelHook,
    check_empty,
    check_fraction,
    check_weight,
    previous_round_teacher,
    teacher_targets,
    unlabelled_dataset,
)
from alrun.truth import flip_boxes
from alrun.types import ImageLabels

REJECTED = ("ignore", "drop")
BACKGROUND = ("hard",)


def merge_answers_and_pseudo(
    answer_boxes: Tensor,
    answer_labels: Tensor,
    pseudo_boxes: Tensor,
    pseudo_labels: Tensor,
    merge_iou: float = 0.4,
    rejected_boxes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The answers plus the pseudo-boxes overlapping no answer (nor a rejected region) by IoU >
    ``merge_iou``: BLAD's ``MixedTeacher.merge_gt_pseudo``."""
    drop = torch.zeros(len(pseudo_boxes), dtype=torch.bool, device=pseudo_boxes.device)
    for other in (answer_boxes, rejected_boxes):
        if other is not None and len(other) and len(pseudo_boxes):
            drop |= (box_iou(other.float(), pseudo_boxes.float()) > merge_iou).any(dim=0)
    boxes = torch.cat([answer_boxes.float().reshape(-1, 4), pseudo_boxes.float()[~drop]])
    labels = torch.cat([answer_labels.long(), pseudo_labels.long()[~drop]])
    return boxes, labels


class BoxLevelHook(PseudoLabelHook):
    """Mixed supervision of the ``partial`` source (answers + teacher pseudo-boxes) and, when
    ``unlabelled_weight`` > 0, pseudo-labels on the ``unlabelled`` source; one teacher."""

    name = "box_level"

    def __init__(
        self,
        answers: Mapping[str, ImageLabels],
        threshold: float,
        weight: float,
        teacher: str | nn.Module | None,
        ema_decay: float,
        merge_iou: float,
        rejected: str,
        empty: str,
        unlabelled_weight: float = 0.0,
        audit=None,
    ):
        super().__init__(
            "unlabelled", threshold, unlabelled_weight, teacher, ema_decay, audit, empty
        )
        self.answers = answers
        self.partial_weight = weight
        self.merge_iou = merge_iou
        self.rejected = rejected
        self.answered = self.pseudo_kept = self.pseudo_dropped = 0

    def before_training(self, detector: Detector, total: int) -> None:
        super().before_training(detector, total)
        self.answered = self.pseudo_kept = self.pseudo_dropped = 0

    def extra_losses(self, step: Step) -> Mapping[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if "unlabelled" in step.batches:
            losses.update(super().extra_losses(step))
        if "partial" in step.batches and self.partial_weight > 0:
            losses.update({f"partial/{k}": v for k, v in self._partial_losses(step).items()})
        return losses

    def _partial_losses(self, step: Step) -> Mapping[str, Tensor]:
        batch = step.batches["partial"]
        if self.teacher is not None:
            found = teacher_targets(self.teacher, batch.images, self.threshold, self.label_offset)
        else:  # previous_round in round 0 cannot happen (no partial image yet): answers only
            found = [None] * len(batch.images)
        images, targets = [], []
        for image, image_id, flip, pseudo in zip(
            batch.images, batch.image_ids, batch.flipped, found
        ):
            lab = self.answers[image_id]
            device = image.device
            boxes = _boxes(lab.boxes, flip, image.shape[-1], device)
            rejected = None
            if self.rejected == "drop" and lab.queries is not None:
                rejected = _boxes(lab.queries[lab.answers < 0], flip, image.shape[-1], device)
            labels = torch.as_tensor(lab.labels, dtype=torch.int64, device=device)
            if pseudo is None:
                p_boxes = torch.zeros((0, 4), device=device)
                p_labels = torch.zeros(0, dtype=torch.int64, device=device)
            else:
                p_boxes, p_labels = pseudo["boxes"], pseudo["labels"]
            merged_boxes, merged_labels = merge_answers_and_pseudo(
                boxes, labels, p_boxes, p_labels, self.merge_iou, rejected
            )
            kept = len(merged_boxes) - len(boxes)
            self.answered += len(boxes)
            self.pseudo_kept += kept
            self.pseudo_dropped += len(p_boxes) - kept
            if len(merged_boxes) or self.empty == "background":
                images.append(image)
                targets.append({"boxes": merged_boxes, "labels": merged_labels})
        if not images:
            return {}
        losses = step.detector.losses(images, targets)
        return {key: value * self.partial_weight for key, value in losses.items()}

    def after_training(self) -> Mapping[str, float]:
        stats = dict(super().after_training()) if self.weight > 0 else {}
        counts = [self.answered, self.pseudo_kept, self.pseudo_dropped]
        answered, kept, dropped = distributed.sum_over_ranks(counts)  # every device's
        return {
            **{f"unlabelled_{k}": v for k, v in stats.items()},
            "threshold": self.threshold,
            "partial_weight": self.partial_weight,
            "merge_iou": self.merge_iou,
            "answers_seen": float(answered),
            "pseudo_kept": float(kept),
            "pseudo_dropped": float(dropped),
        }


def _boxes(boxes: np.ndarray, flip: bool, width: int, device) -> Tensor:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if flip:
        boxes = flip_boxes(boxes, width)
    return torch.as_tensor(boxes, device=device)


class BoxLevelSupervision(BaseRegime):
    """``supervision=box_level``: full boxes for the initial set, box-level queries after it,
    trained with BLAD's mixed supervision (module docstring). Defaults: BLAD's
    ``partial_wrapper.train_cfg`` (``cls_pseudo_threshold`` 0.9, ``partial_boxmerge_iou_thresh``
    0.4, ``partial_weight`` 1.0) and its ``MeanTeacher`` hook (momentum 0.999)."""

    label_kinds = ("box", "partial")
    requires = frozenset({TEACHER})

    def __init__(
        self,
        threshold: Fraction = 0.9,
        weight: NonNegativeFloat = 1.0,
        teacher: Literal[TEACHERS] | None = "ema",
        ema_decay: Fraction = 0.999,
        merge_iou: Fraction = 0.4,
        rejected: Literal[REJECTED] = "ignore",
        background: Literal[BACKGROUND] = "hard",
        unlabelled_weight: NonNegativeFloat = 0.0,
        empty: Literal[EMPTY_RULES] = "skip",
        partial_batch_size: PositiveInt | None = None,
    ):
        if teacher not in TEACHERS:
            raise AlrunError(
                f"supervision.teacher: box-level supervision trains unqueried regions on a "
                f"teacher's pseudo-labels; expected one of {'|'.join(TEACHERS)}, got {teacher!r}"
            )
        if rejected not in REJECTED:
            raise AlrunError(
                f"supervision.rejected: expected one of {'|'.join(REJECTED)}, got {rejected!r}"
            )
        if background not in BACKGROUND:
            raise AlrunError(
                f"supervision.background: expected {'|'.join(BACKGROUND)} (BLAD's soft "
                f"background weighting is not implemented), got {background!r}"
            )
        self.teacher = str(teacher)
        self.threshold = check_fraction(threshold, "supervision.threshold")
        self.weight = check_weight(weight, "supervision.weight")
        self.ema_decay = check_fraction(ema_decay, "supervision.ema_decay")
        self.merge_iou = check_fraction(merge_iou, "supervision.merge_iou")
        self.unlabelled_weight = check_weight(unlabelled_weight, "supervision.unlabelled_weight")
        self.empty = check_empty(empty, "supervision.empty")
        self.rejected = rejected
        self.background = background
        self.partial_batch_size = partial_batch_size

    def label_kind(self, request: LabelRequest) -> str:
        return "box" if request.round_index == 0 else "partial"

    def annotate(
        self, oracle, records: Sequence[ImageRef], request: LabelRequest
    ) -> list[ImageLabels]:
        if self.label_kind(request) == "box":
            return oracle.annotate(records, "box")
        if request.queries is None:
            raise AlrunError(
                "supervision=box_level: no regions to ask about; it needs a box-query strategy "
                "(strategy=compas)"
            )
        return oracle.annotate(
            records, "partial", queries=request.queries, answered=request.answered
        )

    def train(
        self,
        detector: Detector,
        pool: LabelPool,
        schedule: TrainSchedule,
        seed: int,
        round_index: int,
        progress: Progress | None = None,
        strategy: StrategyTraining = NO_STRATEGY_TRAINING,
    ) -> dict[str, float]:
        partial = pool.partial_ids
        sources = [BatchSource("labelled", pool.training_set())]
        if partial:
            sources.append(
                BatchSource(
                    "partial",
                    pool.dataset.subset(partial, "partial"),
                    role="unlabelled",  # targets come from the hook: answers + pseudo-boxes
                    batch_size=self.partial_batch_size,
                )
            )
        use_unlabelled = self.unlabelled_weight > 0 and bool(pool.unlabelled_ids)
        if use_unlabelled:
            sources.append(
                BatchSource(
                    "unlabelled",
                    unlabelled_dataset(pool),
                    role="unlabelled",
                    batch_size=self.partial_batch_size,
                )
            )
        hooks = []
        if partial or use_unlabelled:
            teacher: Any = "ema"
            if self.teacher == "previous_round":
                teacher = previous_round_teacher(detector, round_index)
            answers = {i: pool.labels[i] for i in partial}
            hooks.append(
                BoxLevelHook(
                    answers,
                    self.threshold,
                    self.weight,
                    teacher,
                    self.ema_decay,
                    self.merge_iou,
                    self.rejected,
                    self.empty,
                    self.unlabelled_weight,
                    pool.audit,
                )
            )
        stats = train_round(
            detector, sources, schedule, seed, round_index, hooks, progress, strategy
        )
        return {**stats, "box_level/partial_images": float(len(partial))}


def check_box_level(
    strategy: Any, regime: Any, oracle: Any, unit: str, fill: str, strategy_name: str
) -> None:
    """Start-up check: box-level queries come as a pair (a box-query strategy and a regime that
    takes ``partial`` labels), bought by the box or the second, in rank order, from the
    simulated oracle (the one that answers regions)."""
    from alrun.acquisition.compas import BoxQueryStrategy, ComPASScorer  # (import cycle)

    box_regime = "partial" in regime.label_kinds
    box_strategy = isinstance(strategy, BoxQueryStrategy)
    if not box_strategy and isinstance(getattr(strategy, "scorer", None), ComPASScorer):
        raise AlrunError(
            f"strategy/scorer=compas: ranks boxes, not images; use strategy=compas (with "
            f"supervision=box_level) instead of strategy={strategy_name}"
        )
    if box_strategy and not box_regime:
        raise AlrunError(
            f"strategy={strategy_name}: asks for boxes, not images; it needs supervision=box_level"
        )
    if not box_regime:
        return
    if unit == "images":
        raise AlrunError(
            "budget.unit: supervision=box_level buys boxes of images, not images; set "
            "budget.unit=boxes or budget.unit=seconds"
        )
    if not box_strategy:
        raise AlrunError(
            f"strategy={strategy_name}: supervision=box_level needs a box-query strategy "
            "(strategy=compas)"
        )
    from alrun.oracle import SimulatedOracle

    if not isinstance(oracle, SimulatedOracle):
        raise AlrunError(
            f"oracle: box-level queries are answered by the simulated oracle (oracle=default), "
            f"not {type(oracle).__name__}"
        )
    if fill != "stop":
        raise AlrunError(
            f"budget.fill: box-level queries are bought in rank order until one does not fit "
            f"(stop), got '{fill}'"
        )
