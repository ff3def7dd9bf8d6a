"""ComPAS: box-level acquisition, ranking predicted boxes across the whole pool.

BLAD's ComPAS (Lyu et al., "Box-Level Active Detection", CVPR 2023, github.com/lyumengyao/blad):
a teacher's confident boxes are scored by how much the model disagrees with the teacher on them,
``score_cls`` (the model's classification loss against the teacher's class,
``MixedTeacher.compute_active_scores``) and ``score_reg`` (the spread of the boxes regressed for
that object, relative to its size, ``MixedTeacher.compute_uncertainty_with_aug``); each score is
min-max normalised over the pool and the box's value is their product
(``ComPASMiningAlgorithm.value``, weights ``score_cls=1, score_reg=1``). Boxes are asked in
decreasing value until the budget is spent (``ComPASMiningAlgorithm.mining``,
:func:`plan_queries`); an image is labelled only in the regions asked.

alrun's committee (deviations named in docs/methods.md): the *teacher* is the model on the plain
image, the *students* are the model on test-time views (``views``; BLAD: the student on 10
strong augmentations against a mean teacher on weak ones). Per teacher box and view,
``score_cls`` sums ``-log p(teacher class)`` over the view's boxes overlapping it by IoU >=
``match_iou`` (BLAD sums the RoI classification loss over the proposals assigned to it); a view
that misses the box counts ``-log(miss_prob)``; views are averaged (BLAD: ``nanmean`` over its
augmentations). ``score_reg`` is the standard deviation of the teacher box and each view's best
match, over their mean width / height, averaged over the 4 coordinates (BLAD: the same relative
std over 10 jittered proposals re-regressed by the RoI head, which a dense detector lacks).
One query per region: teacher boxes overlapping a higher-scored one by IoU > ``region_iou``
(per-class NMS leaves one box per class at one place) are suppressed first (alrun).
BLAD's filters are kept: a teacher box below ``score_threshold`` (``cls_pseudo_threshold`` 0.5)
or with ``score_reg`` above ``max_reg_uncertainty`` (``reg_pseudo_threshold`` 0.1) is never
asked (its value is NaN there, i.e. skipped).

Partly labelled images stay in the pool (``reask``, BLAD's ``partial_obj``): their boxes are
scored and normalised with the rest, then a box overlapping a region asked before by IoU >=
``reask_iou`` (BLAD's 0.25) is skipped (:func:`alrun.regions.asked_before`). ``reask=false``
asks each image in one round only (alrun's option, the behaviour before 0.4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou, nms

from alrun.acquisition.context import AcquisitionContext, PredictionBatch, Selector
from alrun.acquisition.strategies import Strategy
from alrun.errors import AlrunError
from alrun.params import Fraction, OpenFraction
from alrun.regions import CHARGES, REASK_IOU, asked_before
from alrun.types import Needs

#: BLAD's weights of the box scores (``ComPASMiningAlgorithm.__init__``)
WEIGHTS = {"score_cls": 1.0, "score_reg": 1.0}


def box_disagreement(
    teacher_boxes: Tensor,
    teacher_labels: Tensor,
    view_boxes: Sequence[Tensor],
    view_probs: Sequence[Tensor],
    match_iou: float = 0.5,
    miss_prob: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """``(score_cls, score_reg)`` (T,) of each teacher box against the views' boxes (n_v, 4) and
    class probabilities ``view_probs`` (n_v, C[+1]) (see the module docstring)."""
    t = len(teacher_boxes)
    if not view_boxes:
        raise AlrunError("strategy: ComPAS needs at least one test-time view (strategy.views)")
    labels = teacher_labels.long()
    cls = torch.zeros(t, dtype=torch.float64)
    stacks: list[list[Tensor]] = [[teacher_boxes[i].double()] for i in range(t)]
    for boxes, probs in zip(view_boxes, view_probs):
        if t == 0:
            break
        if len(boxes) == 0:
            cls += -math.log(miss_prob)
            continue
        iou = box_iou(teacher_boxes.double(), boxes.double())  # (T, n_v)
        p = probs.double()[:, labels].T.clamp(min=miss_prob)  # (T, n_v): p of the teacher class
        near = iou >= match_iou
        loss = torch.where(near, -p.log(), torch.zeros_like(p)).sum(dim=1)
        cls += torch.where(near.any(dim=1), loss, torch.full_like(loss, -math.log(miss_prob)))
        best = iou.argmax(dim=1)
        for i in range(t):
            if bool(near[i, best[i]]):
                stacks[i].append(boxes[best[i]].double())
    cls /= len(view_boxes)
    reg = torch.zeros(t, dtype=torch.float64)
    for i, stack in enumerate(stacks):
        if len(stack) < 2:
            continue  # no view found it: no localisation spread to measure
        group = torch.stack(stack)
        mean = group.mean(dim=0)
        wh = (mean[2:] - mean[:2]).clamp(min=1.0)
        reg[i] = (group.std(dim=0) / wh.repeat(2)).mean()
    return cls, reg


def compas_values(scores: Mapping[str, np.ndarray], weights=WEIGHTS) -> np.ndarray:
    """BLAD's ``ComPASMiningAlgorithm.value`` for every box at once: each ``score_*`` min-max
    normalised over all boxes (NaN-aware), the weighted product; a box with a NaN score is
    ``inf`` (BLAD then skips it). A score with no range over the pool normalises to 0 (BLAD
    divides by 0)."""
    used = [k for k in scores if weights.get(k, 0) > 0]
    n = len(next(iter(scores.values()))) if scores else 0
    if n == 0:
        return np.zeros(0)
    parts = []
    for key in used:
        v = np.asarray(scores[key], np.float64)
        finite = v[~np.isnan(v)]
        if len(finite) == 0:
            parts.append(np.full(n, np.nan))
            continue
        low, span = finite.min(), finite.max() - finite.min()
        parts.append(((v - low) / span if span > 0 else np.zeros(n)) * weights[key])
    stacked = np.stack(parts)
    value = np.prod(stacked, axis=0)
    return np.where(np.isnan(stacked).any(axis=0), np.inf, value)


@dataclass(frozen=True)
class BoxCandidates:
    """The pool's candidate queries, flat: image index, box, predicted class, value."""

    image_ids: tuple[str, ...]
    image: np.ndarray  # (B,) index into image_ids
    boxes: np.ndarray  # (B, 4)
    labels: np.ndarray  # (B,)
    value: np.ndarray  # (B,) inf/NaN: never asked

    def ranked(self) -> np.ndarray:
        """Indices of the askable boxes by decreasing value (ties: pool order)."""
        ok = np.flatnonzero(np.isfinite(self.value))
        return ok[np.argsort(-self.value[ok], kind="stable")]

    def without_asked(self, asked: Mapping[str, np.ndarray], iou: float) -> BoxCandidates:
        """These candidates with the boxes near a region already asked made unaskable (NaN),
        after the pool-wide normalisation (as BLAD skips them while mining)."""
        value = self.value.copy()
        for i, image_id in enumerate(self.image_ids):
            if image_id in asked:
                rows = np.flatnonzero(self.image == i)
                value[rows[asked_before(self.boxes[rows], asked[image_id], iou)]] = np.nan
        return replace(self, value=value)


