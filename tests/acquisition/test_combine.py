import math

import pytest
import torch

from alrun.acquisition.combine import (
    FailureModeWeighted,
    WeightedSum,
    labelled_failure_modes,
    rank_normalise,
    weight_at,
    zscore_normalise,
)
from alrun.acquisition.context import AcquisitionContext
from alrun.errors import AlrunError
from alrun.types import Needs


class Fixed:
    """A scorer returning fixed scores."""

    def __init__(self, scores, needs=None):
        self.scores = scores
        self.needs = needs or Needs(detections=False)

    def __call__(self, context):
        return dict(self.scores)

    def describe(self):
        return {"scorer": "fixed"}


def ctx(round_index):
    return AcquisitionContext(("a", "b", "c"), 0, round_index)


def test_rank_normalise_with_ties_and_infinities():
    assert rank_normalise([3.0, 1.0, 2.0]) == [1.0, 0.0, 0.5]
    assert rank_normalise([1.0, 1.0, 5.0]) == [0.25, 0.25, 1.0]
    assert rank_normalise([-math.inf, 0.0, math.inf]) == [0.0, 0.5, 1.0]
    assert rank_normalise([7.0]) == [1.0]


def test_zscore_normalise():
    z = zscore_normalise([1.0, 2.0, 3.0])
    assert z == pytest.approx([-1.2247449, 0.0, 1.2247449])
    assert zscore_normalise([4.0, 4.0]) == [0.0, 0.0]
    # infinities clipped to the finite range: -inf acts as the minimum
    clipped = zscore_normalise([1.0, 1.0, 3.0])
    assert zscore_normalise([-math.inf, 1.0, 3.0]) == pytest.approx(clipped)


def test_weight_schedule_steps():
    schedule = [[0, 1.0], [3, 0.25]]
    assert [weight_at(schedule, r, "u") for r in (0, 1, 2, 3, 7)] == [1, 1, 1, 0.25, 0.25]
    assert weight_at(0.5, 4, "u") == 0.5
    with pytest.raises(AlrunError, match="weights.u"):
        weight_at([[2, 1.0]], 0, "u")
    with pytest.raises(AlrunError, match="weights.u"):
        weight_at([[0, 1.0, 3]], 0, "u")


def test_weighted_sum_follows_the_round_schedule():
    unc = Fixed({"a": 0.9, "b": 0.5, "c": 0.1})  # ranks a > b > c
    div = Fixed({"a": 1.0, "b": 2.0, "c": 30.0})  # ranks c > b > a
    combo = WeightedSum(
        {"unc": unc, "div": div},
        {"unc": [[0, 1.0], [2, 0.2]], "div": [[0, 0.0], [2, 0.8]]},
    )
    early = combo(ctx(0))
    assert max(early, key=early.get) == "a"
    assert combo.describe()["weights_this_round"] == {"unc": 1.0, "div": 0.0}
    late = combo(ctx(2))
    assert max(late, key=late.get) == "c"
    assert late["c"] == pytest.approx(0.8)  # 0.2 * 0 + 0.8 * 1
    assert combo.describe()["weights_this_round"] == {"unc": 0.2, "div": 0.8}


def test_weighted_sum_keeps_only_images_every_scorer_scored_and_merges_needs():
    combo = WeightedSum(
        {"u": Fixed({"a": 1.0, "b": 0.0}, Needs(probs=True)), "d": Fixed({"b": 1.0, "c": 2.0})},
        {"u": 1.0, "d": 1.0},
        normalise="zscore",
    )
    assert set(combo(ctx(0))) == {"b"}
    assert combo.needs.probs and combo.needs.detections


def test_weighted_sum_errors():
    with pytest.raises(AlrunError, match="one weight per scorer"):
        WeightedSum({"u": Fixed({})}, {"v": 1.0})
    with pytest.raises(AlrunError, match="normalise"):
        WeightedSum({"u": Fixed({})}, {"u": 1.0}, normalise="minmax")
    combo = WeightedSum({"u": Fixed({"a": math.nan})}, {"u": 1.0})
    with pytest.raises(AlrunError, match="scorers.u.*NaN"):
        combo(ctx(0))


def _preds(boxes, labels, scores):
    from alrun.acquisition.context import PredictionBatch
    from alrun.types import Detections

    d = Detections(
        image_id="L",
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.int64),
    )
    return PredictionBatch.from_detections([d])


