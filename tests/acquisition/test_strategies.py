import math
from functools import partial

import pytest
import torch

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.scores import entropy, least_confidence, margin
from alrun.acquisition.select import TopK
from alrun.acquisition.strategies import BoxUncertainty, RandomScore, Strategy
from alrun.detectors.capabilities import check_capabilities
from alrun.errors import AlrunError
from alrun.types import Detections, Needs


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


def ctx(preds=None, ids=None, seed=0, round=0, **kwargs):
    """An acquisition context over ``preds`` (pool = their ids unless ``ids`` is given)."""
    if ids is None:
        ids = tuple(d.image_id for d in preds or ())
    batch = None if preds is None else PredictionBatch.from_detections(preds)
    return AcquisitionContext(tuple(ids), seed, round, preds=batch, **kwargs)


# these tests check arithmetic on the foreground (class-vs-class) distribution
Foreground = partial(BoxUncertainty, distribution="foreground")


def test_score_threshold_drops_low_confidence_boxes():
    dets = make_dets()
    # threshold 0.1 drops box 2: mean margin (1.0 + 0.0) / 2
    assert Foreground(margin, "mean", 0.1).image_score(dets) == pytest.approx(0.5)
    # threshold 0 keeps all three: (1.0 + 0.0 + 0.75) / 3
    assert Foreground(margin, "mean", 0.0).image_score(dets) == pytest.approx(1.75 / 3)
    # threshold 0.5 keeps box 1 only
    assert Foreground(margin, "mean", 0.5).image_score(dets) == pytest.approx(0.0)


def test_score_threshold_is_inclusive():
    dets = make_dets(scores=(0.5, 0.25), probs=[[0.45, 0.45, 0.1], [0.8, 0.0, 0.2]])
    assert Foreground(margin, "max", 0.5).image_score(dets) == pytest.approx(1.0)


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
    scorer = Foreground(margin, aggregator, 0.1)
    assert scorer.image_score(make_dets()) == pytest.approx(expected)


def test_box_score_function_is_applied():
    dets = make_dets()
    assert Foreground(least_confidence, "sum", 0.1).image_score(dets) == pytest.approx(0.5)
    assert Foreground(entropy, "max", 0.1).image_score(dets) == pytest.approx(math.log(2))


def test_use_background_scores_full_distribution():
    # box 1 with background: (0.8, 0.0, 0.2) -> margin 1 - (0.8 - 0.2) = 0.4
    dets = make_dets()
    assert BoxUncertainty(margin, "min", 0.5, distribution="with_background").image_score(
        dets
    ) == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("empty", "expected"),
    [("min", -math.inf), ("max", math.inf), (0.25, 0.25), (3, 3.0)],
)
def test_empty_policies(empty, expected):
    scorer = Foreground(margin, "mean", 0.9, empty=empty)
    assert scorer.image_score(make_dets()) == expected  # every box is below 0.9
    assert scorer.image_score(Detections.empty("none", num_probs=3)) == expected
    out = scorer(ctx([make_dets("a"), Detections.empty("b", num_probs=3)]))
    assert out == {"a": expected, "b": expected}


def test_empty_skip_leaves_image_out():
    scorer = Foreground(margin, "mean", 0.1, empty="skip")
    assert scorer.image_score(Detections.empty("b", num_probs=3)) is None
    out = scorer(ctx([make_dets("a"), Detections.empty("b", num_probs=3)]))
    assert out == {"a": pytest.approx(0.5)}


def test_scorer_needs_probs_and_predictions():
    scorer = BoxUncertainty(margin)
    with pytest.raises(AlrunError):
        scorer(ctx(None, ids=("img",)))
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
    base = scorer(ctx(ids=ids, seed=1, round=2))
    assert set(base) == set(ids)
    assert all(0.0 <= v < 1.0 for v in base.values())
    assert scorer(ctx(ids=ids, seed=1, round=2)) == base
    assert scorer(ctx(ids=tuple(reversed(ids)), seed=1, round=2)) == base
    assert scorer(ctx(ids=ids, seed=2, round=2)) != base
    assert scorer(ctx(ids=ids, seed=1, round=3)) != base
    assert scorer(ctx(ids=ids, seed=1, round=-1)) != base


def test_random_score_ignores_predictions():
    with_preds = ctx([make_dets("a"), make_dets("b")])
    assert RandomScore()(with_preds) == RandomScore()(ctx(ids=("a", "b")))


def test_strategy_needs_and_metadata():
    random_strategy = Strategy("random", RandomScore())
    assert random_strategy.needs.detections is False
    assert random_strategy.needs.probs is False
    assert random_strategy.aggregator is None
    assert random_strategy.score_threshold == 0.0
    assert isinstance(random_strategy.selector, TopK)

    uncertainty = Strategy("margin", Foreground(margin, "max", 0.2))
    assert uncertainty.needs.probs is True
    assert uncertainty.needs.detections is True
    assert uncertainty.aggregator == "max"
    assert uncertainty.score_threshold == pytest.approx(0.2)


def test_strategy_score_and_select():
    strategy = Strategy("margin", Foreground(margin, "mean", 0.1))
    preds = [
        make_dets("a"),  # 0.5
        make_dets("b", scores=(0.9,), probs=[[0.45, 0.45, 0.1]]),  # 1.0
        Detections.empty("c", num_probs=3),  # -inf
    ]
    scores = strategy.score(ctx(preds))
    assert scores == {"a": pytest.approx(0.5), "b": pytest.approx(1.0), "c": -math.inf}
    assert strategy.select(scores, ctx(preds, budget=2)) == ["b", "a"]
    assert strategy.select(scores, ctx(preds, budget=3)) == ["b", "a", "c"]


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


