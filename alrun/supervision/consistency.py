"""Flip consistency on unlabelled images (CSD, Jeong et al. 2019), added to the supervised loss.

Every iteration the unlabelled batch goes through the dense head twice, as it is and mirrored;
the mirrored view's per-location outputs are mirrored back so location (y, x) of both views
looks at the same image content. At locations where the plain view sees an object the two views
must agree. The defaults follow CSD's reference code (soo89/CSD-SSD ``train_csd.py``, the
consistency block of ``train()`` and ``rampweight``):

* which locations (``match``): ``beats_background``, the plain view's most probable foreground
  class beats its background probability (CSD's background elimination); alrun's earlier rule,
  ``threshold``, compares where the highest foreground probability is >= ``match_threshold``;
* classes (``class_divergence``): ``symmetric_kl``, (KL(p||q) + KL(q||p)) / 2 where each KL's
  target is detached (CSD's two ``KLDivLoss`` calls, halved), or ``js``, the Jensen-Shannon
  divergence with gradients through both views;
* boxes (``box_term``): ``mean`` over the 4 offsets of the squared difference between the plain
  view's offsets and the mirror image of the flipped view's (CSD divides the 4 per-coordinate
  means by 4), or ``sum`` over them (alrun's earlier choice: 4x larger). Mirrored offsets:
  FCOS ``(l, t, r, b)`` -> ``(r, t, l, b)``; RetinaNet / Faster R-CNN ``(dx, dy, dw, dh)`` ->
  ``(-dx, dy, dw, dh)``;
* weight over the round (``ramp``): ``gaussian``, CSD's exp(-5 (1 - t / rampup)^2) up to
  ``rampup`` of the round (32k of 120k iterations) and exp(-12.5 (1 - (1 - t) / rampdown)^2)
  over its last ``rampdown`` (20k of 120k), 0 at the first iteration; or ``linear`` up over
  ``rampup`` (alrun's earlier choice, with ``rampdown: 0``).

The distribution of a sigmoid head (FCOS, RetinaNet) is ``softmax([logits, 0])`` (background
last), so ``beats_background`` there means a foreground logit above 0.

Two-stage heads (Faster R-CNN; CSD's R-FCN variant): the RPN proposes boxes on the plain view
(test-time proposal counts, detached: they are inputs to the RoI head); the RoI head is run on the
plain view with those proposals and on the mirrored view with the same proposals mirrored
(``x1' = W - x2``, ``x2' = W - x1``), so proposal i of both views covers the same content. The
same rules compare the two (C + 1)-way softmax distributions and the deltas of the plain view's
most probable foreground class (the box the detector would report for it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList

import alrun.distributed as distributed
from alrun.detectors.base import (
    FLIP_VIEWS,
    Detector,
    FlipViewOutputs,
    FlipViews,
    Progress,
    RoIFlipViewOutputs,
    TrainSchedule,
)
from alrun.engine import NO_STRATEGY_TRAINING, Step, StrategyTraining, TrainingHook, train_round
from alrun.errors import AlrunError
from alrun.params import Fraction, NonNegativeFloat, PositiveInt
from alrun.pool import LabelPool
from alrun.supervision.base import BaseRegime
from alrun.supervision.pseudo_label import (
    check_fraction,
    check_weight,
    dense_model,
    labelled_and_unlabelled_sources,
)

_EPS = 1e-8
_CSD_EPS = 1e-7  # CSD adds 1e-7 to both distributions before the KL terms

CLASS_DIVERGENCES = ("symmetric_kl", "js")
BOX_TERMS = ("mean", "sum")
MATCH_RULES = ("beats_background", "threshold")
RAMPS = ("gaussian", "linear")
#: CSD's ramp (train_csd.py rampweight): up to iteration 32,000 and down from 100,000 of 120,000
CSD_RAMPUP = 32_000 / 120_000
CSD_RAMPDOWN = 20_000 / 120_000


@dataclass(frozen=True)
class ConsistencyRule:
    """Which locations are compared and how (see the module docstring); the defaults are CSD's."""

    class_divergence: str = "symmetric_kl"
    box_term: str = "mean"
    match: str = "beats_background"
    match_threshold: float = 0.3  # used by match="threshold" only


#: alrun's choices before issue 19 (true JS, box term summed, sigmoid >= 0.3), for comparison
ALRUN_RULE = ConsistencyRule("js", "sum", "threshold", 0.3)


