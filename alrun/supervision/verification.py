"""Box verification (Papadopoulos et al., CVPR 2016, "We don't need no bounding-boxes").

After the initial set (drawn boxes: there is no model to propose anything yet), the annotator
is shown the previous round's predicted boxes (those with ``score >= proposal_score``) and
accepts each one whose IoU with a ground-truth box of its class is ``>= oracle.verify_iou``,
at ``cost_model.verify_s`` per proposal. Accepted boxes become labels.

An image is *rejected* when the annotator rejected at least one of its proposals or was shown
none. ``fallback``:

* ``box`` - a rejected image is then drawn in full (boxes); it costs the verification plus the
  drawing, and is labelled ``box``;
* ``none`` - it keeps its accepted boxes only; an image with no accepted box is left out of
  training (it would teach its objects as background).

Verification cannot add boxes: an object the model did not propose stays unlabelled in an
accepted image (recall against the hidden ground truth is recorded per round). The selection is
priced as one verification per ground-truth object (``label_kind`` is ``verify``); the real
cost, per proposal shown (+ drawing), is what is recorded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from alrun.data.dataset import DetectionDataset, ImageRef
from alrun.detectors.base import Detector, Progress, TrainSchedule
from alrun.engine import NO_STRATEGY_TRAINING, BatchSource, StrategyTraining, train_round
from alrun.params import Fraction
from alrun.pool import LabelPool
from alrun.supervision.base import BaseRegime, LabelRequest
from alrun.supervision.pseudo_boxes import (
    PseudoBoxTally,
    RoundLog,
    check_choice,
    check_fraction,
    kinds_received,
    predict,
)
from alrun.types import ImageLabels

FALLBACKS = ("box", "none")


class BoxVerificationRegime(RoundLog, BaseRegime):
    label_kinds = ("box", "verify")

    def __init__(self, proposal_score: Fraction = 0.5, fallback: Literal[FALLBACKS] = "box"):
        self.proposal_score = check_fraction("supervision.proposal_score", proposal_score)
        self.fallback = check_choice("supervision.fallback", fallback, FALLBACKS)

    def label_kind(self, request: LabelRequest) -> str:
        return "box" if request.round_index == 0 or request.detector is None else "verify"

    def annotate(self, oracle, records: Sequence[ImageRef], request: LabelRequest):
        kind = self.label_kind(request)
        entry: dict[str, Any] = {"for_round": request.round_index, "requested": kind}
        if kind == "box":
            labels = oracle.annotate(records, "box")
        else:
            labels = self._verify(oracle, records, request.detector, entry)
        entry["received"] = kinds_received(labels)
        entry["cost_s"] = math.fsum(lab.cost_s for lab in labels)
        self._log("labels", entry)
        return labels

    def _verify(
        self, oracle, records: Sequence[ImageRef], detector: Detector, entry: dict[str, Any]
    ) -> list[ImageLabels]:
        preds = predict(detector, records)
        proposals = {i: d.select(d.scores >= self.proposal_score) for i, d in preds.items()}
        answers = oracle.annotate(records, "verify", proposals=proposals)
        rejected = [
            rec
            for rec, lab in zip(records, answers)
            if len(lab.verified) == 0 or not lab.verified.all()
        ]
        accepted_tally = PseudoBoxTally(oracle.audit)
        for rec, lab in zip(records, answers):
            accepted_tally.add(*lab.box_targets(), rec.image_id)  # the oracle's audit: counts
        entry.update(
            proposal_score=self.proposal_score,
            proposals=int(sum(len(lab.verified) for lab in answers)),
            accepted=int(sum(int(lab.verified.sum()) for lab in answers)),
            rejected_images=len(rejected),
            fallback=self.fallback,
            **{k.replace("pseudo_", "accepted_"): v for k, v in accepted_tally.summary().items()},
        )
        if self.fallback == "none" or not rejected:
            return answers
        drawn = {lab.image_id: lab for lab in oracle.annotate(rejected, "box")}
        entry["drawn_images"] = len(drawn)
        return [
            replace(drawn[lab.image_id], cost_s=lab.cost_s + drawn[lab.image_id].cost_s)
            if lab.image_id in drawn
            else lab
            for lab in answers
        ]

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
        full = pool.training_set()
        kept = tuple(
            rec
            for rec in full.images
            if pool.labels[rec.image_id].kind != "verify" or rec.num_boxes > 0
        )
        dataset = DetectionDataset(full.name, full.classes, kept)
        source = BatchSource("labelled", dataset)
        stats = train_round(
            detector, [source], schedule, seed, round_index, progress=progress, strategy=strategy
        )
        skipped = len(full.images) - len(kept)
        self._log("training", {"round": round_index, "images": len(kept), "skipped": skipped})
        return {**stats, "verify/skipped_images": float(skipped)}
