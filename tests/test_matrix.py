"""The capability matrix (docs/reference/capabilities.md) says what build_experiment does."""

from __future__ import annotations

import pytest

import alrun.experiment as experiment
from alrun.errors import AlrunError
from alrun.loop import build_experiment
from alrun.matrix import MATRIX_DETECTORS, cells, counts, options, overrides
from scripts import docs_pages
from tests.helpers import compose_config


def _cell(option: str, detector: str):
    (found,) = [c for c in cells() if c.option == option and c.detector == detector]
    return found


@pytest.mark.integration  # ~5 s: composes and instantiates every strategy and regime config
def test_matrix_cells_follow_the_declared_capabilities():
    assert len(cells()) == (len(options("strategy")) + len(options("supervision"))) * len(
        MATRIX_DETECTORS
    )
    assert _cell("loc_tightness", "tiny_fcos").missing == {"proposals"}
    assert _cell("loc_tightness", "fasterrcnn_mobilenet_v3_large_320_fpn").runs
    assert _cell("loc_tightness", "mmdet_faster_rcnn_r50").runs
    assert _cell("al_mdn", "fasterrcnn_mobilenet_v3_large_320_fpn").missing == {"mixture_head"}
    # ensembles and test-time views are backend-independent: they run on mmdet too
    for strategy in ("ensemble_entropy", "ensemble_bald", "tta_inconsistency", "qbc"):
        assert _cell(strategy, "mmdet_retinanet_r50").runs, strategy
    # mmdet: MC dropout on both heads, teachers, flipped views on RetinaNet (issue 18)
    for option in ("mc_entropy", "bald", "pseudo_label", "uda", "loss_prediction"):
        for detector in ("mmdet_retinanet_r50", "mmdet_faster_rcnn_r50"):
            assert _cell(option, detector).runs, (option, detector)
    assert _cell("consistency", "mmdet_retinanet_r50").runs
    assert _cell("consistency", "mmdet_faster_rcnn_r50").runs  # CSD's two-stage views
    for detector in ("mmdet_retinanet_r50", "mmdet_faster_rcnn_r50"):
        assert _cell("synthetic_pretrain", detector).runs  # rebuild
    # mmdet RetinaNet: PPAL's anchor quality and head features, AL-MDN's mixture head
    for option in ("ppal", "ccms", "al_mdn", "mi_aod"):
        assert _cell(option, "mmdet_retinanet_r50").runs, option
    message = _cell("al_mdn", "mmdet_faster_rcnn_r50").refusal
    assert message.startswith("strategy=al_mdn (strategy.scorer): needs mixture_head (")
    assert "which detector=mmdet_faster_rcnn_r50 does not have" in message
    assert "detector=mmdet_retinanet_r50" in message and "\n" not in message
    assert _cell("mi_aod", "tiny_fcos").runs and _cell("mi_aod", "retinanet_resnet50_fpn").runs
    assert "dense_head" in _cell("mi_aod", "fasterrcnn_mobilenet_v3_large_320_fpn").missing
    table = counts(cells())
    # + qbc, mi_aod; + compas and box_level (issue 24: box-level queries); mmdet: + ppal, ccms,
    # al_mdn, mi_aod on RetinaNet, consistency and synthetic_pretrain (issue 18)
    assert table["tiny_fcos"] == {"strategy": 31, "supervision": 12, "cells": 44}
    # issue 20: every strategy and regime that runs on the tiny FCOS runs on the pretrained one
    for cell in cells():
        if cell.detector == "tiny_fcos":
            assert _cell(cell.option, "lite0_fcos").runs == cell.runs, cell.option
    assert table["mmdet_retinanet_r50"] == {"strategy": 31, "supervision": 12, "cells": 44}
    assert table["mmdet_faster_rcnn_r50"] == {"strategy": 28, "supervision": 12, "cells": 44}
    for option in ("compas", "box_level"):  # views and teachers: declared by every backend
        for detector in ("mmdet_retinanet_r50", "mmdet_faster_rcnn_r50"):
            assert _cell(option, detector).runs, (option, detector)


@pytest.mark.integration
def test_capabilities_page_has_every_option_and_detector():
    page = docs_pages.capabilities_page()
    for group in ("strategy", "supervision"):
        for option in options(group):
            assert f"\n| `{option}` | " in page, option
    for detector in MATRIX_DETECTORS:
        assert f"| `{detector}` | " in page  # the counts table
    assert "refused: needs proposals" in page


class _ReachedData(Exception):
    """build_experiment got past every start-up check to reading the dataset."""


@pytest.mark.integration
def test_every_cell_is_what_build_experiment_says(monkeypatch):
    """Each cell composed as a run: refused cells are refused by build_experiment with the
    same missing capability and detectors; the others get past the check to the dataset."""
    original = experiment.instantiate

    def stop_at_data(node, *args, **kwargs):
        if node.get("_target_", "").startswith("alrun.data."):
            raise _ReachedData
        return original(node, *args, **kwargs)

    monkeypatch.setattr(experiment, "instantiate", stop_at_data)
    for cell in cells():
        cfg = compose_config([*overrides(cell.group, cell.option), f"detector={cell.detector}"])
        if cell.runs:
            with pytest.raises(_ReachedData):
                build_experiment(cfg)
            continue
        with pytest.raises(AlrunError) as err:
            build_experiment(cfg)
        who, reason = str(err.value).split(": ", 1)
        assert who.startswith(cell.group), (cell, who)
        assert reason == cell.refusal.split(": ", 1)[1], cell
