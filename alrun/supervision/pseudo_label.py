"""Self-training with pseudo-labels: a teacher's confident predictions on unlabelled images become
training targets, their losses scaled by a weight.

The teacher predicts online, every iteration, on the unlabelled batch the engine draws
(:class:`PseudoLabelHook`): either an EMA of the student (``teacher: ema``, Tarvainen & Valpola
2017; updated after every optimiser step) or a frozen copy of the previous round's model
(``teacher: previous_round``; none in round 0). Boxes scoring at least ``threshold`` are the
targets. An unlabelled image without any is left out of the pseudo-label loss
(``empty: skip``, the default) or trained as all background (``empty: background``, as in STAC /
Unbiased Teacher after their burn-in; from scratch it suppresses every detection the teacher is
not yet sure of: measured in the README). The hidden ground truth of the pool is read only to
measure the pseudo-labels' precision and recall (the diagnostic recorded per round), never to
train.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

import alrun.distributed as distributed
from alrun.data.dataset import ImageSet
from alrun.detectors.base import TEACHER, Detector, Progress, TrainSchedule
from alrun.engine import (
    NO_STRATEGY_TRAINING,
    BatchSource,
    Step,
    StrategyTraining,
    TrainingHook,
    train_round,
)
from alrun.errors import AlrunError
from alrun.params import Fraction, NonNegativeFloat, PositiveInt
from alrun.pool import LabelPool
from alrun.supervision.base import BaseRegime
from alrun.truth import TruthAudit

TEACHERS = ("ema", "previous_round")
EMPTY_RULES = ("skip", "background")


def check_fraction(value: object, key: str) -> float:
    """A number in [0, 1] (a score threshold), else a one-line error naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise AlrunError(f"{key}: expected a number in [0, 1], got {value!r}")
    return float(value)