def csd_symmetric_kl(p: Tensor, q: Tensor) -> Tensor:
    """Per row (KL(q'||p) + KL(p'||q)) / 2, the primes detached targets: CSD's two
    ``KLDivLoss(log(x + 1e-7), y.detach() + 1e-7)`` terms summed over classes, halved."""
    p, q = p + _CSD_EPS, q + _CSD_EPS
    kl_q_p = (q.detach() * (q.detach().log() - p.log())).sum(dim=-1)
    kl_p_q = (p.detach() * (p.detach().log() - q.log())).sum(dim=-1)
    return 0.5 * (kl_q_p + kl_p_q)


def class_divergence(p: Tensor, q: Tensor, kind: str) -> Tensor:
    """Mean over rows of ``kind`` between the class distributions ``p`` and ``q`` (N, K)."""
    if kind == "js":
        return js_divergence(p, q).mean()
    return csd_symmetric_kl(p, q).mean()


def box_difference(plain: Tensor, mirrored_back: Tensor, kind: str) -> Tensor:
    """Mean over rows of the squared offset differences, averaged (CSD) or summed over the 4."""
    squared = (plain - mirrored_back).pow(2)
    return (squared.mean(-1) if kind == "mean" else squared.sum(-1)).mean()


def matched_rows(probs: Tensor, background: int, rule: ConsistencyRule) -> Tensor:
    """Rows (N,) of (N, C + 1) distributions where the plain view sees an object (no gradient):
    the best foreground class beats the background (CSD) or reaches ``match_threshold``."""
    probs = probs.detach()
    foreground = torch.cat([probs[:, :background], probs[:, background + 1 :]], dim=1)
    best = foreground.amax(dim=1) if foreground.shape[1] else probs.new_zeros(len(probs))
    if rule.match == "beats_background":
        return best > probs[:, background]
    return best >= rule.match_threshold


