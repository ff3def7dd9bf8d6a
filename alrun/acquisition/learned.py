"""Learned scorers: small auxiliary heads trained alongside the detector through engine hooks.

Both heads read the image embedding - the global average of every backbone/FPN level,
concatenated (what ``Detections.embedding`` holds) - so the scorer can apply them to the pool
embeddings the loop already computes. A strategy's hooks join every regime's training through
``Strategy.training_hooks`` (the loop attaches them to the detector; ``alrun.engine.train``
runs them with the regime's own hooks).

* :class:`LossPrediction` (Yoo & Kweon 2019; reference: Mephisto405/Learning-Loss-for-Active-
  Learning ``models/lossnet.py`` ``LossNet``, ``main.py`` ``LossPredLoss`` / ``train_epoch``,
  ``config.py``): a head predicting each image's detection loss, trained *during* the detector's
  training (``parameters`` + ``extra_losses``) with the margin ranking loss on pairs of the
  labelled batch. Defaults as the reference: per level GAP -> FC(128) -> ReLU, concatenated ->
  FC(1) (``head=per_level``); its gradient reaches the backbone for the first ``detach_after``
  (60 %: epoch 120 of 200) of the round's iterations, the features are detached after; a random
  ``subset`` of 10,000 pool images is ranked each round (the rest are not candidates). The
  per-image target losses come from an extra no-grad forward per image (BatchNorm statistics
  restored after). alrun's earlier choices are options: ``head=concat hidden=64`` (the
  concatenated embedding -> FC -> ReLU -> FC), ``detach_after=0`` (always detached: the detector
  trains exactly as without the head), ``subset=null`` (the whole pool), ``pairs=halves``.
  Score = predicted loss.
* :class:`FalseNegativePrediction` (Nakamura et al. 2024): a head predicting how many objects
  the detector misses in an image. Its targets need the *trained* model's detections, so it is
  fitted in ``after_training``: the labelled images seen in the round's batches are run through
  the final model, each labelled box without a same-class detection (score >= threshold,
  IoU >= 0.5, greedy in score order) counts as missed, and the head is fitted on (embedding,
  misses). Score = predicted misses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

import alrun.distributed as distributed
from alrun.acquisition.context import AcquisitionContext
from alrun.detectors.base import FEATURE_MAPS, TEACHER
from alrun.engine import Step, TrainingHook
from alrun.errors import AlrunError
from alrun.params import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, ScoreThreshold
from alrun.seeding import Purpose
from alrun.types import Needs

#: what a learned head reads of the detector: feature maps, and the torch module's backbone
#: (loss prediction) or its own post-processed detections (false negatives)
HEAD_REQUIRES = (FEATURE_MAPS, TEACHER)
LOSS_HEADS = ("per_level", "concat")
PAIRINGS = ("flip", "halves")
#: the random stream of the loss-prediction subset (``AcquisitionContext.rng``)


def _backbone(detector) -> nn.Module:
    missing = [c for c in HEAD_REQUIRES if c not in detector.capabilities]
    if missing:
        raise AlrunError(
            f"strategy.scorer: learned heads need the detector's {' and '.join(missing)}, "
            f"which {type(detector).__name__} does not declare"
        )
    return detector.feature_module()


def pooled(levels) -> Tensor:
    """The image embedding: every level's global average, concatenated (B, sum C); ``levels``
    a tensor, a dict of them (torchvision) or a tuple of them (an mmdet neck)."""
    if isinstance(levels, Tensor):
        values = [levels]
    else:
        values = list(levels.values()) if isinstance(levels, Mapping) else list(levels)
    return torch.cat([f.mean(dim=(2, 3)) for f in values], dim=1)


def _level_widths(detector) -> list[int]:
    """Channels of every feature level, in the embedding's order."""
    model = detector.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        levels = detector.features([torch.zeros((3, 64, 64), device=detector.device)])
    model.train(was_training)
    return [int(f.shape[1]) for f in levels.values()]


def _embedding_width(detector) -> int:
    return sum(_level_widths(detector))


class PerLevelHead(nn.Module):
    """Yoo & Kweon's loss-prediction module (the reference ``LossNet``) on pooled levels: each
    level's global average -> FC(``hidden``) -> ReLU, concatenated -> FC(1). Reads the image
    embedding (every level's average, concatenated) and splits it by ``widths``."""

    def __init__(self, widths: Sequence[int], hidden: int = 128):
        super().__init__()
        self.widths = [int(w) for w in widths]
        self.levels = nn.ModuleList(nn.Linear(w, hidden) for w in self.widths)
        self.out = nn.Linear(hidden * len(self.widths), 1)

    def forward(self, embedding: Tensor) -> Tensor:
        parts = torch.split(embedding, self.widths, dim=1)
        hidden = [torch.relu(fc(x)) for fc, x in zip(self.levels, parts)]
        return self.out(torch.cat(hidden, dim=1))