def one_class_dets(image_id, class_probs, scores=None):
    """A one-class detector's boxes: class_probs (N, 1) are the head's own sigmoids."""
    cp = torch.tensor(class_probs, dtype=torch.float32).reshape(-1, 1)
    n = len(cp)
    return Detections(
        image_id=image_id,
        boxes=torch.zeros((n, 4)),
        scores=cp.flatten() if scores is None else torch.tensor(scores),
        labels=torch.zeros(n, dtype=torch.int64),
        probs=torch.cat([cp, 1 - cp], dim=1),
        class_probs=cp,
        head="sigmoid",
    )


@pytest.mark.parametrize("box_score", [entropy, margin, least_confidence])
def test_one_class_dataset_scores_rank_images(box_score):
    preds = [
        one_class_dets("sure", [0.95, 0.9]),
        one_class_dets("unsure", [0.5, 0.55]),
        one_class_dets("middle", [0.7, 0.8]),
    ]
    scores = BoxUncertainty(box_score)(ctx(preds))  # default distribution: binary
    assert len(set(scores.values())) == 3
    assert sorted(scores, key=scores.get, reverse=True) == ["unsure", "middle", "sure"]
    # the old default (foreground) is constant with one class: every image scores 0
    fg = BoxUncertainty(box_score, distribution="foreground")(ctx(preds))
    assert set(fg.values()) == {0.0}


def test_binary_distribution_values():
    # p = 0.8 -> Bernoulli (0.8, 0.2): entropy, margin 1 - 0.6, least confidence 0.2
    dets = one_class_dets("a", [0.8])
    assert BoxUncertainty(entropy, "max", 0.0).image_score(dets) == pytest.approx(
        -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    )
    assert BoxUncertainty(margin, "max", 0.0).image_score(dets) == pytest.approx(0.4)
    assert BoxUncertainty(least_confidence, "max", 0.0).image_score(dets) == pytest.approx(0.2)


def test_binary_uses_sigmoid_class_probs_of_the_predicted_label():
    # two classes; sigmoid head: class_probs are independent (0.3, 0.9), label 1 predicted
    dets = Detections(
        "a",
        torch.zeros((1, 4)),
        torch.tensor([0.9]),
        torch.tensor([1]),
        probs=torch.softmax(torch.tensor([[0.3, 0.9, 0.0]]).logit().nan_to_num(0), 1),
        class_probs=torch.tensor([[0.3, 0.9]]),
        head="sigmoid",
    )
    assert BoxUncertainty(least_confidence, "max", 0.0).image_score(dets) == pytest.approx(0.1)


def test_with_background_needs_a_softmax_head():
    scorer = BoxUncertainty(entropy, distribution="with_background")
    scorer.check_detector("softmax")
    with pytest.raises(AlrunError, match="with_background"):
        scorer.check_detector("sigmoid")
    with pytest.raises(AlrunError, match="strategy.scorer.distribution"):
        BoxUncertainty(entropy, distribution="softmax")


def test_rows_from_one_source_are_counted_once():
    # per-class NMS kept the same anchor twice (labels 0 and 1, same probs): count it once
    probs = [[0.45, 0.45, 0.10], [0.45, 0.45, 0.10], [0.80, 0.00, 0.20]]
    dets = Detections(
        "a",
        torch.zeros((3, 4)),
        torch.tensor([0.45, 0.44, 0.8]),
        torch.tensor([0, 1, 0]),
        probs=torch.tensor(probs),
        sources=torch.tensor([7, 7, 3]),
    )
    # foreground margins: source 7 -> 1.0 (once), source 3 -> 0.0
    assert Foreground(margin, "sum", 0.1).image_score(dets) == pytest.approx(1.0)
    assert Foreground(margin, "mean", 0.1).image_score(dets) == pytest.approx(0.5)
    without_sources = Detections(**{**dets.__dict__, "sources": None})
    assert Foreground(margin, "sum", 0.1).image_score(without_sources) == pytest.approx(2.0)


def test_describe_records_the_distribution_and_selector():
    described = Strategy("entropy", BoxUncertainty(entropy, "max", 0.2)).describe()
    assert described["strategy"] == "entropy"
    assert described["distribution"] == "binary"
    assert described["aggregator"] == "max"
    assert described["box_score"] == "entropy"
    assert described["score_threshold"] == pytest.approx(0.2)
    assert described["selector"] == "topk"


def test_named_callable_aggregator():
    def top2_sum(scores, segment, num_segments, confidences):
        out = torch.zeros(num_segments, dtype=torch.float64)
        for i in range(num_segments):
            out[i] = scores[segment == i].double().topk(2).values.sum()
        return out

    scorer = Foreground(margin, top2_sum, 0.0)
    # margins 1.0, 0.0, 0.75 -> two largest sum 1.75
    assert scorer.image_score(make_dets()) == pytest.approx(1.75)
    assert scorer.describe()["aggregator"] == "top2_sum"


def test_selector_needing_embeddings_requires_the_embeddings_capability():
    class NeedsEmbeddings(TopK):
        needs = Needs(detections=False, embedding=True, labelled_embeddings=True)

    strategy = Strategy("kcenter", RandomScore(), NeedsEmbeddings())
    assert strategy.needs.embedding and strategy.needs.labelled_embeddings
    assert strategy.requires == {"embeddings"}
    check_capabilities([("strategy=kcenter", strategy.requires)], frozenset({"embeddings"}), "d")
    with pytest.raises(AlrunError, match="^strategy=kcenter: needs embeddings .* which d does"):
        check_capabilities([("strategy=kcenter", strategy.requires)], frozenset(), "d")