def test_labelled_failure_modes_classify_each_box():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]])
    targets = {"L": (gt, torch.tensor([0, 0, 1, 0]))}
    preds = _preds(
        [[0, 0, 10, 10], [20, 20, 26, 26], [40, 40, 50, 50], [60, 60, 70, 70]],
        [0, 0, 0, 0],
        [0.9, 0.9, 0.9, 0.2],  # the last one is below the threshold
    )
    counts = labelled_failure_modes(preds, targets, 0.5)
    # box 0 found; box 1 IoU 0.36 same class -> poor_loc; box 2 class 1 met by class 0 ->
    # wrong_class; box 3 only a low-score detection -> missed
    assert counts == {"missed": 1, "poor_loc": 1, "wrong_class": 1}


def test_failure_mode_weights_follow_the_dominant_mode():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    targets = {"L": (gt, torch.tensor([0, 0]))}
    preds = _preds([[0, 0, 10, 10]], [0], [0.9])  # the second box is missed
    context = AcquisitionContext(("a", "b"), 0, 1, labelled_preds=preds, labelled_targets=targets)
    scorer = FailureModeWeighted(
        {"fn": Fixed({"a": 1.0, "b": 0.0}), "loc": Fixed({"a": 0.0, "b": 1.0})},
        {
            "missed": {"fn": 1.0, "loc": 0.0},
            "poor_loc": {"fn": 0.0, "loc": 1.0},
            "wrong_class": {"fn": 0.5, "loc": 0.5},
            "none": {"fn": 0.5, "loc": 0.5},
        },
    )
    scores = scorer(context)
    assert scores["a"] > scores["b"]
    described = scorer.describe()
    assert described["dominant_failure_mode"] == "missed"
    assert described["weights_this_round"] == {"fn": 1.0, "loc": 0.0}
    assert scorer.needs.labelled_detections
    with pytest.raises(AlrunError, match="mode_weights"):
        FailureModeWeighted({"fn": Fixed({})}, {"missed": {"fn": 1.0}})


def test_a_schedule_without_round_0_is_refused_when_built():
    """Round 0's selection uses the weights of round 0: refused at start-up, not after round 0
    trained."""
    with pytest.raises(AlrunError, match=r"weights.u: no step covers round 0"):
        WeightedSum({"u": Fixed({}), "d": Fixed({})}, {"u": [[1, 1.0]], "d": 1.0})


@pytest.mark.parametrize(
    "schedule",
    [math.nan, [[0, math.nan]], [[0, 1.0], [2, math.inf]], [[math.nan, 1.0]], [[0.5, 1.0]]],
)
def test_a_non_finite_weight_schedule_is_refused_when_built(schedule):
    with pytest.raises(AlrunError, match=r"strategy.scorer.weights.u: expected") as err:
        WeightedSum({"u": Fixed({})}, {"u": schedule})
    assert "\n" not in str(err.value)


def test_a_nan_failure_mode_weight_is_refused_when_built():
    modes = {m: {"u": 1.0} for m in ("missed", "poor_loc", "wrong_class", "none")}
    modes["poor_loc"] = {"u": math.nan}
    with pytest.raises(AlrunError, match=r"mode_weights.poor_loc.u: expected a finite number"):
        FailureModeWeighted({"u": Fixed({})}, modes)


def test_an_unscored_round_describes_the_strategy_as_built_not_the_last_round():
    """Issue 25 case 5: the last round scores nothing; its selection.json used to repeat the
    previous round's weights and candidates in an uninterrupted run, but not in a resumed one."""
    from alrun.acquisition.diversity import TwoPhase
    from alrun.acquisition.select import TopK
    from alrun.acquisition.strategies import Strategy

    def build():
        combo = WeightedSum(
            {"unc": Fixed({"a": 0.9, "b": 0.5, "c": 0.1}), "div": Fixed({"a": 1.0, "b": 2.0})},
            {"unc": [[0, 1.0], [2, 0.2]], "div": [[0, 0.0], [2, 0.8]]},
        )
        return Strategy("weighted", combo, TwoPhase(TopK(), expand_ratio=2))

    strategy, fresh = build(), build()
    context = AcquisitionContext(("a", "b", "c"), 0, 2, budget=1)
    assert strategy.select(strategy.score(context), context) == ["b"]
    scored = strategy.describe()  # this round's: weights and candidates
    assert scored["weights_this_round"] == {"unc": 0.2, "div": 0.8}
    assert scored["candidates"] == 2
    assert strategy.describe_unscored() == fresh.describe_unscored() == fresh.describe()
    assert strategy.describe_unscored()["weights_this_round"] == {}
    assert strategy.describe_unscored()["candidates"] == 0