def plan_queries(
    candidates: BoxCandidates,
    charges: Callable[[str, np.ndarray, np.ndarray], np.ndarray],
    budget: float,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BLAD's greedy: queries in decreasing value, each charged what the oracle says it costs
    (``charges(image id, boxes, labels)`` per query, in the image's rank order), until the next
    one does not fit or the budget is spent. Returns image id -> (boxes, labels) asked, images
    in the order their first query was taken."""
    order = candidates.ranked()
    per_image: dict[int, list[int]] = {}
    for b in order:
        per_image.setdefault(int(candidates.image[b]), []).append(int(b))
    priced: dict[int, np.ndarray] = {}
    taken: dict[int, int] = {}
    spent = 0.0
    for b in order:
        if spent >= budget:
            break
        i = int(candidates.image[b])
        if i not in priced:
            rows = per_image[i]
            priced[i] = charges(
                candidates.image_ids[i], candidates.boxes[rows], candidates.labels[rows]
            )
        k = taken.get(i, 0)
        cost = float(priced[i][k])
        if spent + cost > budget + 1e-9:
            break
        spent += cost
        taken[i] = k + 1
    return {
        candidates.image_ids[i]: (
            candidates.boxes[per_image[i][:k]],
            candidates.labels[per_image[i][:k]],
        )
        for i, k in taken.items()
    }


class ComPASScorer:
    """Per-box ComPAS scores of the pool (``strategy=compas``; defaults: BLAD's active test
    config, ``faster_rcnn_r50_fpn_1x_voc0712_partial.py`` ``active_wrapper.aug_cfg``)."""

    def __init__(
        self,
        views: Sequence[str] = ("hflip", "scale:0.8", "jitter:0.2", "noise:0.05"),
        score_threshold: Fraction = 0.5,
        max_reg_uncertainty: float = 0.1,
        match_iou: OpenFraction = 0.5,
        miss_prob: OpenFraction = 1e-3,
        region_iou: OpenFraction = 0.9,
    ):
        views = tuple(str(v) for v in views)
        if not views:
            raise AlrunError("strategy.scorer.views: ComPAS needs at least one test-time view")
        for key, value, low_open in (
            ("score_threshold", score_threshold, False),
            ("match_iou", match_iou, True),
            ("miss_prob", miss_prob, True),
            ("region_iou", region_iou, True),
        ):
            if not (0 < value <= 1 if low_open else 0 <= value <= 1):
                raise AlrunError(f"strategy.scorer.{key}: expected a number in [0, 1], got {value}")
        if not max_reg_uncertainty > 0:
            raise AlrunError(
                f"strategy.scorer.max_reg_uncertainty: expected > 0, got {max_reg_uncertainty}"
            )
        self.views = views
        self.score_threshold = float(score_threshold)
        self.max_reg_uncertainty = float(max_reg_uncertainty)
        self.match_iou = float(match_iou)
        self.miss_prob = float(miss_prob)
        self.region_iou = float(region_iou)
        self.needs = Needs(probs=True, augment=views)

    def candidates(self, batch: PredictionBatch) -> BoxCandidates:
        if batch.probs is None or len(batch.passes) != len(self.views):
            raise AlrunError("strategy: ComPAS needs class probabilities and one pass per view")
        image, boxes, labels, cls_all, reg_all = [], [], [], [], []
        for i in range(len(batch)):
            lo, hi = int(batch.offsets[i]), int(batch.offsets[i + 1])
            keep = torch.nonzero(batch.scores[lo:hi] >= self.score_threshold).flatten()
            scores = batch.scores[lo:hi][keep]
            keep = keep[nms(batch.boxes[lo:hi][keep].float(), scores.float(), self.region_iou)]
            keep = keep.sort().values  # one query per region, in the detector's order
            t_boxes, t_labels = batch.boxes[lo:hi][keep], batch.labels[lo:hi][keep]
            parts = []
            for p in batch.passes:
                a, b = int(p.offsets[i]), int(p.offsets[i + 1])
                parts.append((p.boxes[a:b], p.probs[a:b]))
            cls, reg = box_disagreement(
                t_boxes,
                t_labels,
                [b for b, _ in parts],
                [q for _, q in parts],
                self.match_iou,
                self.miss_prob,
            )
            reg = torch.where(reg > self.max_reg_uncertainty, torch.nan, reg)  # BLAD's filter
            image.append(np.full(len(t_boxes), i, np.int64))
            boxes.append(t_boxes.double().numpy().reshape(-1, 4))
            labels.append(t_labels.long().numpy())
            cls_all.append(cls.numpy())
            reg_all.append(reg.numpy())
        cls_v, reg_v = (
            np.concatenate([np.zeros(0), *cls_all]),
            np.concatenate([np.zeros(0), *reg_all]),
        )
        return BoxCandidates(
            batch.image_ids,
            np.concatenate([np.zeros(0, np.int64), *image]),
            np.concatenate([np.zeros((0, 4)), *boxes]).astype(np.float32),
            np.concatenate([np.zeros(0, np.int64), *labels]),
            compas_values({"score_cls": cls_v, "score_reg": reg_v}),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "scorer": "compas",
            "views": list(self.views),
            "score_threshold": self.score_threshold,
            "max_reg_uncertainty": self.max_reg_uncertainty,
            "match_iou": self.match_iou,
            "miss_prob": self.miss_prob,
            "region_iou": self.region_iou,
            "weights": dict(WEIGHTS),
        }


class BoxQueryStrategy(Strategy):
    """A strategy that asks for boxes, not images (``strategy=compas``): the loop has it
    :meth:`plan` the round's queries across the pool and labels only those regions
    (``supervision=box_level``). ``charge``: what a box budget counts per query, BLAD's
    ``answered`` (one per new object found) or ``asked`` (one per query). ``reask``: partly
    labelled images stay candidates (BLAD); boxes within IoU ``reask_iou`` of a region asked
    before are not asked again."""

    def __init__(
        self,
        name: str,
        scorer: ComPASScorer,
        charge: Literal[CHARGES] = "answered",
        selector: Selector | None = None,
        reask: bool = True,
        reask_iou: OpenFraction = REASK_IOU,
    ):
        if selector is not None:
            raise AlrunError(
                f"strategy/selector: strategy={name} plans its box queries itself (in rank "
                "order within the budget); drop strategy/selector"
            )
        if not isinstance(scorer, ComPASScorer):
            raise AlrunError(
                f"strategy/scorer: strategy={name} ranks boxes with strategy/scorer=compas, "
                f"got {type(scorer).__name__}"
            )
        if charge not in CHARGES:
            raise AlrunError(
                f"strategy.charge: expected one of {'|'.join(CHARGES)}, got '{charge}'"
            )
        if not isinstance(reask, bool):
            raise AlrunError(f"strategy.reask: expected true or false, got {reask!r}")
        if not 0 < reask_iou <= 1:
            raise AlrunError(f"strategy.reask_iou: expected a number in (0, 1], got {reask_iou}")
        self.charge = charge
        self.reask = reask
        self.reask_iou = float(reask_iou)
        self._candidates: BoxCandidates | None = None
        self._asked: dict[str, float] = {}
        super().__init__(name, scorer)

    def score(self, context: AcquisitionContext) -> dict[str, float]:
        """Each pool image's best box value (0: no box to ask); keeps the boxes for :meth:`plan`."""
        if context.preds is None:
            raise AlrunError("strategy: ComPAS needs the detector's predictions on the pool")
        with torch.no_grad():
            self._candidates = self.scorer.candidates(context.preds)
        if context.asked:
            self._candidates = self._candidates.without_asked(context.asked, self.reask_iou)
        best: dict[str, float] = {i: 0.0 for i in context.pool_ids}
        c = self._candidates
        for b in c.ranked()[::-1]:
            best[c.image_ids[int(c.image[b])]] = float(c.value[b])
        return best

    def select(self, scores: Mapping[str, float], context: AcquisitionContext) -> list[str]:
        raise AlrunError(
            f"strategy={self.name}: asks for boxes, not images; the loop plans its queries "
            "(BoxQueryStrategy.plan)"
        )

    def plan(
        self,
        context: AcquisitionContext,
        charges: Callable[[str, np.ndarray, np.ndarray], np.ndarray],
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """This round's queries (image id -> boxes, labels) within ``context.budget``."""
        if self._candidates is None:
            raise AlrunError(f"strategy={self.name}: plan() before score()")
        planned = plan_queries(self._candidates, charges, context.budget)
        self._asked = {
            "queries": float(sum(len(b) for b, _ in planned.values())),
            "candidates": float(len(self._candidates.ranked())),
            "reasked_images": float(sum(1 for i in planned if i in (context.asked or {}))),
        }
        return planned

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "charge": self.charge,
            "reask": self.reask,
            "reask_iou": self.reask_iou,
            **self.scorer.describe(),
            **self._asked,
        }
