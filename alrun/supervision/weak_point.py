"""Weak point supervision with Desai et al.'s switches (BMVC 2019, "An adaptive supervision
framework for active learning in object detection").

The oracle answers one click per object (``click``: anywhere inside the object; ``center_click``:
its center plus jitter), priced by the cost model. Before each round's training, every clicked
image gets pseudo-boxes from the model of the previous round: the predicted box of the click's
class whose center is nearest the click (:func:`~alrun.supervision.pseudo_boxes.nearest_center`).
A click without a usable prediction (none of its class, none above ``min_score``, or none
containing the click with ``require_inside``; and always in round 0, where there is no trained
model yet) follows ``no_match``:

* ``prior`` - a box of its class's prior size centered on the click (the median size of the box
  labels bought so far, else ``prior_box_px``);
* ``drop`` - the image is left out of this round's training (training it with a missing object
  would teach that object as background); it is tried again next round with the newer model.

Switches (both off by default, both may be on):

* hard (``hard_threshold``, mAP gained per 1000 annotation seconds): after every weak round
  (a round whose newly bought labels include clicks) the gain of ``hard_metric`` over the
  previous round divided by the seconds those labels cost is compared with the threshold; the
  first time it falls below, every later request asks for boxes. A pure function of the history,
  so a resumed run decides as the uninterrupted one.
* soft (``soft_threshold`` in [0, 1]), ``soft_rule``:

  - ``after_clicks`` (default; Desai et al.'s order): every selected image is clicked first
    (clicks paid); each click is matched to its pseudo-box (:func:`nearest_center`, the box the
    image would train on) and the image's confidence is the mean detector score of those
    pseudo-boxes, an unmatched click counting 0. Below the threshold the image *also* gets
    boxes (clicks + boxes paid) and trains on the boxes; an image without objects (no click)
    keeps its (empty) click answer;
  - ``before_clicks`` (alrun's earlier rule): per selected image, the mean over all its
    predicted boxes with ``score >= min_score`` of the max class probability (0 when there is
    none) decides before anything is bought: below the threshold boxes, else clicks.

  The selection is priced as clicks (``label_kind``); the switched images' real cost is what
  is recorded.

Every decision is written to ``round_XX/supervision.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np

from alrun.data.dataset import ImageRef
from alrun.detectors.base import Detector, Progress, TrainSchedule
from alrun.engine import NO_STRATEGY_TRAINING, BatchSource, StrategyTraining, train_round
from alrun.errors import AlrunError
from alrun.params import Fraction, NonNegativeFloat, PositiveFloat
from alrun.pool import LabelPool
from alrun.supervision.base import BaseRegime, LabelRequest
from alrun.supervision.pseudo_boxes import (
    CLICK_KINDS,
    PseudoBoxTally,
    RoundLog,
    as_numpy,
    check_choice,
    check_fraction,
    class_prior_sizes,
    kinds_received,
    merged,
    nearest_center,
    predict,
    prior_boxes,
    with_boxes,
)
from alrun.types import Detections, ImageLabels, Needs

NO_MATCH_RULES = ("prior", "drop")
SOFT_RULES = ("after_clicks", "before_clicks")
HARD_METRICS = ("mAP", "mAP50", "mAR")


def weak_round_rates(history: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, float]]:
    """For every round whose newly bought labels include clicks: the metric's gain over the
    previous round, the seconds those labels cost and the gain per 1000 seconds."""
    rates = []
    for prev, cur in zip(history, history[1:]):
        spent = float(cur["cost_s"]) - float(prev["cost_s"])
        if float(cur["clicks"]) <= float(prev["clicks"]) or spent <= 0:
            continue
        gain = float(cur[metric]) - float(prev[metric])
        rates.append(
            {
                "round": int(cur["round"]),
                "gain": gain,
                "cost_s": spent,
                "gain_per_ks": 1000.0 * gain / spent,
            }
        )
    return rates


def hard_switch_round(
    history: Sequence[Mapping[str, Any]], metric: str, threshold: float
) -> int | None:
    """The first round whose weak-label gain per 1000 s fell below ``threshold`` (None: none)."""
    for rate in weak_round_rates(history, metric):
        if rate["gain_per_ks"] < threshold:
            return int(rate["round"])
    return None


def image_confidence(det: Detections, min_score: float = 0.0) -> float:
    """Mean over the predicted boxes with ``score >= min_score`` of their max class probability
    (0 when there is none: nothing confidently found is no reason to trust clicks)."""
    kept = det.select(det.scores >= min_score)
    if len(kept) == 0:
        return 0.0
    probs = kept.class_probs if kept.class_probs is not None else kept.scores[:, None]
    return float(probs.max(dim=1).values.mean())


def clicked_confidence(
    lab: ImageLabels, det: Detections, min_score: float, require_inside: bool
) -> float | None:
    """Desai's soft-switch confidence: the mean detector score of the pseudo-boxes the image's
    clicks pick (:func:`nearest_center`; an unmatched click counts 0). None without clicks."""
    points = lab.points if lab.points is not None else np.zeros((0, 2), np.float32)
    if len(points) == 0:
        return None
    if len(det) == 0:
        return 0.0
    boxes, labels, scores = as_numpy(det)
    chosen = nearest_center(points, lab.labels, boxes, labels, scores, min_score, require_inside)
    return float(np.where(chosen >= 0, scores[np.maximum(chosen, 0)], 0.0).mean())


class WeakPointRegime(RoundLog, BaseRegime):
    """Clicks instead of boxes, trained through nearest-center pseudo-boxes; optional Desai
    hard / soft switches to boxes (see the module docstring)."""

    def __init__(
        self,
        click_kind: Literal[CLICK_KINDS] = "center_click",
        initial_kind: Literal[("box", *CLICK_KINDS)] = "box",
        no_match: Literal[NO_MATCH_RULES] = "prior",
        prior_box_px: PositiveFloat = 24.0,
        min_score: Fraction = 0.3,
        require_inside: bool = True,
        hard_threshold: NonNegativeFloat | None = None,
        hard_metric: Literal[HARD_METRICS] = "mAP",
        soft_threshold: Fraction | None = None,
        soft_rule: Literal[SOFT_RULES] | None = None,
    ):
        self.click_kind = check_choice("supervision.click_kind", click_kind, CLICK_KINDS)
        self.initial_kind = check_choice(
            "supervision.initial_kind", initial_kind, ("box", click_kind)
        )
        self.no_match = check_choice("supervision.no_match", no_match, NO_MATCH_RULES)
        if no_match == "drop" and initial_kind != "box":
            raise AlrunError(
                "supervision.no_match: 'drop' with initial_kind clicks leaves round 0 nothing to "
                "train on (there is no model to match clicks yet); use no_match=prior or "
                "initial_kind=box"
            )
        if not (isinstance(prior_box_px, (int, float)) and prior_box_px > 0):
            raise AlrunError(f"supervision.prior_box_px: expected > 0 pixels, got {prior_box_px}")
        self.prior_box_px = float(prior_box_px)
        self.min_score = check_fraction("supervision.min_score", min_score)
        self.require_inside = bool(require_inside)
        self.hard_metric = check_choice("supervision.hard_metric", hard_metric, HARD_METRICS)
        if hard_threshold is not None:
            value = hard_threshold
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise AlrunError(
                    "supervision.hard_threshold: expected null or a finite gain >= 0 "
                    f"({hard_metric} per 1000 annotation seconds), got {hard_threshold!r}"
                )
        self.hard_threshold = None if hard_threshold is None else float(hard_threshold)
        self.soft_threshold = (
            None
            if soft_threshold is None
            else check_fraction("supervision.soft_threshold", soft_threshold)
        )
        if soft_rule is not None and soft_threshold is None:
            raise AlrunError(
                f"supervision.soft_rule: only with the soft switch (supervision.soft_threshold "
                f"in [0, 1]); got soft_rule={soft_rule} with soft_threshold=null"
            )
        self.soft_rule = check_choice(
            "supervision.soft_rule", soft_rule or SOFT_RULES[0], SOFT_RULES
        )
        switches = hard_threshold is not None or soft_threshold is not None
        self.label_kinds = tuple(
            dict.fromkeys((initial_kind, click_kind, *(("box",) if switches else ())))
        )

    # -- which labels ------------------------------------------------------------------------

    def _hard_decision(self, request: LabelRequest) -> dict[str, Any] | None:
        if self.hard_threshold is None or request.round_index == 0:
            return None
        switched = hard_switch_round(request.history, self.hard_metric, self.hard_threshold)
        return {
            "for_round": request.round_index,
            "metric": self.hard_metric,
            "threshold_per_ks": self.hard_threshold,
            "weak_rounds": weak_round_rates(request.history, self.hard_metric),
            "switched_at_round": switched,
            "kind": "box" if switched is not None else self.click_kind,
        }

    def label_kind(self, request: LabelRequest) -> str:
        if request.round_index == 0:
            return self.initial_kind
        decision = self._hard_decision(request)
        return decision["kind"] if decision else self.click_kind

    def annotate(self, oracle, records: Sequence[ImageRef], request: LabelRequest):
        kind = self.label_kind(request)
        entry: dict[str, Any] = {"for_round": request.round_index, "requested": kind}
        hard = self._hard_decision(request)
        if hard is not None:
            entry["hard_switch"] = hard
        soft = self.soft_threshold is not None and request.detector is not None
        if kind == self.click_kind and soft:
            labels, entry["soft_switch"] = self._soft_switch(oracle, records, request.detector)
        else:
            labels = oracle.annotate(records, kind)
        entry["received"] = kinds_received(labels)
        entry["cost_s"] = math.fsum(lab.cost_s for lab in labels)
        self._log("labels", entry)
        return labels

    def _soft_switch(
        self, oracle, records: Sequence[ImageRef], detector: Detector
    ) -> tuple[list[ImageLabels], dict[str, Any]]:
        if self.soft_rule == "after_clicks":
            return self._soft_switch_after_clicks(oracle, records, detector)
        preds = predict(detector, records, Needs(probs=True))
        confidence = {
            r.image_id: image_confidence(preds[r.image_id], self.min_score) for r in records
        }
        to_boxes = [r for r in records if confidence[r.image_id] < self.soft_threshold]
        to_clicks = [r for r in records if confidence[r.image_id] >= self.soft_threshold]
        answered = [*oracle.annotate(to_boxes, "box"), *oracle.annotate(to_clicks, self.click_kind)]
        return self._soft_record(records, answered, confidence, len(to_boxes), len(to_clicks))

    def _soft_switch_after_clicks(
        self, oracle, records: Sequence[ImageRef], detector: Detector
    ) -> tuple[list[ImageLabels], dict[str, Any]]:
        """Desai et al.: click every image, then buy boxes too where the clicks' pseudo-boxes
        are not trusted; a switched image's label is its boxes, priced clicks + boxes."""
        clicks = {lab.image_id: lab for lab in oracle.annotate(records, self.click_kind)}
        preds = predict(detector, records)
        confidence = {
            r.image_id: clicked_confidence(
                clicks[r.image_id], preds[r.image_id], self.min_score, self.require_inside
            )
            for r in records
        }
        low = [
            r
            for r in records
            if (c := confidence[r.image_id]) is not None and c < self.soft_threshold
        ]
        boxes = {lab.image_id: lab for lab in oracle.annotate(low, "box")}
        answered = [
            replace(boxes[i], cost_s=boxes[i].cost_s + lab.cost_s) if i in boxes else lab
            for i, lab in clicks.items()
        ]
        record = self._soft_record(
            records, answered, confidence, len(boxes), len(records) - len(boxes)
        )
        record[1]["clicks_paid_for_boxed"] = math.fsum(clicks[i].cost_s for i in boxes)
        return record

    def _soft_record(
        self,
        records: Sequence[ImageRef],
        answered: Sequence[ImageLabels],
        confidence: Mapping[str, float | None],
        boxes: int,
        clicks: int,
    ) -> tuple[list[ImageLabels], dict[str, Any]]:
        answers = {lab.image_id: lab for lab in answered}
        decision = {
            "rule": self.soft_rule,
            "threshold": self.soft_threshold,
            "boxes": boxes,
            "clicks": clicks,
            "images": [
                {
                    "image_id": r.image_id,
                    "confidence": confidence[r.image_id],
                    "kind": answers[r.image_id].kind,
                    "cost_s": answers[r.image_id].cost_s,
                }
                for r in records
            ],
        }
        return [answers[r.image_id] for r in records], decision

    # -- training ----------------------------------------------------------------------------

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
        clicked = [i for i in pool.labelled_ids if pool.labels[i].kind in CLICK_KINDS]
        records = pool.records(clicked)
        # round 0 has no trained model yet: every click takes the no-match rule
        preds = predict(detector, records) if round_index > 0 else {}
        prior = class_prior_sizes(pool, len(pool.dataset.classes), self.prior_box_px)
        tally, pseudo = PseudoBoxTally(pool.audit), []
        counts = {"clicks": 0, "matched": 0, "prior": 0, "dropped_clicks": 0, "dropped_images": 0}
        for rec in records:
            lab = pool.labels[rec.image_id]
            boxes, matched = self.pseudo_boxes(lab, rec, preds.get(rec.image_id), prior)
            counts["clicks"] += len(lab.labels)
            counts["matched"] += int(matched.sum())
            unmatched = int((~matched).sum())
            if unmatched and self.no_match == "drop":
                counts["dropped_clicks"] += unmatched
                counts["dropped_images"] += 1
                continue
            counts["prior"] += unmatched
            tally.add(boxes, lab.labels, rec.image_id)  # measured by the evaluator's audit
            pseudo.append(with_boxes(rec, boxes, lab.labels))
        stats = {**{k: float(v) for k, v in counts.items()}, **tally.summary()}
        self._log("pseudo_boxes", {"round": round_index, "no_match": self.no_match, **stats})
        dataset = merged(pool, pseudo, "clicks")
        source = BatchSource("labelled", dataset)
        result = train_round(
            detector, [source], schedule, seed, round_index, progress=progress, strategy=strategy
        )
        return {**result, **{f"weak/{k}": v for k, v in stats.items()}}

    def pseudo_boxes(
        self,
        lab: ImageLabels,
        rec: ImageRef,
        det: Detections | None,
        prior: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (N, 4), matched (N,) bool) for the N clicks of one image: the nearest-center
        prediction where one is usable, else the class prior box."""
        points = lab.points if lab.points is not None else np.zeros((0, 2), np.float32)
        fallback = prior_boxes(points, lab.labels, prior, rec.width, rec.height)
        if det is None or len(det) == 0:
            return fallback, np.zeros(len(points), bool)
        boxes, labels, scores = as_numpy(det)
        chosen = nearest_center(
            points, lab.labels, boxes, labels, scores, self.min_score, self.require_inside
        )
        matched = chosen >= 0
        out = fallback.copy()
        out[matched] = boxes[chosen[matched]]
        return out, matched