def _head(width: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def _summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    tenth = max(1, len(values) // 10)
    return {
        "first_loss": sum(values[:tenth]) / tenth,
        "final_loss": sum(values[-tenth:]) / tenth,
        "updates": float(len(values)),
    }


def margin_ranking(
    pred: Tensor, target: Tensor, margin: float, pairs: str = "flip"
) -> Tensor | None:
    """Yoo & Kweon's ranking loss ``mean max(0, m - one * (p_i - p_j))`` over pairs of a batch.

    ``flip`` (the reference ``LossPredLoss``): pairs (i, B-1-i) for i < B/2, ``one`` = +1 when
    ``l_i - l_j > 0`` else -1 (a tie counts as -1); ``halves`` (alrun's earlier): pairs
    (i, i + B/2), ``one = sign(l_i - l_j)`` (a tie counts 0). Targets are detached."""
    half = len(pred) // 2
    if half == 0:
        return None
    target = target.detach()
    if pairs == "flip":
        diff, wanted = (pred - pred.flip(0))[:half], (target - target.flip(0))[:half]
        one = 2 * torch.sign(torch.clamp(wanted, min=0)) - 1
    else:
        diff = pred[:half] - pred[half : 2 * half]
        one = torch.sign(target[:half] - target[half : 2 * half])
    return torch.clamp(margin - one * diff, min=0).mean()


class LossPredictionHook(TrainingHook):
    """Trains the loss-prediction head with the detector (see the module docstring)."""

    name = "loss_prediction"
    requires = HEAD_REQUIRES

    def __init__(
        self,
        hidden: int = 128,
        margin: float = 1.0,
        weight: float = 1.0,
        head: str = "per_level",
        detach_after: float = 0.6,
        pairs: str = "flip",
    ):
        self.hidden, self.margin, self.weight = int(hidden), float(margin), float(weight)
        self.kind, self.detach_after, self.pairs = head, float(detach_after), pairs
        self.head: nn.Module | None = None
        self.losses: list[float] = []
        self.steps_with_gradient = 0
        # each micro-batch's (ranking loss or None, whether it reaches the backbone)
        self._step = distributed.StepNotes()
        self._captured: list[Tensor] = []
        self._capturing = True
        self._handle = None

    def before_training(self, detector, total: int) -> None:
        backbone = _backbone(detector)
        self.detector = detector
        if self.kind == "per_level":
            self.head = PerLevelHead(_level_widths(detector), self.hidden)
        else:
            self.head = _head(_embedding_width(detector), self.hidden)
        self.head = self.head.to(detector.device)
        self.losses = []
        self.steps_with_gradient = 0
        self._step.clear()
        self._captured = []
        if self._handle is not None:
            self._handle.remove()
        self._handle = backbone.register_forward_hook(self._capture)

    def _capture(self, _module, _inputs, output) -> None:
        if self._capturing:  # with its graph: detached in extra_losses once past detach_after
            self._captured.append(pooled(output))

    def parameters(self) -> Sequence[Tensor]:
        return list(self.head.parameters()) if self.head is not None else []

    def reaches_backbone(self, index: int, total: int) -> bool:
        """The reference stops the module's gradient into the backbone after epoch 120 of 200:
        here after the first ``detach_after`` of the round's iterations."""
        return index < round(self.detach_after * total)

    def extra_losses(self, step: Step) -> dict[str, Tensor]:
        captured, self._captured = self._captured, []  # this micro-batch's (trainer.accumulate)
        batch = next((b for b in step.batches.values() if b.targets is not None), None)
        if batch is None or not captured or len(batch.images) < 2:
            return {}
        features = captured[0]  # the forward of the first source with targets
        reaches = self.reaches_backbone(step.index, step.total)
        if not reaches:
            features = features.detach()
        target = self._per_image_losses(batch.images, batch.targets)
        loss = margin_ranking(self.head(features).squeeze(1), target, self.margin, self.pairs)
        self._step.note((None if loss is None else float(loss.detach()), reaches))
        if loss is None:
            return {}
        return {"ranking": loss * self.weight}

    def _per_image_losses(self, images, targets) -> Tensor:
        # BatchNorm running statistics: the extra forwards update copies, and the originals
        # (which the step's autograd graph holds) are put back untouched
        saved = [
            (m, name, buf)
            for m in self.detector.model.modules()
            for name, buf in m._buffers.items()
            if buf is not None
        ]
        for m, name, buf in saved:
            m._buffers[name] = buf.clone()
        # one image at a time: BatchNorm layers use their running statistics (a batch of one
        # image with 1x1 maps, as in SSDlite's extra layers, has no batch statistics)
        norms = [
            m
            for m in self.detector.model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        ]
        self._capturing = False
        try:
            for m in norms:
                m.eval()
            with torch.no_grad():
                values = [
                    sum(self.detector.losses([im], [t]).values()) for im, t in zip(images, targets)
                ]
        finally:
            self._capturing = True
            for m in norms:
                m.train()
            for m, name, buf in saved:
                m._buffers[name] = buf
        return torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values]).to(
            self.detector.device
        )

    def after_step(self, step: Step) -> None:
        self._captured = []
        for loss, reaches in self._step.drain():
            if loss is not None:
                self.losses.append(loss)
            self.steps_with_gradient += reaches

    def after_training(self) -> dict[str, float]:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._captured = []
        summary = _summary(self.losses)
        return (
            {**summary, "steps_with_gradient": float(self.steps_with_gradient)} if summary else {}
        )


