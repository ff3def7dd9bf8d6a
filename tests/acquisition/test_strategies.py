import math

import pytest
import torch

from alrun.acquisition.scores import entropy, least_confidence, margin
from alrun.acquisition.select import TopK
from alrun.acquisition.strategies import BoxUncertainty, RandomScore, ScoringContext, Strategy
from alrun.errors import AlrunError
from alrun.types import Detections


def make_dets(image_id="img", scores=(0.45, 0.8, 0.05), probs=None, with_feats=False):
    """Two object classes + background (last column).

    box 0: (0.45, 0.45 | 0.1) -> foreground (0.5, 0.5): margin 1.0, LC 0.5, entropy ln 2
    box 1: (0.8, 0.0 | 0.2)   -> foreground (1.0, 0.0): margin 0.0, LC 0.0, entropy 0
    box 2: (0.05, 0.03 | 0.92) -> foreground (0.625, 0.375): margin 0.75, LC 0.375
    """
    if probs is None:
        probs = [[0.45, 0.45, 0.10], [0.80, 0.00, 0.20], [0.05, 0.03, 0.92]]
    n = len(scores)
    return Detections(
        image_id=image_id,
        boxes=torch.arange(n * 4, dtype=torch.float32).reshape(n, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor([0, 0, 0][:n]),
        probs=torch.tensor(probs, dtype=torch.float32),
        feats=torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) if with_feats else None,
    )


CTX = ScoringContext(image_ids=("img",), seed=0, round=0)


def test_score_threshold_drops_low_confidence_boxes():
    dets = make_dets()
    # threshold 0.1 drops box 2: mean margin (1.0 + 0.0) / 2
    assert BoxUncertainty(margin, "mean", 0.1).image_score(dets) == pytest.approx(0.5)
    # threshold 0 keeps all three: (1.0 + 0.0 + 0.75) / 3
    assert BoxUncertainty(margin, "mean", 0.0).image_score(dets) == pytest.approx(1.75 / 3)
    # threshold 0.5 keeps box 1 only
    assert BoxUncertainty(margin, "mean", 0.5).image_score(dets) == pytest.approx(0.0)


def test_score_threshold_is_inclusive():
    dets = make_dets(scores=(0.5, 0.25), probs=[[0.45, 0.45, 0.1], [0.8, 0.0, 0.2]])
    assert BoxUncertainty(margin, "max", 0.5).image_score(dets) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("aggregator", "expected"),
    [
        ("mean", 0.5),
        ("sum", 1.0),
        ("max", 1.0),
        ("min", 0.0),
        # weighted by detector scores: (0.45 * 1.0 + 0.8 * 0.0) / (0.45 + 0.8) = 0.36
        ("weighted", 0.36),
    ],
)
def test_aggregator_is_applied(aggregator, expected):
    scorer = BoxUncertainty(margin, aggregator, 0.1)
    assert scorer.image_score(make_dets()) == pytest.approx(expected)


def test_box_score_function_is_applied():
    dets = make_dets()
    assert BoxUncertainty(least_confidence, "sum", 0.1).image_score(dets) == pytest.approx(0.5)
    assert BoxUncertainty(entropy, "max", 0.1).image_score(dets) == pytest.approx(math.log(2))


def test_use_background_scores_full_distribution():
    # box 1 with background: (0.8, 0.0, 0.2) -> margin 1 - (0.8 - 0.2) = 0.4
    dets = make_dets()
    assert BoxUncertainty(margin, "min", 0.5, use_background=True).image_score(
        dets
    ) == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("empty", "expected"),
    [("min", -math.inf), ("max", math.inf), (0.25, 0.25), (3, 3.0)],
)
def test_empty_policies(empty, expected):
    scorer = BoxUncertainty(margin, "mean", 0.9, empty=empty)
    assert scorer.image_score(make_dets()) == expected  # every box is below 0.9
    assert scorer.image_score(Detections.empty("none", num_probs=3)) == expected
    out = scorer([make_dets("a"), Detections.empty("b", num_probs=3)], CTX)
    assert out == {"a": expected, "b": expected}


def test_empty_skip_leaves_image_out():
    scorer = BoxUncertainty(margin, "mean", 0.1, empty="skip")
    assert scorer.image_score(Detections.empty("b", num_probs=3)) is None
    out = scorer([make_dets("a"), Detections.empty("b", num_probs=3)], CTX)
    assert out == {"a": pytest.approx(0.5)}


