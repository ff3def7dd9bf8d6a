"""Full supervision: train on the oracle's boxes for the labelled images."""

from __future__ import annotations

from alrun.detectors.base import Detector, Progress, TrainSchedule
from alrun.pool import LabelPool


class FullSupervision:
    """Box labels only. ``trainer.init``: ``scratch`` re-initialises every round, ``continue``
    starts each round from the previous round's weights (round 0 always starts fresh)."""

    label_kind = "box"

    def train(
        self,
        detector: Detector,
        pool: LabelPool,
        schedule: TrainSchedule,
        seed: int,
        round_index: int,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        from_scratch = schedule.init == "scratch" or round_index == 0
        if from_scratch:
            detector.reset(seed)
        return detector.fit(pool.training_set(), schedule, seed, from_scratch, progress)
