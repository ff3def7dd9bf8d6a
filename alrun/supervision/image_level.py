"""Image-level labels: the annotator names the classes present
(``cost_model.image_label_per_class_s`` per class), nothing more.

After the initial set (drawn boxes by default: with no trained model there is nothing to turn
class names into boxes), every image-level image gets pseudo-boxes before each round's training
from the previous round's model, restricted to the present classes
(:func:`~alrun.supervision.pseudo_boxes.present_class_boxes`): predictions of absent classes are
dropped; of a present class, those with ``score >= min_score``, or its single best prediction
when none reaches it. An image with a present class the model does not predict at all is left
out of that round's training (its objects would be taught as background); an image the
annotator says is empty trains as a negative. Pseudo-box precision and recall against the hidden
ground truth are recorded per round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from alrun.data.dataset import ImageRef
from alrun.detectors.base import Detector, Progress, TrainSchedule
from alrun.engine import NO_STRATEGY_TRAINING, BatchSource, StrategyTraining, train_round
from alrun.params import Fraction
from alrun.pool import LabelPool
from alrun.supervision.base import BaseRegime, LabelRequest
from alrun.supervision.pseudo_boxes import (
    PseudoBoxTally,
    RoundLog,
    as_numpy,
    check_choice,
    check_fraction,
    kinds_received,
    merged,
    predict,
    present_class_boxes,
    with_boxes,
)


class ImageLevelRegime(RoundLog, BaseRegime):
    label_kinds = ("box", "image_label")

    def __init__(
        self, min_score: Fraction = 0.5, initial_kind: Literal["box", "image_label"] = "box"
    ):
        self.min_score = check_fraction("supervision.min_score", min_score)
        self.initial_kind = check_choice(
            "supervision.initial_kind", initial_kind, ("box", "image_label")
        )

    def label_kind(self, request: LabelRequest) -> str:
        return self.initial_kind if request.round_index == 0 else "image_label"

    def annotate(self, oracle, records: Sequence[ImageRef], request: LabelRequest):
        kind = self.label_kind(request)
        labels = oracle.annotate(records, kind)
        self._log(
            "labels",
            {
                "for_round": request.round_index,
                "requested": kind,
                "received": kinds_received(labels),
                "cost_s": math.fsum(lab.cost_s for lab in labels),
            },
        )
        return labels

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
        tagged = [i for i in pool.labelled_ids if pool.labels[i].kind == "image_label"]
        records = pool.records(tagged)
        preds = predict(detector, records) if round_index > 0 else {}  # round 0: no model yet
        tally, pseudo, dropped = PseudoBoxTally(pool.audit), [], 0
        for rec in records:
            classes = pool.labels[rec.image_id].image_classes
            det = preds.get(rec.image_id)
            if det is None and len(classes):
                dropped += 1
                continue
            if det is None:  # nothing present: a negative image
                boxes, labels, missing = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), []
            else:
                boxes, labels, missing = present_class_boxes(
                    classes, *as_numpy(det), self.min_score
                )
            if missing:
                dropped += 1
                continue
            tally.add(boxes, labels, rec.image_id)  # measured by the evaluator's audit
            pseudo.append(with_boxes(rec, boxes, labels))
        stats = {"images": float(len(pseudo)), "dropped_images": float(dropped), **tally.summary()}
        self._log("pseudo_boxes", {"round": round_index, "min_score": self.min_score, **stats})
        source = BatchSource("labelled", merged(pool, pseudo, "image_labels"))
        result = train_round(
            detector, [source], schedule, seed, round_index, progress=progress, strategy=strategy
        )
        return {**result, **{f"image_level/{k}": v for k, v in stats.items()}}