def test_scorer_needs_probs_and_predictions():
    scorer = BoxUncertainty(margin)
    with pytest.raises(AlrunError):
        scorer(None, CTX)
    no_probs = Detections("x", torch.zeros((1, 4)), torch.tensor([0.9]), torch.tensor([0]))
    with pytest.raises(AlrunError, match="probabilities"):
        scorer.image_score(no_probs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"aggregator": "median"},
        {"empty": "zero"},
        {"score_threshold": 1.0},
        {"score_threshold": -0.1},
    ],
)
def test_bad_configuration_raises(kwargs):
    with pytest.raises(AlrunError):
        BoxUncertainty(margin, **kwargs)


def test_random_score_is_reproducible():
    ids = ("a", "b", "c", "d", "e")
    scorer = RandomScore()
    base = scorer(None, ScoringContext(ids, seed=1, round=2))
    assert set(base) == set(ids)
    assert all(0.0 <= v < 1.0 for v in base.values())
    assert scorer(None, ScoringContext(ids, seed=1, round=2)) == base
    assert scorer(None, ScoringContext(tuple(reversed(ids)), 1, 2)) == base
    assert scorer(None, ScoringContext(ids, seed=2, round=2)) != base
    assert scorer(None, ScoringContext(ids, seed=1, round=3)) != base
    assert scorer(None, ScoringContext(ids, seed=1, round=-1)) != base


def test_random_score_ignores_predictions():
    ids = ("a", "b")
    ctx = ScoringContext(ids, seed=0, round=0)
    assert RandomScore()([make_dets("a")], ctx) == RandomScore()(None, ctx)


def test_strategy_needs_and_metadata():
    random_strategy = Strategy("random", RandomScore())
    assert random_strategy.needs.detections is False
    assert random_strategy.needs.probs is False
    assert random_strategy.aggregator is None
    assert random_strategy.score_threshold == 0.0
    assert isinstance(random_strategy.selector, TopK)

    uncertainty = Strategy("margin", BoxUncertainty(margin, "max", 0.2))
    assert uncertainty.needs.probs is True
    assert uncertainty.needs.detections is True
    assert uncertainty.aggregator == "max"
    assert uncertainty.score_threshold == pytest.approx(0.2)


def test_strategy_score_and_select():
    strategy = Strategy("margin", BoxUncertainty(margin, "mean", 0.1))
    preds = [
        make_dets("a"),  # 0.5
        make_dets("b", scores=(0.9,), probs=[[0.45, 0.45, 0.1]]),  # 1.0
        Detections.empty("c", num_probs=3),  # -inf
    ]
    scores = strategy.score(preds, ScoringContext(("a", "b", "c"), 0, 0))
    assert scores == {"a": pytest.approx(0.5), "b": pytest.approx(1.0), "c": -math.inf}
    assert strategy.select(scores, 2, lambda _: 1.0) == ["b", "a"]
    assert strategy.select(scores, 3, lambda _: 1.0) == ["b", "a", "c"]


@pytest.mark.parametrize(
    "index",
    [torch.tensor([True, False, True]), torch.tensor([0, 2])],
    ids=["mask", "indices"],
)
def test_detections_select_filters_every_per_box_field(index):
    dets = make_dets(with_feats=True)
    dets = Detections(**{**dets.__dict__, "embedding": torch.ones(5)})
    kept = dets.select(index)
    assert len(kept) == 2
    assert kept.image_id == "img"
    assert torch.equal(kept.boxes, dets.boxes[[0, 2]])
    assert torch.equal(kept.scores, dets.scores[[0, 2]])
    assert torch.equal(kept.labels, dets.labels[[0, 2]])
    assert torch.equal(kept.probs, dets.probs[[0, 2]])
    assert torch.equal(kept.feats, dets.feats[[0, 2]])
    assert torch.equal(kept.embedding, dets.embedding)  # per image, not per box
    assert kept.proposals is None
    assert len(dets) == 3  # the original is untouched


def test_detections_select_empty_mask():
    kept = make_dets().select(torch.zeros(3, dtype=torch.bool))
    assert len(kept) == 0
    assert kept.probs.shape == (0, 3)