def check_weight(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise AlrunError(f"{key}: expected a number >= 0, got {value!r}")
    return float(value)


def check_teacher(value: object, key: str) -> str:
    if value not in TEACHERS:
        raise AlrunError(f"{key}: expected one of {TEACHERS}, got {value!r}")
    return str(value)


def check_empty(value: object, key: str) -> str:
    if value not in EMPTY_RULES:
        raise AlrunError(f"{key}: expected one of {EMPTY_RULES}, got {value!r}")
    return str(value)


def dense_model(detector: Detector, who: str) -> nn.Module:
    """The torch module of a torchvision-backed detector (consistency hooks run its parts)."""
    if TEACHER not in detector.capabilities:
        raise AlrunError(
            f"{who}: needs a detector backed by a torch module (.model), e.g. the torchvision "
            f"backend; {type(detector).__name__} does not declare the teacher capability"
        )
    return detector.model


def teacher_module(detector: Detector, who: str) -> nn.Module:
    """The module teachers copy and EMA-update (:class:`~alrun.detectors.base.TeacherSource`):
    any backend that declares ``teacher``, torchvision's model or mmdet's wrapper."""
    if TEACHER not in detector.capabilities:
        raise AlrunError(
            f"{who}: needs a detector that declares the teacher capability "
            f"(teacher_module()); {type(detector).__name__} does not"
        )
    return detector.teacher_module()


def frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student (float tensors; others copied)."""
    student_state = student.state_dict()
    for key, value in teacher.state_dict().items():
        new = student_state[key]
        if value.dtype.is_floating_point:
            value.mul_(decay).add_(new.detach(), alpha=1 - decay)
        else:
            value.copy_(new)


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module, images: Sequence[Tensor], threshold: float, label_offset: int = 0
) -> list[dict[str, Tensor]]:
    """The teacher's post-processed detections scoring >= ``threshold`` (zero-size boxes left
    out), as training targets (``boxes`` in the images' pixels, ``labels`` as dataset classes)
    plus ``scores``."""
    teacher.eval()
    out = []
    for found in teacher(list(images)):
        boxes = found["boxes"]
        positive = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # torchvision refuses
        keep = (found["scores"] >= threshold) & positive  # zero-size targets
        out.append(
            {
                "boxes": found["boxes"][keep].detach(),
                "labels": found["labels"][keep].detach() - label_offset,
                "scores": found["scores"][keep].detach(),
            }
        )
    return out


class PseudoLabelHook(TrainingHook):
    """Pseudo-label loss on the unlabelled batch of ``source``, from an EMA or frozen teacher.

    ``teacher``: ``ema`` (made from the student when training starts) or a frozen module
    (``previous_round``), or None for no pseudo-labels this round (recorded as such).
    ``audit``: the evaluator's measure against the hidden ground truth, for the precision /
    recall diagnostics (counts only; None: not measured).
    """

    name = "pseudo"

    def __init__(
        self,
        source: str,
        threshold: float,
        weight: float,
        teacher: str | nn.Module | None = "ema",
        ema_decay: float = 0.99,
        audit: TruthAudit | None = None,
        empty: str = "skip",
    ):
        self.source = source
        self.empty = empty
        self.threshold = threshold
        self.weight = weight
        self.mode = teacher if isinstance(teacher, str) else "frozen"
        self.teacher: nn.Module | None = None if isinstance(teacher, str) else teacher
        self.ema_decay = ema_decay
        self.audit = audit
        self.label_offset = 0
        self.boxes = self.hits = self.gt_objects = self.images = 0

    def before_training(self, detector: Detector, total: int) -> None:
        model = teacher_module(detector, "supervision (pseudo-labels)")
        self.label_offset = int(detector.label_offset)
        if self.mode == "ema":
            self.teacher = frozen_copy(model)
        self.boxes = self.hits = self.gt_objects = self.images = 0

    def extra_losses(self, step: Step) -> Mapping[str, Tensor]:
        if self.teacher is None or self.weight == 0:
            return {}
        batch = step.batches[self.source]
        targets = teacher_targets(self.teacher, batch.images, self.threshold, self.label_offset)
        self._count(batch.image_ids, batch.flipped, batch.images, targets)
        keep = [i for i, t in enumerate(targets) if self.empty == "background" or len(t["boxes"])]
        if not keep:
            return {}
        train_targets = [
            {"boxes": targets[i]["boxes"], "labels": targets[i]["labels"]} for i in keep
        ]  # the detector adds its own label offset
        losses = step.detector.losses([batch.images[i] for i in keep], train_targets)
        return {key: value * self.weight for key, value in losses.items()}

    def after_step(self, step: Step) -> None:
        if self.mode == "ema" and self.teacher is not None:
            ema_update(self.teacher, teacher_module(step.detector, "pseudo"), self.ema_decay)

    def _count(self, image_ids, flipped, images, targets) -> None:
        self.images += len(targets)
        self.boxes += sum(len(t["boxes"]) for t in targets)
        if self.audit is None:
            return
        for image_id, flip, image, found in zip(image_ids, flipped, images, targets):
            match = self.audit.true_positives(
                image_id,
                found["boxes"].cpu(),
                found["labels"].cpu(),
                found["scores"].cpu(),
                flipped_width=image.shape[-1] if flip else None,
            )
            self.gt_objects += match.objects
            self.hits += match.matched

    def after_training(self) -> Mapping[str, float]:
        # every device's micro-batches (several devices: each counted only its own)
        counts = [self.images, self.boxes, self.hits, self.gt_objects]
        images, boxes, hits, gt_objects = distributed.sum_over_ranks(counts)
        stats = {
            "threshold": self.threshold,
            "weight": self.weight,
            "has_teacher": float(self.teacher is not None),
            "images": float(images),
            "boxes": float(boxes),
            "boxes_per_image": boxes / images if images else 0.0,
        }
        # against the hidden ground truth; left out when undefined (JSON has no NaN)
        if self.audit is not None and boxes:
            stats["precision"] = hits / boxes
        if self.audit is not None and gt_objects:
            stats["recall"] = hits / gt_objects
        return stats


def unlabelled_dataset(pool: LabelPool, ids: Sequence[str] | None = None) -> ImageSet:
    """The pool images not labelled yet (or ``ids``): references, no boxes."""
    return pool.dataset.subset(pool.unlabelled_ids if ids is None else ids, "unlabelled")


def previous_round_teacher(detector: Detector, round_index: int) -> nn.Module | None:
    """A frozen copy of the model trained last round (None in round 0, which has none).

    Called before this round's training resets or fine-tunes ``detector``, so it still holds
    round ``round_index - 1``'s model: trained in this process, or loaded from that round's
    checkpoint by a resumed run (``trainer.init=scratch`` included), so both get the same teacher.
    """
    if round_index == 0:
        return None
    return frozen_copy(teacher_module(detector, "supervision.teacher=previous_round"))


def labelled_and_unlabelled_sources(pool: LabelPool, batch_size: int) -> list[BatchSource]:
    """The labelled images, plus the unlabelled pool (targets hidden) while it has images."""
    sources = [BatchSource("labelled", pool.training_set())]
    if pool.unlabelled_ids:
        sources.append(
            BatchSource(
                "unlabelled", unlabelled_dataset(pool), role="unlabelled", batch_size=batch_size
            )
        )
    return sources


class PseudoLabelSelfTraining(BaseRegime):
    """Boxes from the oracle + teacher pseudo-labels on the rest of the pool (``supervision=
    pseudo_label``). Per round metrics.json records ``pseudo/threshold``, ``pseudo/boxes``,
    ``pseudo/precision`` and ``pseudo/recall`` (against the hidden ground truth, IoU 0.5)."""

    label_kinds = ("box",)
    requires = frozenset({TEACHER})  # EMA or previous-round teacher: a copy of the torch module

    def __init__(
        self,
        threshold: Fraction = 0.5,
        weight: NonNegativeFloat = 1.0,
        teacher: Literal[TEACHERS] = "ema",
        ema_decay: Fraction = 0.99,
        unlabelled_batch_size: PositiveInt | None = None,
        empty: Literal[EMPTY_RULES] = "skip",
    ):
        self.threshold = check_fraction(threshold, "supervision.threshold")
        self.empty = check_empty(empty, "supervision.empty")
        self.weight = check_weight(weight, "supervision.weight")
        self.teacher = check_teacher(teacher, "supervision.teacher")
        self.ema_decay = check_fraction(ema_decay, "supervision.ema_decay")
        self.unlabelled_batch_size = unlabelled_batch_size

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
        sources = labelled_and_unlabelled_sources(pool, self.unlabelled_batch_size)
        hooks: list[TrainingHook] = []
        if pool.unlabelled_ids:
            teacher: str | nn.Module | None = "ema"
            if self.teacher == "previous_round":
                teacher = previous_round_teacher(detector, round_index)
            hooks.append(
                PseudoLabelHook(
                    "unlabelled",
                    self.threshold,
                    self.weight,
                    teacher,
                    self.ema_decay,
                    pool.audit,
                    self.empty,
                )
            )
        return train_round(
            detector, sources, schedule, seed, round_index, hooks, progress, strategy
        )
