"""Full supervision: box labels only, trained through the engine; kind mismatches fail at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alrun.data.dataset import DetectionDataset, ImageRecord
from alrun.detectors.base import TrainSchedule
from alrun.errors import AlrunError
from alrun.loop import build_experiment
from alrun.oracle import CostModel, SimulatedOracle
from alrun.pool import LabelPool
from alrun.supervision import full
from alrun.supervision.base import LabelRequest, Regime, check_regime
from alrun.supervision.full import FullSupervision
from alrun.truth import HiddenTruth
from tests.helpers import REPO, compose_config


def _records() -> tuple[ImageRecord, ...]:
    return tuple(
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


def _oracle() -> SimulatedOracle:
    oracle = SimulatedOracle(CostModel())
    oracle.hold_truth(HiddenTruth(_records()))
    return oracle


def _pool() -> LabelPool:
    pool = LabelPool(DetectionDataset("toy", ("a",), _records()))
    oracle = _oracle()
    pool.add(oracle.annotate(pool.records(["im2", "im0"])), 0)
    pool.add(oracle.annotate(pool.records(["im3"]), "click"), 1)
    return pool


def test_trains_on_the_box_labelled_images_through_the_engine(monkeypatch):
    calls = []

    def fake_train_round(
        detector, sources, schedule, seed, round_index, hooks=(), progress=None, strategy=None
    ):
        calls.append(([(s.name, s.role, tuple(s.dataset.ids)) for s in sources], seed, round_index))
        return {"iterations": 1.0}

    monkeypatch.setattr(full, "train_round", fake_train_round)
    stats = FullSupervision().train(object(), _pool(), TrainSchedule(iterations=1), 7, 2)
    assert stats == {"iterations": 1.0}
    assert calls == [([("labelled", "labelled", ("im0", "im2"))], 7, 2)]  # not the clicked im3


def test_asks_for_boxes_and_annotates_them():
    regime, pool = FullSupervision(), _pool()
    assert isinstance(regime, Regime) and regime.state_dict() == {}
    assert regime.label_kind(LabelRequest(3)) == "box"
    labels = regime.annotate(_oracle(), pool.records(["im1"]), LabelRequest(3))
    assert labels[0].kind == "box" and labels[0].cost_s == pytest.approx(25.5)
    with pytest.raises(AlrunError, match="keeps none"):
        regime.load_state_dict({"switched": True})


def test_regime_and_oracle_kinds_are_checked_at_start_up():
    check_regime(FullSupervision(), SimulatedOracle(CostModel(), kind="box"))
    with pytest.raises(AlrunError, match=r"supervision \(FullSupervision\): asks the oracle for "):
        check_regime(FullSupervision(), SimulatedOracle(CostModel(), kind="click"))
    with pytest.raises(AlrunError, match="must build a Regime"):
        check_regime(object(), SimulatedOracle(CostModel()))
    with pytest.raises(AlrunError, match=r"oracle\.kind=center_click"):
        build_experiment(compose_config(["experiment=smoke", "oracle.kind=center_click"]))


@pytest.mark.integration
def test_full_with_click_oracle_is_a_one_line_error_and_writes_nothing(tmp_path):
    """Before: boxes were trained on and billed as clicks. Now: refused before any work."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alrun.cli",
            "experiment=smoke",
            "supervision=full",
            "oracle.kind=click",
            f"hydra.run.dir={out}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("alrun: error:")]
    assert errors == [
        "alrun: error: supervision (FullSupervision): asks the oracle for 'box' labels but "
        "oracle.kind=click only produces 'click'; set oracle.kind=null or a regime that asks for "
        "'click'"
    ]
    assert not (out / "state.json").exists() and not list(out.glob("round_*"))