def missed_counts(
    detections: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    score_threshold: float,
    iou_threshold: float = 0.5,
) -> Tensor:
    """Per image: labelled boxes with no same-class detection (score >= threshold, IoU >=
    ``iou_threshold``), matching greedily in score order, one box per detection."""
    out = []
    for det, tgt in zip(detections, targets):
        gt_boxes, gt_labels = tgt["boxes"], tgt["labels"]
        keep = det["scores"] >= score_threshold
        boxes, labels, scores = det["boxes"][keep], det["labels"][keep], det["scores"][keep]
        found = torch.zeros(len(gt_labels), dtype=torch.bool)
        if len(boxes) and len(gt_labels):
            iou = box_iou(boxes.float(), gt_boxes.float())
            for d in torch.argsort(scores, descending=True, stable=True).tolist():
                free = torch.where((gt_labels == labels[d]) & ~found, iou[d], 0.0)
                if float(free.max()) >= iou_threshold:
                    found[int(free.argmax())] = True
        out.append(float((~found).sum()))
    return torch.tensor(out)


class FalseNegativeHook(TrainingHook):
    """Fits the missed-objects head on the round's final model (see the module docstring)."""

    name = "fn_prediction"
    requires = HEAD_REQUIRES

    def __init__(
        self,
        hidden: int = 64,
        score_threshold: float = 0.5,
        fit_steps: int = 200,
        lr: float = 0.01,
        max_images: int = 1024,
    ):
        self.hidden = int(hidden)
        self.score_threshold = float(score_threshold)
        self.fit_steps = int(fit_steps)
        self.lr = float(lr)
        self.max_images = int(max_images)
        self.head: nn.Module | None = None
        self.losses: list[float] = []
        self.seen: dict[str, tuple[Tensor, dict[str, Tensor]]] = {}
        self._step = distributed.StepNotes()  # each micro-batch's (image id, image, target)

    def before_training(self, detector, total: int) -> None:
        _backbone(detector)
        self.detector = detector
        self.seen = {}
        self._step.clear()
        self.losses = []

    def extra_losses(self, step: Step) -> Mapping[str, Tensor]:
        """No loss: notes each micro-batch's labelled images (``trainer.accumulate``)."""
        batch = next((b for b in step.batches.values() if b.source.role == "labelled"), None)
        if batch is not None and batch.targets is not None and len(self.seen) < self.max_images:
            for image_id, image, target in zip(batch.image_ids, batch.images, batch.targets):
                self._step.note(
                    (image_id, image.detach(), {k: v.detach() for k, v in target.items()})
                )
        return {}

    def after_step(self, step: Step) -> None:
        for image_id, image, target in self._step.drain(device=self.detector.device):
            if len(self.seen) >= self.max_images:
                break
            if image_id not in self.seen:  # (a flipped view comes with flipped boxes)
                self.seen[image_id] = (image, target)

    def after_training(self) -> dict[str, float]:
        if not self.seen:
            return {}
        model = self.detector.model
        teacher = self.detector.teacher_module()  # torchvision-style post-processed boxes
        images = [im for im, _ in self.seen.values()]
        targets = [t for _, t in self.seen.values()]
        offset = int(self.detector.label_offset)
        model.eval()
        with torch.no_grad():
            features, detections = [], []
            for start in range(0, len(images), 16):
                chunk = images[start : start + 16]
                features.append(pooled(self.detector.features(chunk)))
                for det in teacher(chunk):
                    detections.append({**det, "labels": det["labels"] - offset})
        model.train()
        x = torch.cat(features).float()
        y = missed_counts(
            [{k: v.cpu() for k, v in d.items()} for d in detections],
            [{k: v.cpu() for k, v in t.items()} for t in targets],
            self.score_threshold,
        ).to(x.device)
        self.head = _head(x.shape[1], self.hidden).to(x.device)
        optimiser = torch.optim.Adam(self.head.parameters(), lr=self.lr)
        self.losses = []
        with torch.enable_grad():
            for _ in range(self.fit_steps):
                loss = torch.nn.functional.mse_loss(self.predict(x), y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                self.losses.append(float(loss.detach()))
        return {**_summary(self.losses), "mean_missed": float(y.mean()), "images": len(y)}

    def predict(self, embeddings: Tensor) -> Tensor:
        """Predicted misses (>= 0) from image embeddings."""
        return torch.nn.functional.softplus(self.head(embeddings).squeeze(1))


class _HeadScorer:
    """Scores pool images with a hook's trained head applied to their embeddings."""

    needs = Needs(detections=False, embedding=True)
    label = "head"

    def __init__(self, hook: TrainingHook):
        self.hook = hook

    @property
    def training_hooks(self) -> tuple[TrainingHook, ...]:
        return (self.hook,)

    def _apply(self, embeddings: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        if self.hook.head is None:
            raise AlrunError(
                f"strategy.scorer: the {self.label} head has not been trained (its training "
                "hook did not run: is the detector a torchvision one?)"
            )
        if context.preds is None or context.preds.embeddings is None:
            raise AlrunError(f"strategy.scorer: {self.label} needs pool image embeddings")
        head = self.hook.head
        device = next(head.parameters()).device
        with torch.no_grad():
            scores = self._apply(context.preds.embeddings.float().to(device)).cpu()
        values = scores.tolist()
        for image_id, value in zip(context.preds.image_ids, values):
            if math.isnan(value):
                raise AlrunError(
                    f"strategy.scorer: {self.label} head gave NaN for image '{image_id}' "
                    "(diverged head?)"
                )
        return dict(zip(context.preds.image_ids, values))


class LossPrediction(_HeadScorer):
    """Score = the loss the head predicts for the image (Yoo & Kweon 2019); see the module
    docstring for the reference defaults and alrun's earlier choices."""

    label = "loss prediction"

    def __init__(
        self,
        hidden: PositiveInt = 128,
        margin: NonNegativeFloat = 1.0,
        weight: PositiveFloat = 1.0,
        head: Literal[LOSS_HEADS] = "per_level",
        detach_after: Fraction = 0.6,
        subset: PositiveInt | None = 10_000,
        pairs: Literal[PAIRINGS] = "flip",
    ):
        for key, value, allowed in (("head", head, LOSS_HEADS), ("pairs", pairs, PAIRINGS)):
            if value not in allowed:
                raise AlrunError(f"strategy.scorer.{key}: expected one of {allowed}, got {value!r}")
        if not 0 <= detach_after <= 1:
            raise AlrunError(
                f"strategy.scorer.detach_after: expected a fraction of the round in [0, 1], got "
                f"{detach_after}"
            )
        if subset is not None and (isinstance(subset, bool) or int(subset) < 1):
            raise AlrunError(f"strategy.scorer.subset: expected >= 1 or null, got {subset!r}")
        super().__init__(LossPredictionHook(hidden, margin, weight, head, detach_after, pairs))
        self.subset = None if subset is None else int(subset)

    def _apply(self, embeddings: Tensor) -> Tensor:
        return self.hook.head(embeddings).squeeze(1)

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        """The reference ranks a random subset of ``subset`` pool images (seeded by
        ``(seed, round)``); the others get no score and are not selected this round."""
        scores = super().__call__(context)
        if self.subset is None or len(scores) <= self.subset:
            return scores
        ordered = sorted(scores)
        drawn = context.rng(Purpose.LOSS_SUBSET).choice(len(ordered), self.subset, replace=False)
        return {ordered[i]: scores[ordered[i]] for i in sorted(drawn.tolist())}

    def describe(self) -> dict[str, Any]:
        h = self.hook
        return {
            "scorer": "loss_prediction",
            "margin": h.margin,
            "loss_weight": h.weight,
            "head": h.kind,
            "hidden": h.hidden,
            "detach_after": h.detach_after,
            "subset": self.subset,
            "pairs": h.pairs,
        }


class FalseNegativePrediction(_HeadScorer):
    """Score = the number of objects the head predicts the detector misses (Nakamura et al.)."""

    label = "false-negative prediction"

    def __init__(
        self,
        hidden: PositiveInt = 64,
        score_threshold: ScoreThreshold = 0.5,
        fit_steps: PositiveInt = 200,
        lr: PositiveFloat = 0.01,
        max_images: PositiveInt = 1024,
    ):
        super().__init__(FalseNegativeHook(hidden, score_threshold, fit_steps, lr, max_images))

    def _apply(self, embeddings: Tensor) -> Tensor:
        return self.hook.predict(embeddings)

    def describe(self) -> dict[str, Any]:
        return {"scorer": "fn_prediction", "score_threshold": self.hook.score_threshold}
