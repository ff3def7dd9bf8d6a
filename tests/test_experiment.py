"""Building a run: capabilities checked against the detector's config before any data is read,
strategy training handed explicitly to the regime, ensemble members built fresh (issue 19)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from alrun.errors import AlrunError
from alrun.loop import build_experiment, initial_selection, run_round
from alrun.pool import LabelPool
from alrun.progress import Reporter
from alrun.rundir import RunDir, RunOptions
from alrun.supervision.base import LabelRequest
from tests.helpers import compose_config

TINY = [
    "experiment=smoke",
    "quiet=true",
    "dataset.max_pool_images=12",
    "dataset.max_test_images=4",
    "budget.initial=6",
    "budget.per_round=2",
    "budget.rounds=1",
    "trainer.iterations=2",
    "trainer.first_iterations=3",
    "trainer.batch_size=2",
    "detector.builder.image_size=64",
]


def _loss_prediction_plus_ensemble():
    """``weighted`` of loss prediction and a 2-member ensemble (the combination of issue 19)."""
    cfg = compose_config([*TINY, "strategy=weighted"])
    ensemble = compose_config(["strategy=ensemble_entropy", "strategy.scorer.members=2"])
    scorers = {
        "loss": {"_target_": "alrun.acquisition.learned.LossPrediction", "hidden": 8},
        "ensemble": OmegaConf.to_container(ensemble.strategy.scorer),
    }
    cfg.strategy.scorer.scorers = scorers
    cfg.strategy.scorer.weights = {"loss": 1.0, "ensemble": 1.0}
    return cfg


def test_ensemble_members_never_train_the_strategys_heads(tmp_path):
    """Issue 19: members were ``copy.copy`` of the detector after the learned scorer's hook was
    attached, so each member's training ran the hook too: its head ended up trained on (and
    hooked to) the last member's backbone, while scoring read the main model."""
    cfg = _loss_prediction_plus_ensemble()
    exp = build_experiment(cfg)
    pool = LabelPool(exp.splits.pool)
    picked = initial_selection(exp, pool)
    pool.add(exp.regime.annotate(exp.oracle, pool.records(picked), LabelRequest(0)), 0)
    run_dir = RunDir(tmp_path)
    with run_dir.lock():
        row, _ = run_round(RunOptions.from_config(cfg), exp, pool, run_dir, 0, Reporter(True))
    (hook,) = exp.strategy.training_hooks
    assert hook.detector is exp.detector  # the head was trained on the run's detector
    assert len(hook.losses) > 0  # ... and it did train
    assert row["images"] == 6


def test_ensemble_members_are_fresh_detectors_without_hooks():
    cfg = _loss_prediction_plus_ensemble()
    exp = build_experiment(cfg)
    (member,) = exp.training.ensemble.members
    assert member is not exp.detector
    assert member.model is not exp.detector.model
    assert not set(vars(member)) - set(vars(exp.detector))  # nothing attached beyond its config
    assert exp.training.hooks == tuple(exp.strategy.training_hooks)


def test_missing_capability_is_one_line_before_the_dataset_is_read(monkeypatch):
    import alrun.experiment as experiment

    def no_dataset(*args, **kwargs):
        raise AssertionError("the dataset was read before the capability check")

    cfg = compose_config([*TINY, "strategy=loc_tightness"])
    original = experiment.instantiate
    monkeypatch.setattr(
        experiment,
        "instantiate",
        lambda node, *a, **k: no_dataset() if node is cfg.dataset else original(node, *a, **k),
    )
    with pytest.raises(AlrunError) as err:
        build_experiment(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("strategy=loc_tightness (strategy.scorer): needs proposals")
    assert "which detector=tiny_fcos does not have" in message
    having = message.split("detectors that have it: ")[1].split(", ")
    assert "detector=fasterrcnn_mobilenet_v3_large_320_fpn" in having
    assert "detector=mmdet_faster_rcnn_r50" in having
    assert "detector=tiny_fcos" not in having


def test_regime_refusal_names_the_regime_and_the_capability():
    cfg = compose_config(
        [*TINY, "supervision=consistency", "detector=ssdlite320_mobilenet_v3_large"]
    )
    message = (
        r"^supervision \(FlipConsistency\): needs flip_views .* "
        r"detector=ssdlite320_mobilenet_v3_large does not have; .*detector=mmdet_faster_rcnn_r50"
    )
    with pytest.raises(AlrunError, match=message):
        build_experiment(cfg)
