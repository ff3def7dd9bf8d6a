"""Unsupervised domain adaptation: a labelled source domain, the target domain as the pool.

``dataset`` is the **target** domain: its pool is what acquisition selects from and its test
split what the run is evaluated on. ``supervision.source`` is a dataset config whose pool split
is the labelled **source** domain (free: no annotation cost). Every iteration trains on

* a source batch (its boxes) and, with ``use_target_labels``, a batch of the target images the
  oracle has labelled so far (the AL part);
* a batch of unlabelled target images, used twice: teacher pseudo-labels (EMA teacher, as in
  :mod:`alrun.supervision.pseudo_label`) and adversarial feature alignment - a small domain
  classifier on every backbone/FPN level, reached through a gradient-reversal layer, learns to
  tell source from target while the reversed gradient makes the features domain-invariant
  (Ganin & Lempitsky 2015; image-level alignment as in Chen et al. 2018, DA Faster R-CNN).

Per round metrics.json records ``domain/accuracy`` (the classifier's image-level accuracy over
the round, and ``domain/accuracy_last`` over its last quarter: 0.5 = aligned) and the
``pseudo/*`` counts, threshold and precision on the target pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

import alrun.distributed as distributed
from alrun.data.dataset import DatasetSplits, DetectionDataset, ImageSet, VisibleSplits
from alrun.detectors.base import FPN_FEATURES, TEACHER, Detector, Progress, TrainSchedule
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
from alrun.supervision.grl import grl_schedule, reverse_gradient
from alrun.supervision.pseudo_label import (
    EMPTY_RULES,
    PseudoLabelHook,
    check_empty,
    check_fraction,
    check_weight,
)


class DomainClassifier(nn.Module):
    """Per-location source/target logits on each feature level (shared weights)."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 1, 1)
        )

    def forward(self, levels: Sequence[Tensor]) -> list[Tensor]:
        return [self.net(level).flatten(1) for level in levels]  # (B, H*W) per level


def domain_loss_and_votes(logits: Sequence[Tensor], is_target: float) -> tuple[Tensor, Tensor]:
    """BCE over every location of every level, and one vote per image (mean logit > 0 means
    target) for the image-level accuracy."""
    flat = torch.cat(list(logits), dim=1)
    loss = nn.functional.binary_cross_entropy_with_logits(flat, torch.full_like(flat, is_target))
    return loss, flat.mean(dim=1) > 0


def feature_channels(detector: Detector) -> int:
    """The one channel count of every feature level the domain classifier sees (FPN width)."""
    if FPN_FEATURES not in detector.capabilities:
        raise AlrunError(
            f"supervision=uda: needs the detector's feature maps of one width (features()), "
            f"which {type(detector).__name__} does not declare"
        )
    return int(detector.feature_width)


