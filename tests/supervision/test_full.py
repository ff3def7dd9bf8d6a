"""Full supervision: when weights are re-initialised and what the detector trains on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alrun.data.dataset import DetectionDataset, ImageRecord
from alrun.detectors.base import TrainSchedule
from alrun.oracle import CostModel, SimulatedOracle
from alrun.pool import LabelPool
from alrun.supervision.full import FullSupervision


class RecordingDetector:
    num_classes = 1

    def __init__(self):
        self.calls: list[tuple] = []

    def reset(self, seed):
        self.calls.append(("reset", seed))

    def fit(self, dataset, schedule, seed, from_scratch=False, progress=None):
        self.calls.append(("fit", tuple(dataset.ids), seed, from_scratch))
        return {}


def _pool() -> LabelPool:
    records = tuple(
        ImageRecord(
            f"im{i}",
            Path(f"/x/{i}.png"),
            10,
            10,
            np.array([[0, 0, 5, 5]], np.float32),
            np.array([0]),
        )
        for i in range(4)
    )
    pool = LabelPool(DetectionDataset("toy", ("a",), records))
    pool.add(SimulatedOracle(CostModel()).annotate(pool.records(["im2", "im0"])), 0)
    return pool


@pytest.mark.parametrize(
    "init,resets", [("continue", [True, False, False]), ("scratch", [True, True, True])]
)
def test_reset_policy(init, resets):
    detector, pool = RecordingDetector(), _pool()
    schedule = TrainSchedule(iterations=1, init=init)
    for r in range(3):
        detector.calls.clear()
        FullSupervision().train(detector, pool, schedule, seed=10 + r, round_index=r)
        did_reset = detector.calls[0] == ("reset", 10 + r)
        assert did_reset == resets[r]
        fit = detector.calls[-1]
        assert fit == ("fit", ("im0", "im2"), 10 + r, resets[r])