def ramp_weight(kind: str, index: int, total: int, rampup: float, rampdown: float) -> float:
    """The consistency weight's factor at iteration ``index`` (0-based) of ``total``.

    ``gaussian``: CSD's ``rampweight`` with its 32k / 100k / 120k iterations as fractions
    ``rampup`` / ``1 - rampdown`` / 1 of the round; ``linear``: (index + 1) / (rampup x total),
    capped at 1, and a linear ramp-down over the last ``rampdown``."""
    t = index / max(1, total)
    if kind == "linear":
        up = min(1.0, (index + 1) / max(1.0, rampup * total))
        down = min(1.0, (1 - t) / rampdown) if rampdown > 0 else 1.0
        return up * down
    if index == 0:
        return 0.0
    if t < rampup:
        return math.exp(-5 * (1 - t / rampup) ** 2)
    if rampdown > 0 and t > 1 - rampdown:
        return math.exp(-12.5 * (1 - (1 - t) / rampdown) ** 2)
    return 1.0


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence between rows of ``p`` and ``q`` (N, K) (natural log, in
    [0, ln 2]): the mean of KL(p || m) and KL(q || m) with m = (p + q) / 2; symmetric."""
    m = 0.5 * (p + q)
    kl_pm = (p * (torch.log(p + _EPS) - torch.log(m + _EPS))).sum(dim=-1)
    kl_qm = (q * (torch.log(q + _EPS) - torch.log(m + _EPS))).sum(dim=-1)
    return 0.5 * (kl_pm + kl_qm)


def mirror_offsets(offsets: Tensor, encoding: str) -> Tensor:
    """Box offsets of a mirrored image as the un-mirrored image's: ``ltrb`` swaps left and
    right distances (FCOS), ``delta`` negates dx (RetinaNet / Faster R-CNN box coders)."""
    if encoding == "ltrb":
        return offsets[..., [2, 1, 0, 3]]
    if encoding == "delta":
        return offsets * offsets.new_tensor([-1.0, 1.0, 1.0, 1.0])
    raise ValueError(f"unknown box encoding {encoding!r}")


def unflip_locations(
    outputs: Tensor, level_shapes: Sequence[tuple[int, int]], anchors_per_location: int
) -> Tensor:
    """(B, sum H*W*A, K) per-location outputs of mirrored images, mirrored back along x so row
    i looks at the same image content as row i of the plain view (torchvision's H, W, A order)."""
    parts, start = [], 0
    for h, w in level_shapes:
        n = h * w * anchors_per_location
        level = outputs[:, start : start + n]
        level = level.reshape(outputs.shape[0], h, w, anchors_per_location, -1).flip(2)
        parts.append(level.reshape(outputs.shape[0], n, -1))
        start += n
    return torch.cat(parts, dim=1)


def class_distribution(logits: Tensor) -> Tensor:
    """Sigmoid-head logits (..., C) -> a C + 1 distribution ``softmax([logits, 0])``
    (background last, as alrun's ``Detections.probs`` for dense heads)."""
    return torch.softmax(torch.cat([logits, torch.zeros_like(logits[..., :1])], dim=-1), dim=-1)


def consistency_terms(
    cls_plain: Tensor,
    cls_flipped: Tensor,
    box_plain: Tensor,
    box_flipped: Tensor,
    encoding: str,
    rule: ConsistencyRule = ConsistencyRule(),
) -> tuple[Tensor, Tensor, int]:
    """(class term, box term, matched locations) of one batch. ``*_flipped`` are already
    mirrored back (:func:`unflip_locations`); ``cls_*`` are sigmoid logits (N, C), ``box_*``
    offsets (N, 4). Terms are 0 (with gradient) when no location is matched."""
    p_all = class_distribution(cls_plain)
    matched = matched_rows(p_all, cls_plain.shape[-1], rule)
    count = int(matched.sum())
    if count == 0:
        zero = (cls_plain.sum() + box_plain.sum()) * 0.0
        return zero, zero, 0
    q = class_distribution(cls_flipped[matched])
    cls_term = class_divergence(p_all[matched], q, rule.class_divergence)
    back = mirror_offsets(box_flipped[matched], encoding)
    return cls_term, box_difference(box_plain[matched], back, rule.box_term), count


def mirror_boxes(boxes: Tensor, width: float) -> Tensor:
    """(N, 4) ``x1, y1, x2, y2`` boxes of an image ``width`` pixels wide, as boxes of its mirror
    image (``x1' = W - x2``, ``x2' = W - x1``: torchvision's horizontal-flip convention)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


def two_stage_consistency_terms(
    logits_plain: Tensor,
    logits_flipped: Tensor,
    deltas_plain: Tensor,
    deltas_flipped: Tensor,
    rule: ConsistencyRule = ConsistencyRule(),
) -> tuple[Tensor, Tensor, int]:
    """(class term, box term, matched proposals) of a RoI head run on paired proposals (row i of
    the flipped view = proposal i mirrored). ``logits_*``: (N, C + 1) softmax logits, background
    in column 0 (torchvision); ``deltas_*``: (N, (C + 1) * 4) class-specific ``(dx, dy, dw, dh)``.
    The box term compares the deltas of the plain view's most probable foreground class."""
    probs_plain = torch.softmax(logits_plain, dim=-1)
    matched = matched_rows(probs_plain, 0, rule)
    count = int(matched.sum())
    if count == 0:
        zero = (logits_plain.sum() + deltas_plain.sum()) * 0.0
        return zero, zero, 0
    q = torch.softmax(logits_flipped[matched], dim=-1)
    cls_term = class_divergence(probs_plain[matched], q, rule.class_divergence)
    rows = torch.nonzero(matched).reshape(-1)
    label = probs_plain.detach()[matched, 1:].argmax(dim=-1) + 1  # column in the C + 1 layout
    box_plain = deltas_plain.reshape(len(deltas_plain), -1, 4)[rows, label]
    box_flipped = deltas_flipped.reshape(len(deltas_flipped), -1, 4)[rows, label]
    back = mirror_offsets(box_flipped, "delta")
    return cls_term, box_difference(box_plain, back, rule.box_term), count


def flip_within_sizes(images: ImageList) -> Tensor:
    """The batch tensor with each image mirrored inside its own (h, w) (padding stays put), so
    the mirrored view of a box is :func:`mirror_boxes` with that image's width."""
    flipped = images.tensors.clone()
    for i, (h, w) in enumerate(images.image_sizes):
        flipped[i, :, :h, :w] = images.tensors[i, :, :h, :w].flip(-1)
    return flipped


@torch.no_grad()
def plain_view_proposals(model: FasterRCNN, images: ImageList, features: dict) -> list[Tensor]:
    """The RPN's proposals as at inference (test-time top-n and NMS; no targets, no gradient)."""
    rpn, was_training = model.rpn, model.rpn.training
    rpn.eval()
    try:
        proposals, _ = rpn(images, features)
    finally:
        rpn.train(was_training)
    return [p.detach() for p in proposals]


def two_stage_views(model: FasterRCNN, images: list[Tensor]) -> tuple[Tensor, Tensor, int]:
    """RoI-head outputs ``(class_logits, box_regression)`` of the plain and mirrored views,
    stacked (plain rows first, then the same proposals mirrored in the same order), and the
    number of plain rows."""
    transformed, _ = model.transform(images)
    n, sizes = len(images), list(transformed.image_sizes)
    both = ImageList(torch.cat([transformed.tensors, flip_within_sizes(transformed)]), sizes * 2)
    features = model.backbone(both.tensors)
    plain_features = {k: v[:n] for k, v in features.items()}
    proposals = plain_view_proposals(model, transformed, plain_features)
    mirrored = [mirror_boxes(p, float(w)) for p, (_, w) in zip(proposals, sizes)]
    heads = model.roi_heads
    pooled = heads.box_roi_pool(features, proposals + mirrored, both.image_sizes)
    class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
    return class_logits, box_regression, sum(len(p) for p in proposals)


def check_consistency_detector(detector: Detector) -> None:
    """Flip consistency runs the head on mirrored feature maps: FCOS, RetinaNet, Faster R-CNN,
    or any detector that gives them itself (``FlipViews``, e.g. mmdet RetinaNet)."""
    if isinstance(detector, FlipViews):
        return
    model = dense_model(detector, "supervision=consistency")
    if not isinstance(model, (FCOS, RetinaNet, FasterRCNN)):
        raise AlrunError(
            "supervision=consistency: needs a dense head (FCOS or RetinaNet, e.g. "
            "detector=tiny_fcos) or a two-stage one (Faster R-CNN), got "
            f"{type(model).__name__}"
        )


class FlipConsistencyHook(TrainingHook):
    """CSD flip-consistency losses on the batch of ``source`` (images only)."""

    name = "consistency"

    def __init__(
        self,
        source: str,
        weight: float = 1.0,
        box_weight: float = 1.0,
        rule: ConsistencyRule = ConsistencyRule(),
        ramp: str = "gaussian",
        rampup: float = CSD_RAMPUP,
        rampdown: float = CSD_RAMPDOWN,
    ):
        self.source = source
        self.weight = weight
        self.box_weight = box_weight
        self.rule = rule
        self.ramp = ramp
        self.rampup = rampup
        self.rampdown = rampdown
        self.sums = {"class": 0.0, "box": 0.0, "matched": 0.0, "images": 0.0, "steps": 0.0}
        self.ramp_sum = 0.0

    def before_training(self, detector: Detector, total: int) -> None:
        check_consistency_detector(detector)
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.ramp_sum = 0.0

    def extra_losses(self, step: Step) -> Mapping[str, Tensor]:
        batch = step.batches[self.source]
        if isinstance(step.detector, FlipViews):
            views = step.detector.flip_view_outputs(list(batch.images))
            if isinstance(views, RoIFlipViewOutputs):  # a two-stage head (mmdet Faster R-CNN)
                logits, deltas, p = views.logits, views.deltas, views.plain
                cls_term, box_term, matched = two_stage_consistency_terms(
                    logits[:p], logits[p:], deltas[:p], deltas[p:], self.rule
                )
                return self._weighted(step, cls_term, box_term, matched, len(batch.images))
            return self._dense(step, views)
        model = step.detector.model
        if isinstance(model, FasterRCNN):
            logits, deltas, n_plain = two_stage_views(model, list(batch.images))
            cls_term, box_term, matched = two_stage_consistency_terms(
                logits[:n_plain], logits[n_plain:], deltas[:n_plain], deltas[n_plain:], self.rule
            )
            return self._weighted(step, cls_term, box_term, matched, len(batch.images))
        transformed, _ = model.transform(batch.images)
        x = transformed.tensors
        levels = list(model.backbone(torch.cat([x, x.flip(-1)])).values())
        head = model.head(levels)
        shapes = tuple(tuple(f.shape[-2:]) for f in levels)
        per_location = head["cls_logits"].shape[1] // sum(h * w for h, w in shapes)
        encoding = "ltrb" if isinstance(model, FCOS) else "delta"
        views = FlipViewOutputs(
            head["cls_logits"], head["bbox_regression"], shapes, per_location, encoding
        )
        return self._dense(step, views)

    def _dense(self, step: Step, views: FlipViewOutputs) -> Mapping[str, Tensor]:
        """CSD's terms between the plain view and the mirrored one, mirrored back."""
        cls, box = views.cls, views.box
        n = cls.shape[0] // 2
        cls_back = unflip_locations(cls[n:], list(views.shapes), views.per_location)
        box_back = unflip_locations(box[n:], list(views.shapes), views.per_location)
        cls_term, box_term, matched = consistency_terms(
            cls[:n].reshape(-1, cls.shape[-1]),
            cls_back.reshape(-1, cls.shape[-1]),
            box[:n].reshape(-1, 4),
            box_back.reshape(-1, 4),
            views.encoding,
            self.rule,
        )
        return self._weighted(step, cls_term, box_term, matched, n)

    def _weighted(
        self, step: Step, cls_term: Tensor, box_term: Tensor, matched: int, n: int
    ) -> Mapping[str, Tensor]:
        self.sums["class"] += float(cls_term.detach())
        self.sums["box"] += float(box_term.detach())
        self.sums["matched"] += matched
        self.sums["images"] += n
        self.sums["steps"] += 1
        ramp = ramp_weight(self.ramp, step.index, step.total, self.rampup, self.rampdown)
        self.ramp_sum += ramp
        weight = self.weight * ramp
        return {"class": weight * cls_term, "box": weight * self.box_weight * box_term}

    def after_training(self) -> Mapping[str, float]:
        # every device's micro-batches (several devices: each summed only its own)
        keys = list(self.sums)
        totals = distributed.sum_over_ranks([*(self.sums[k] for k in keys), self.ramp_sum])
        sums, ramp_sum = dict(zip(keys, totals)), totals[-1]
        steps, images = sums["steps"], sums["images"]
        return {
            "weight": self.weight,
            "matched_per_image": sums["matched"] / images if images else 0.0,
            "class_mean": sums["class"] / steps if steps else 0.0,
            "box_mean": sums["box"] / steps if steps else 0.0,
            "ramp_mean": ramp_sum / steps if steps else 0.0,
            "images": images,
        }


class FlipConsistency(BaseRegime):
    """Boxes from the oracle + CSD flip consistency on the unlabelled pool
    (``supervision=consistency``). metrics.json records ``consistency/*`` per round.

    CSD's computation is the default; ``class_divergence=js box_term=sum match=threshold
    ramp=linear rampup=0.25 rampdown=0`` is alrun's earlier one (:data:`ALRUN_RULE`)."""

    label_kinds = ("box",)
    requires = frozenset({FLIP_VIEWS})

    def __init__(
        self,
        weight: NonNegativeFloat = 1.0,
        box_weight: NonNegativeFloat = 1.0,
        class_divergence: Literal[CLASS_DIVERGENCES] = "symmetric_kl",
        box_term: Literal[BOX_TERMS] = "mean",
        match: Literal[MATCH_RULES] = "beats_background",
        match_threshold: Fraction | None = None,
        ramp: Literal[RAMPS] = "gaussian",
        rampup: Fraction = CSD_RAMPUP,
        rampdown: Fraction = CSD_RAMPDOWN,
        unlabelled_batch_size: PositiveInt | None = None,
    ):
        self.weight = check_weight(weight, "supervision.weight")
        self.box_weight = check_weight(box_weight, "supervision.box_weight")
        for key, value, allowed in (
            ("class_divergence", class_divergence, CLASS_DIVERGENCES),
            ("box_term", box_term, BOX_TERMS),
            ("match", match, MATCH_RULES),
            ("ramp", ramp, RAMPS),
        ):
            if value not in allowed:
                raise AlrunError(f"supervision.{key}: expected one of {allowed}, got {value!r}")
        if match_threshold is not None and match != "threshold":
            raise AlrunError(
                "supervision.match_threshold: only with supervision.match=threshold "
                f"(match={match} compares foreground with background); got {match_threshold}"
            )
        threshold = 0.3 if match_threshold is None else match_threshold
        self.rule = ConsistencyRule(
            class_divergence,
            box_term,
            match,
            check_fraction(threshold, "supervision.match_threshold"),
        )
        self.ramp = ramp
        self.rampup = check_fraction(rampup, "supervision.rampup")
        self.rampdown = check_fraction(rampdown, "supervision.rampdown")
        if self.rampup + self.rampdown > 1 + 1e-9:
            raise AlrunError(
                f"supervision.rampup + supervision.rampdown: the ramps are fractions of a "
                f"round's iterations and must fit in it (sum <= 1), got {rampup:g} + "
                f"{rampdown:g}"
            )
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
            hooks.append(
                FlipConsistencyHook(
                    "unlabelled",
                    self.weight,
                    self.box_weight,
                    self.rule,
                    self.ramp,
                    self.rampup,
                    self.rampdown,
                )
            )
        return train_round(
            detector, sources, schedule, seed, round_index, hooks, progress, strategy
        )