class DomainAlignmentHook(TrainingHook):
    """Adversarial alignment of the backbone features of ``source`` and ``target`` batches."""

    name = "domain"

    def __init__(self, source: str, target: str, weight: float, strength: float, ramp: bool):
        self.source = source
        self.target = target
        self.weight = weight
        self.strength = strength
        self.ramp = ramp
        self.classifier: DomainClassifier | None = None
        self.correct: list[float] = []
        self.losses: list[float] = []
        self._step = distributed.StepNotes()  # each micro-batch's (loss, accuracy)

    def before_training(self, detector: Detector, total: int) -> None:
        self.classifier = DomainClassifier(feature_channels(detector)).to(detector.device)
        self.classifier.train()
        self.correct, self.losses = [], []
        self._step.clear()

    def parameters(self) -> Sequence[Tensor]:
        return list(self.classifier.parameters()) if self.classifier is not None else []

    def extra_losses(self, step: Step) -> Mapping[str, Tensor]:
        progress = step.index / max(1, step.total - 1)
        strength = self.strength * (grl_schedule(progress) if self.ramp else 1.0)
        total, votes = [], []
        for name, is_target in ((self.source, 0.0), (self.target, 1.0)):
            features = step.detector.features(step.batches[name].images)
            levels = [reverse_gradient(f, strength) for f in features.values()]
            loss, says_target = domain_loss_and_votes(self.classifier(levels), is_target)
            total.append(loss)
            votes.append(says_target == bool(is_target))
        loss = 0.5 * (total[0] + total[1])
        self._step.note((float(loss.detach()), float(torch.cat(votes).float().mean())))
        return {"adversarial": self.weight * loss}

    def after_step(self, step: Step) -> None:
        for loss, correct in self._step.drain():
            self.losses.append(loss)
            self.correct.append(correct)

    def after_training(self) -> Mapping[str, float]:
        quarter = self.correct[-max(1, len(self.correct) // 4) :]
        return {
            "accuracy": sum(self.correct) / len(self.correct) if self.correct else 0.0,
            "accuracy_last": sum(quarter) / len(quarter) if quarter else 0.0,
            "loss_last": self.losses[-1] if self.losses else 0.0,
            "weight": self.weight,
        }


def _build_source(source: DictConfig | Mapping[str, Any]) -> Any:
    """Instantiate the source dataset; its own errors name ``dataset.*`` keys, which the user
    types as ``supervision.source.*`` here (e.g. a misspelt source domain)."""
    try:
        return instantiate(source)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, AlrunError):
            raise AlrunError(f"supervision.source: {cause}") from None
        raise
    except AlrunError as err:
        raise AlrunError(f"supervision.source: {err}") from None


def _domains(dataset: DetectionDataset | ImageSet) -> list[str]:
    return sorted({rec.domain for rec in dataset.images})


class DomainAdaptation(BaseRegime):
    """``supervision=uda``: source boxes + target pseudo-labels + adversarial alignment; the
    oracle labels target images (acquisition selects from the target pool)."""

    label_kinds = ("box",)

    def __init__(
        self,
        source: DictConfig | Mapping[str, Any] | DatasetSplits | None = None,
        target_domain: str | None = None,
        adversarial_weight: NonNegativeFloat = 0.1,
        grl_strength: NonNegativeFloat = 1.0,
        grl_ramp: bool = True,
        pseudo_threshold: Fraction = 0.6,
        pseudo_weight: NonNegativeFloat = 0.5,
        ema_decay: Fraction = 0.99,
        use_target_labels: bool = True,
        unlabelled_batch_size: PositiveInt | None = None,
        pseudo_empty: Literal[EMPTY_RULES] = "skip",
    ):
        if not target_domain:
            raise AlrunError(
                "supervision.target_domain: uda needs the target domain configured: the domain "
                "of the dataset's pool and test images (e.g. target for the synthetic data, BCCD "
                "for txl_pbc); experiment=uda_synthetic and experiment=uda_txl set it"
            )
        if source is None:
            raise AlrunError(
                "supervision.source: uda needs a labelled source-domain dataset config "
                "(see alrun/configs/supervision/uda.yaml)"
            )
        self.target_domain = str(target_domain)
        self.adversarial_weight = check_weight(adversarial_weight, "supervision.adversarial_weight")
        self.grl_strength = check_weight(grl_strength, "supervision.grl_strength")
        self.grl_ramp = bool(grl_ramp)
        self.pseudo_threshold = check_fraction(pseudo_threshold, "supervision.pseudo_threshold")
        self.pseudo_weight = check_weight(pseudo_weight, "supervision.pseudo_weight")
        self.ema_decay = check_fraction(ema_decay, "supervision.ema_decay")
        self.use_target_labels = bool(use_target_labels)
        self.pseudo_empty = check_empty(pseudo_empty, "supervision.pseudo_empty")
        self.unlabelled_batch_size = unlabelled_batch_size
        splits = source if isinstance(source, DatasetSplits) else _build_source(source)
        if not isinstance(splits, DatasetSplits):
            raise AlrunError(
                "supervision.source: _target_ must build DatasetSplits, "
                f"got {type(splits).__name__}"
            )
        self.source = splits.pool
        if self.target_domain in _domains(self.source):
            raise AlrunError(
                f"supervision.source: its images include the target domain "
                f"'{self.target_domain}' (source domains: {_domains(self.source)})"
            )

    def check_data(self, splits: VisibleSplits) -> None:
        """Start-up check: the run's dataset is the target domain, with the source's classes."""
        for name, part in (("pool", splits.pool), ("test", splits.test)):
            others = [d for d in _domains(part) if d != self.target_domain]
            if others:
                raise AlrunError(
                    f"supervision.target_domain: '{self.target_domain}' but the dataset's "
                    f"{name} images come from domain(s) {_domains(part)}; the dataset must "
                    "hold the target domain only"
                )
        if tuple(self.source.classes) != tuple(splits.classes):
            raise AlrunError(
                f"supervision.source: classes {list(self.source.classes)} differ from the "
                f"dataset's {list(splits.classes)}"
            )

    @property
    def requires(self) -> frozenset[str]:
        """The EMA teacher copies the torch module; the domain classifier reads feature maps."""
        return frozenset({TEACHER, FPN_FEATURES} if self.adversarial_weight > 0 else {TEACHER})

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
        sources = [BatchSource("source", self.source)]
        target_labelled = pool.training_set()
        if self.use_target_labels and len(target_labelled):
            sources.append(BatchSource("target", target_labelled))
        # without target labels the whole target pool is unlabelled data (source-only / uda)
        ids = pool.unlabelled_ids if self.use_target_labels else pool.dataset.ids
        if not ids:
            ids = pool.dataset.ids  # every target image labelled: align on all of them
        unlabelled = pool.dataset.subset(ids, "target_unlabelled")
        sources.append(
            BatchSource(
                "target_unlabelled",
                unlabelled,
                role="unlabelled",
                batch_size=self.unlabelled_batch_size,
            )
        )
        hooks: list[TrainingHook] = []
        if self.adversarial_weight > 0:
            hooks.append(
                DomainAlignmentHook(
                    "source",
                    "target_unlabelled",
                    self.adversarial_weight,
                    self.grl_strength,
                    self.grl_ramp,
                )
            )
        if self.pseudo_weight > 0:
            hooks.append(
                PseudoLabelHook(
                    "target_unlabelled",
                    self.pseudo_threshold,
                    self.pseudo_weight,
                    "ema",
                    self.ema_decay,
                    pool.audit,
                    self.pseudo_empty,
                )
            )
        stats = train_round(
            detector, sources, schedule, seed, round_index, hooks, progress, strategy
        )
        return {**stats, "target_labels_used": float(self.use_target_labels)}
