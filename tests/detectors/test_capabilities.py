"""Capability names: what a Needs asks of the detector, what configs declare, the refusal line."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from alrun.detectors import base
from alrun.detectors.capabilities import (
    check_capabilities,
    check_passes,
    detector_config_capabilities,
    detector_label,
    detectors_with,
    needs_capabilities,
    refusal,
    shipped_detectors,
)
from alrun.errors import AlrunError
from alrun.types import Needs


def test_needs_ask_only_what_the_detector_itself_outputs():
    assert needs_capabilities(Needs(probs=True)) == set()
    assert needs_capabilities(Needs(passes=10, head_dropout=0.2)) == {base.MC_DROPOUT}
    assert needs_capabilities(Needs(passes=3, ensemble=3)) == set()  # any detector: fresh members
    assert needs_capabilities(Needs(augment=("hflip",), proposals=True)) == {
        base.IMAGE_VIEWS,
        base.PROPOSALS,
    }
    assert needs_capabilities(Needs(detections=False, labelled_embeddings=True)) == {
        base.EMBEDDINGS
    }
    assert needs_capabilities(Needs(feats=True, mixture_density=3, grads=True)) == {
        base.BOX_FEATURES,
        base.MIXTURE_HEAD,
        base.GRADIENTS,
    }
    assert set(base.CAPABILITIES) >= needs_capabilities(
        Needs(True, True, True, True, 2, ("hflip",), True, True, True, 0.1, 0, "", True, 2)
    )


def test_shipped_configs_declare_by_family_without_building():
    declared = shipped_detectors()
    assert declared["tiny_fcos"] == declared["retinanet_resnet50_fpn"]
    assert base.MIXTURE_HEAD in declared["tiny_fcos"]
    assert declared["fasterrcnn_resnet50_fpn"] - declared["tiny_fcos"] == {base.PROPOSALS}
    assert base.BOX_FEATURES not in declared["ssdlite320_mobilenet_v3_large"]
    assert base.FPN_FEATURES not in declared["ssdlite320_mobilenet_v3_large"]
    assert detectors_with(base.PROPOSALS)[-1] == "mmdet_faster_rcnn_r50"
    unknown = OmegaConf.create({"_target_": "tests.nowhere.Backend"})
    assert detector_config_capabilities(unknown) is None  # checked once built instead
    assert detector_label(unknown) == "detector Backend"


def test_refusal_is_one_line_naming_who_what_and_where():
    line = refusal("strategy=bald", {base.MC_DROPOUT, base.GRADIENTS}, "detector=x")
    assert line.startswith("strategy=bald: needs gradients (per-box gradient embeddings), which ")
    assert line.endswith(
        "detector=x does not have (also missing: mc_dropout); detectors that have it: none yet"
    )
    assert "\n" not in line
    with pytest.raises(AlrunError, match="^supervision=uda: needs teacher"):
        check_capabilities(
            [("strategy=entropy", frozenset()), ("supervision=uda", {base.TEACHER})],
            frozenset({base.EMBEDDINGS}),
            "detector=mmdet_retinanet_r50",
        )
    check_capabilities([("strategy=x", {base.TEACHER})], None, "d")  # unknown: not refused here


def test_one_kind_of_extra_passes_at_a_time():
    check_passes(Needs(passes=3, ensemble=3), "strategy=e")
    with pytest.raises(AlrunError, match="^strategy=e: one kind of extra passes"):
        check_passes(Needs(passes=3, ensemble=3, augment=("hflip",)), "strategy=e")


@pytest.mark.parametrize(
    ("overrides", "detector", "who", "missing"),
    [
        (["strategy=mc_entropy"], "ssdlite320_mobilenet_v3_large",
         "strategy=mc_entropy (strategy/passes=mc_dropout)", "mc_dropout"),
        (["strategy=ppal"], "mmdet_faster_rcnn_r50", "strategy=ppal (strategy.scorer)",
         "anchor_quality"),
        (["strategy=ppal", "strategy.scorer.quality=post_nms"], "mmdet_faster_rcnn_r50",
         "strategy=ppal (strategy.selector)", "head_features"),
        (["supervision=consistency"], "ssdlite320_mobilenet_v3_large", "supervision=consistency",
         "flip_views"),
    ],
)  # fmt: skip
def test_refusal_names_the_part_that_needs_the_capability(overrides, detector, who, missing):
    """The scorer, its passes, the selector or the regime: the part to change is named."""
    from hydra.utils import instantiate

    from alrun.experiment import requirements
    from tests.helpers import compose_config

    cfg = compose_config(["experiment=smoke", *overrides, f"detector={detector}"])
    strategy, regime = instantiate(cfg.strategy), instantiate(cfg.supervision)
    regime_name = next((o.split("=")[1] for o in overrides if "supervision=" in o), "full")
    parts = requirements(strategy, regime, regime_name)
    assert frozenset().union(*(c for _, c in parts[:-1])) == strategy.requires
    declared = detector_config_capabilities(cfg.detector)
    with pytest.raises(AlrunError) as err:
        check_capabilities(parts, declared, f"detector={detector}")
    assert str(err.value).startswith(f"{who}: needs {missing} (")
