"""Extreme clicking (Papadopoulos et al., ICCV 2017): four extreme points per object.

The oracle answers the left-, top-, right- and bottom-most points of every object (each at a
random place along its box side, plus ``oracle.extreme_jitter_px`` Gaussian annotator noise) and
charges ``cost_model.extreme_s`` per object; the tight box around the four points is the label.
With no jitter that box is the ground truth exactly; with jitter it is not, and how far it is
off (IoU with the hidden ground truth) is recorded per round in ``supervision.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from alrun.data.dataset import ImageRef
from alrun.detectors.base import Detector, Progress, TrainSchedule
from alrun.engine import NO_STRATEGY_TRAINING, BatchSource, StrategyTraining, train_round
from alrun.pool import LabelPool
from alrun.supervision.base import BaseRegime, LabelRequest
from alrun.supervision.pseudo_boxes import PseudoBoxTally, RoundLog, kinds_received


class ExtremeRegime(RoundLog, BaseRegime):
    """Extreme points every round; trains on the boxes they define."""

    label_kinds = ("extreme",)

    def annotate(self, oracle, records: Sequence[ImageRef], request: LabelRequest):
        labels = oracle.annotate(records, "extreme")
        tally = PseudoBoxTally(oracle.audit)
        for rec, lab in zip(records, labels):
            tally.add(lab.boxes, lab.labels, rec.image_id)  # the oracle's audit: counts only
        quality = {k.replace("pseudo_", "box_"): v for k, v in tally.summary().items()}
        self._log(
            "labels",
            {
                "for_round": request.round_index,
                "requested": "extreme",
                "received": kinds_received(labels),
                "cost_s": math.fsum(lab.cost_s for lab in labels),
                "jitter_px": oracle.extreme_jitter_px,
                **quality,  # box_precision: share of the boxes at IoU >= 0.5 with the truth
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
        source = BatchSource("labelled", pool.training_set())  # the tight boxes of the points
        return train_round(
            detector, [source], schedule, seed, round_index, progress=progress, strategy=strategy
        )
