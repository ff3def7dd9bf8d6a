"""Flip consistency on unlabelled images (CSD, Jeong et al. 2019), added to the supervised loss.

Every iteration the unlabelled batch goes through the dense head twice, as it is and mirrored;
the mirrored view's per-location outputs are mirrored back so location (y, x) of both views
looks at the same image content. At locations where the plain view sees an object (its highest
class probability >= ``match_threshold``: CSD's background elimination) the two views must agree:

* classes: symmetric Jensen-Shannon divergence of the class distributions (C + background);
* boxes: L2 between the plain view's box offsets and the mirror image of the flipped view's
  (FCOS ``(l, t, r, b)`` -> ``(r, t, l, b)``; RetinaNet ``(dx, dy, dw, dh)`` -> ``(-dx, ...)``).

Two-stage heads (Faster R-CNN; CSD's R-FCN variant): the RPN proposes boxes on the plain view
(test-time proposal counts, detached: they are inputs to the RoI head); the RoI head is run on the
plain view with those proposals and on the mirrored view with the same proposals mirrored
(``x1' = W - x2``, ``x2' = W - x1``), so proposal i of both views covers the same content. A
proposal is compared when the plain view's highest foreground probability is >= ``match_threshold``:

* classes: symmetric JS divergence of the two (C + 1)-way softmax distributions;
* boxes: L2 between the plain view's deltas and the mirrored view's with dx negated, both of the
  plain view's most probable foreground class (the box the detector would report for it).

Gradients flow through both views, as in CSD. The weight ramps up linearly over the first
``rampup`` fraction of the iterations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList

from alrun.detectors.base import FLIP_VIEWS, Detector, Progress, TrainSchedule
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
    match_threshold: float,
) -> tuple[Tensor, Tensor, int]:
    """(JS term, L2 term, matched locations) of one batch. ``*_flipped`` are already mirrored
    back (:func:`unflip_locations`); ``cls_*`` are sigmoid logits (N, C), ``box_*`` offsets (N, 4).
    Terms are 0 (with gradient) when no location is matched."""
    matched = torch.sigmoid(cls_plain.detach()).amax(dim=-1) >= match_threshold
    count = int(matched.sum())
    if count == 0:
        zero = (cls_plain.sum() + box_plain.sum()) * 0.0
        return zero, zero, 0
    p = class_distribution(cls_plain[matched])
    q = class_distribution(cls_flipped[matched])
    js = js_divergence(p, q).mean()
    l2 = (box_plain[matched] - mirror_offsets(box_flipped[matched], encoding)).pow(2).sum(-1).mean()
    return js, l2, count


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
    match_threshold: float,
) -> tuple[Tensor, Tensor, int]:
    """(JS term, L2 term, matched proposals) of a RoI head run on paired proposals (row i of the
    flipped view = proposal i mirrored). ``logits_*``: (N, C + 1) softmax logits, background in
    column 0 (torchvision); ``deltas_*``: (N, (C + 1) * 4) class-specific ``(dx, dy, dw, dh)``.
    The box term compares the deltas of the plain view's most probable foreground class."""
    probs_plain = torch.softmax(logits_plain, dim=-1)
    best, label = probs_plain.detach()[:, 1:].max(dim=-1)
    matched = best >= match_threshold
    count = int(matched.sum())
    if count == 0:
        zero = (logits_plain.sum() + deltas_plain.sum()) * 0.0
        return zero, zero, 0
    js = js_divergence(probs_plain[matched], torch.softmax(logits_flipped[matched], dim=-1)).mean()
    rows = torch.nonzero(matched).reshape(-1)
    label = label[matched] + 1  # column in the (C + 1)-way layout
    box_plain = deltas_plain.reshape(len(deltas_plain), -1, 4)[rows, label]
    box_flipped = deltas_flipped.reshape(len(deltas_flipped), -1, 4)[rows, label]
    l2 = (box_plain - mirror_offsets(box_flipped, "delta")).pow(2).sum(-1).mean()
    return js, l2, count


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
    """Flip consistency runs the head on mirrored feature maps: FCOS, RetinaNet, Faster R-CNN."""
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
        match_threshold: float = 0.3,
        rampup: float = 0.25,
    ):
        self.source = source
        self.weight = weight
        self.box_weight = box_weight
        self.match_threshold = match_threshold
        self.rampup = rampup
        self.sums = {"js": 0.0, "l2": 0.0, "matched": 0.0, "images": 0.0, "steps": 0.0}

    def before_training(self, detector: Detector, total: int) -> None:
        check_consistency_detector(detector)
        self.sums = dict.fromkeys(self.sums, 0.0)

    def extra_losses(self, step: Step) -> Mapping[str, Tensor]:
        model = step.detector.model
        batch = step.batches[self.source]
        if isinstance(model, FasterRCNN):
            logits, deltas, n_plain = two_stage_views(model, list(batch.images))
            js, l2, matched = two_stage_consistency_terms(
                logits[:n_plain],
                logits[n_plain:],
                deltas[:n_plain],
                deltas[n_plain:],
                self.match_threshold,
            )
            return self._weighted(step, js, l2, matched, len(batch.images))
        transformed, _ = model.transform(batch.images)
        x = transformed.tensors
        n = x.shape[0]
        levels = list(model.backbone(torch.cat([x, x.flip(-1)])).values())
        head = model.head(levels)
        shapes = [tuple(f.shape[-2:]) for f in levels]
        per_location = head["cls_logits"].shape[1] // sum(h * w for h, w in shapes)
        cls, box = head["cls_logits"], head["bbox_regression"]
        cls_back = unflip_locations(cls[n:], shapes, per_location)
        box_back = unflip_locations(box[n:], shapes, per_location)
        encoding = "ltrb" if isinstance(model, FCOS) else "delta"
        js, l2, matched = consistency_terms(
            cls[:n].reshape(-1, cls.shape[-1]),
            cls_back.reshape(-1, cls.shape[-1]),
            box[:n].reshape(-1, 4),
            box_back.reshape(-1, 4),
            encoding,
            self.match_threshold,
        )
        return self._weighted(step, js, l2, matched, n)

    def _weighted(
        self, step: Step, js: Tensor, l2: Tensor, matched: int, n: int
    ) -> Mapping[str, Tensor]:
        self.sums["js"] += float(js.detach())
        self.sums["l2"] += float(l2.detach())
        self.sums["matched"] += matched
        self.sums["images"] += n
        self.sums["steps"] += 1
        ramp = min(1.0, (step.index + 1) / max(1.0, self.rampup * step.total))
        weight = self.weight * ramp
        return {"js": weight * js, "l2": weight * self.box_weight * l2}

    def after_training(self) -> Mapping[str, float]:
        steps, images = self.sums["steps"], self.sums["images"]
        return {
            "weight": self.weight,
            "match_threshold": self.match_threshold,
            "matched_per_image": self.sums["matched"] / images if images else 0.0,
            "js_mean": self.sums["js"] / steps if steps else 0.0,
            "l2_mean": self.sums["l2"] / steps if steps else 0.0,
            "images": images,
        }


class FlipConsistency(BaseRegime):
    """Boxes from the oracle + CSD flip consistency on the unlabelled pool
    (``supervision=consistency``). metrics.json records ``consistency/*`` per round."""

    label_kinds = ("box",)
    requires = frozenset({FLIP_VIEWS})

    def __init__(
        self,
        weight: NonNegativeFloat = 1.0,
        box_weight: NonNegativeFloat = 1.0,
        match_threshold: Fraction = 0.3,
        rampup: Fraction = 0.25,
        unlabelled_batch_size: PositiveInt | None = None,
    ):
        self.weight = check_weight(weight, "supervision.weight")
        self.box_weight = check_weight(box_weight, "supervision.box_weight")
        self.match_threshold = check_fraction(match_threshold, "supervision.match_threshold")
        self.rampup = check_fraction(rampup, "supervision.rampup")
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
                    "unlabelled", self.weight, self.box_weight, self.match_threshold, self.rampup
                )
            )
        return train_round(
            detector, sources, schedule, seed, round_index, hooks, progress, strategy
        )
