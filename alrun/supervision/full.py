"""Full supervision: train on the oracle's boxes for the labelled images."""

from __future__ import annotations

from alrun.detectors.base import Detector, Progress, TrainSchedule
from alrun.engine import NO_STRATEGY_TRAINING, BatchSource, StrategyTraining, train_round
from alrun.pool import LabelPool
from alrun.supervision.base import BaseRegime


class FullSupervision(BaseRegime):
    """Box labels only, every round. ``trainer.init`` decides whether each round starts from the
    previous weights (``continue``) or from scratch (see :func:`alrun.engine.train_round`)."""

    label_kinds = ("box",)

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
        source = BatchSource("labelled", pool.training_set())
        return train_round(
            detector, [source], schedule, seed, round_index, progress=progress, strategy=strategy
        )
