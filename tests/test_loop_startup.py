"""Refusals that need the data or the model happen in ``build_experiment``: before
``run_experiment`` writes anything into the run directory and before round 0 trains, so the
corrected command is not then refused in the same directory as "a different config"."""

from __future__ import annotations

import re

import pytest
from hydra.errors import InstantiationException

from alrun.errors import AlrunError
from alrun.loop import build_experiment, run_experiment
from tests.helpers import compose_config

SMOKE = ["experiment=smoke", "quiet=true"]
SSD = ["detector=ssdlite320_mobilenet_v3_large"]


def refusal(cfg) -> str:
    """The one-line message ``alrun`` would print for ``cfg`` (unwrapped as the CLI does)."""
    try:
        build_experiment(cfg)
    except AlrunError as err:
        return str(err)
    except InstantiationException as err:
        cause = err
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        assert isinstance(cause, AlrunError), repr(cause)
        return str(cause)
    raise AssertionError("build_experiment accepted the config")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy=badge"], r"^strategy=badge \(strategy.selector\): needs box_features .*ssd"),
        (["strategy=ppal"], r"^strategy=ppal \(strategy.scorer\): needs anchor_quality .*=ssdlite"),
        (["strategy=ccms"], r"^strategy=ccms \(strategy.selector\): needs box_features .*=ssdlite"),
        (["supervision=consistency"], r"^supervision \(FlipConsistency\): needs flip_views"),
        (
            [
                "experiment=uda_synthetic",  # replaces smoke: small sizes again
                "supervision.source.num_pool=20",
                "dataset.max_pool_images=20",
                "dataset.max_test_images=5",
            ],
            r"^supervision \(DomainAdaptation\): needs fpn_features \(feature maps all of one.*"
            r"does not have; detectors that have it: .*detector=tiny_fcos",
        ),
    ],
)
def test_ssd_without_what_a_family_needs_is_refused_at_build(overrides, message):
    cfg = compose_config([*SMOKE, *overrides, *SSD])
    with pytest.raises(AlrunError, match=message) as err:
        build_experiment(cfg)
    assert "torchvision backend" not in str(err.value)  # SSD *is* the torchvision backend
    assert "\n" not in str(err.value)


def test_a_refused_run_writes_nothing(tmp_path):
    cfg = compose_config([*SMOKE, "strategy=badge", *SSD])
    with pytest.raises(AlrunError, match="needs box_features"):
        run_experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("strategy", ["entropy", "coreset", "tta_inconsistency"])
def test_ssd_with_what_it_can_do_still_builds(strategy):
    build_experiment(compose_config([*SMOKE, f"strategy={strategy}", *SSD]))


@pytest.mark.parametrize(
    "weights, message",
    [
        ("[[1,1.0]]", r"weights.uncertainty: no step covers round 0"),
        ("[[0,nan]]", r"weights.uncertainty(\[0\]\[1\])?: expected a finite number >= 0, got nan"),
        ("nan", r"weights.uncertainty: expected a finite number >= 0 or a list of lists .*got nan"),
    ],
)
def test_weighted_schedule_refused_before_round_0(weights, message):
    key = "strategy.scorer.weights.uncertainty"
    cfg = compose_config([*SMOKE, "strategy=weighted", f"{key}={weights}"])
    assert re.search(message, refusal(cfg))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["strategy=entropy", "strategy.scorer.class_weights=[1.0,2.0]"], "strategy.scorer"),
        (["strategy=mc_entropy", "strategy.scorer.class_weights=[1,1,1]"], "strategy.scorer"),
        (
            ["strategy=weighted", "+strategy.scorer.scorers.uncertainty.class_weights=[1.0]"],
            "strategy.scorer.scorers.uncertainty",
        ),
    ],
)
def test_class_weights_shorter_than_the_classes_are_refused_at_build(overrides, key):
    """The smoke dataset has 4 classes; the old check waited for a box of a missing class."""
    message = refusal(compose_config([*SMOKE, *overrides]))
    assert message.startswith(f"{key}.class_weights: ")
    assert "for the dataset's 4 classes" in message


def test_one_class_weight_per_class_builds():
    cfg = compose_config([*SMOKE, "strategy=entropy", "strategy.scorer.class_weights=[1,2,3,4]"])
    assert build_experiment(cfg).strategy.scorer.class_weights == (1.0, 2.0, 3.0, 4.0)


def test_tta_views_are_bounded_before_round_0():
    views = "strategy.scorer.views=[scale:1000]"
    message = refusal(compose_config([*SMOKE, "strategy=tta_inconsistency", views]))
    assert message.startswith("strategy.scorer.views: view 'scale:1000' out of range")


def test_scaled_view_size_is_checked_against_the_largest_pool_image(monkeypatch):
    import alrun.detectors.views as views

    monkeypatch.setattr(views, "MAX_VIEW_PIXELS", 200_000)  # smoke images: 128x128
    cfg = compose_config([*SMOKE, "strategy=tta_inconsistency", "strategy.scorer.views=[scale:4]"])
    assert refusal(cfg) == (
        "strategy.scorer.views: 'scale:4' makes the dataset's largest image (128x128) 512x512 "
        "= 262,144 pixels; expected at most 200,000: use a smaller scale"
    )
