"""The shared per-box -> per-image pipeline (alrun.acquisition.reduction): every scorer weights
boxes the same way under ``aggregator: weighted`` and counts sources by the same rule."""

from __future__ import annotations

import pytest
import torch

from alrun.acquisition.context import PredictionBatch
from alrun.acquisition.mixture import MixtureUncertainty
from alrun.acquisition.multipass import PassUncertainty
from alrun.acquisition.reduction import kept_rows, valid_boxes
from alrun.acquisition.scores import least_confidence, localization_instability
from alrun.acquisition.strategies import BoxUncertainty
from alrun.errors import AlrunError
from alrun.types import Detections

# An FCOS-like image: the ranking score sqrt(cls * centerness) differs from the class
# probability. Box 0: class prob 0.3, score 0.9; box 1: class prob 0.9, score 0.1.
CLASS_PROBS = [[0.3], [0.9]]
SCORES = [0.9, 0.1]
# confidence-weighted mean by max class probability of per-box values v:
# (0.3 * v0 + 0.9 * v1) / 1.2; by detector score it would be (0.9 * v0 + 0.1 * v1) / 1.0


def _fcos_image(values=None, passes=()):
    cp = torch.tensor(CLASS_PROBS)
    return Detections(
        image_id="a",
        boxes=torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 40, 40]]),
        scores=torch.tensor(SCORES),
        labels=torch.zeros(2, dtype=torch.int64),
        probs=torch.cat([cp, 1 - cp], dim=1),
        class_probs=cp,
        sources=torch.tensor([0, 1]),
        head="sigmoid",
        mdn=None if values is None else torch.tensor(values),
        passes=passes,
    )


def test_box_uncertainty_weighted_uses_max_class_probability():
    # least confidence on the binary distribution: box 0 1 - 0.7 = 0.3, box 1 1 - 0.9 = 0.1
    # (0.3 * 0.3 + 0.9 * 0.1) / 1.2 = 0.15 (by detector score it would be 0.28)
    scorer = BoxUncertainty(least_confidence, "weighted", 0.05)
    assert scorer.image_score(_fcos_image()) == pytest.approx(0.15)


def test_mixture_uncertainty_weighted_uses_max_class_probability():
    # one image, two boxes: z-scores of column 0 (values 4, 2) are +1, -1, other columns 0.
    # column 0: (0.3 * 1 + 0.9 * -1) / 1.2 = -0.5; max over columns with the zeros -> 0.0;
    # uncertainty=la_only keeps column 0 alone: -0.5 (by detector score: 0.8)
    values = [[4.0, 0, 0, 0], [2.0, 0, 0, 0]]
    batch = PredictionBatch.from_detections([_fcos_image(values)])
    scorer = MixtureUncertainty(
        uncertainty="loc_aleatoric", aggregator="weighted", score_threshold=0.05
    )
    assert scorer.batch_scores(batch) == [pytest.approx(-0.5)]


def test_pass_uncertainty_weighted_uses_max_class_probability():
    # one noisy view moving box 0 by 5 px (IoU 10*5/(150) = 1/3) and box 1 not at all:
    # instability 2/3 and 0 -> (0.3 * 2/3 + 0.9 * 0) / 1.2 = 1/6
    view = Detections(
        image_id="a",
        boxes=torch.tensor([[5.0, 0, 15, 10], [20.0, 20, 40, 40]]),
        scores=torch.tensor(SCORES),
        labels=torch.zeros(2, dtype=torch.int64),
        probs=torch.tensor([[0.3, 0.7], [0.9, 0.1]]),
        class_probs=torch.tensor(CLASS_PROBS),
        head="sigmoid",
    )
    batch = PredictionBatch.from_detections([_fcos_image(passes=(view,))])
    scorer = PassUncertainty(
        localization_instability,
        source="tta",
        views=["noise:0.1"],
        aggregator="weighted",
        score_threshold=0.05,
        match_threshold=0.3,
    )
    assert scorer.batch_scores(batch) == [pytest.approx(1 / 6)]


def _two_classes_one_anchor():
    # per-class NMS kept anchor 0 twice (classes 0 and 1) and anchor 1 once
    return PredictionBatch.from_detections(
        [
            Detections(
                image_id="a",
                boxes=torch.tensor([[0.0, 0, 30, 30], [0.0, 0, 30, 30], [40.0, 40, 80, 80]]),
                scores=torch.tensor([0.6, 0.4, 0.5]),
                labels=torch.tensor([0, 1, 0]),
                sources=torch.tensor([0, 0, 1]),
            )
        ]
    )


def test_count_sources_once_keeps_the_best_row_per_anchor():
    batch = _two_classes_one_anchor()
    assert kept_rows(batch, 0.05, "once").tolist() == [0, 2]
    assert kept_rows(batch, 0.05, "per_class").tolist() == [0, 1, 2]
    assert kept_rows(batch, 0.45, "per_class").tolist() == [0, 2]


def test_valid_boxes_is_strict_on_both_bounds():
    boxes = torch.tensor(
        [
            [0.0, 0, 16, 16],  # sqrt(w h) = 16: not > 16, dropped
            [0.0, 0, 17, 17],  # kept
            [0.0, 0, 101, 20],  # ratio 5.05: not < 5, dropped
            [0.0, 0, 99, 20],  # ratio 4.95: kept
            [0.0, 0, 20, 101],  # the other way: dropped
            [5.0, 5, 5, 5],  # empty box: dropped, no NaN
            # exactly 5: PPAL divides by h + 1e-10, so 100 / 20 is just under 5 and kept
            [0.0, 0, 100, 20],
        ]
    )
    assert valid_boxes(boxes, 16.0, 5.0).tolist() == [False, True, False, True, False, False, True]


@pytest.mark.parametrize("cls", [BoxUncertainty])
def test_unknown_count_sources_is_one_line_naming_the_key(cls):
    with pytest.raises(AlrunError, match=r"strategy.scorer.count_sources: expected one of"):
        cls(least_confidence, count_sources="twice")


def test_describe_records_the_reduction():
    record = BoxUncertainty(least_confidence, "weighted", count_sources="per_class").describe()
    assert record["aggregator_weights"] == "max class probability"
    assert record["count_sources"] == "per_class"
