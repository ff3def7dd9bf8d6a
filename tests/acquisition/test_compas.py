"""ComPAS box-level acquisition (alrun/acquisition/compas.py): the per-box disagreement on
hand-made predictions, candidates from a prediction batch with view passes, the greedy plan
within a budget, and bad options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alrun.acquisition.compas import (
    BoxCandidates,
    BoxQueryStrategy,
    ComPASScorer,
    box_disagreement,
    compas_values,
    plan_queries,
)
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.errors import AlrunError
from alrun.types import Detections

T = torch.tensor


def test_classification_disagreement_sums_matched_boxes_and_charges_a_miss():
    teacher = T([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    labels = T([1, 0])
    view1 = T([[0.0, 0, 10, 11], [1, 0, 10, 10], [50, 50, 60, 60]])  # two matches of box 0
    probs1 = T([[0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05]])
    view2 = T([[20.0, 20, 30, 30]])  # box 0 missed, box 1 matched
    probs2 = T([[0.25, 0.5, 0.25]])
    cls, reg = box_disagreement(teacher, labels, [view1, view2], [probs1, probs2], miss_prob=0.01)
    miss = -math.log(0.01)
    assert cls[0].item() == pytest.approx((-math.log(0.5) - math.log(0.8) + miss) / 2)
    assert cls[1].item() == pytest.approx((miss - math.log(0.25)) / 2)
    # box 1 matched exactly once: std over (teacher, match) = 0; box 0: its best match per view
    assert reg[1].item() == 0.0 and reg[0].item() > 0.0


def test_a_box_no_view_found_has_no_spread():
    empty = [torch.zeros(0, 4)], [torch.zeros(0, 2)]
    cls, reg = box_disagreement(T([[0.0, 0, 4, 4]]), T([0]), *empty)
    assert cls.tolist() == pytest.approx([-math.log(1e-3)]) and reg.tolist() == [0.0]


def test_values_skip_nan_and_a_flat_score_normalises_to_zero():
    value = compas_values({"score_cls": np.array([1.0, 3.0, np.nan]), "score_reg": np.ones(3)})
    assert value.tolist()[:2] == [0.0, 0.0] and math.isinf(value[2])
    value = compas_values({"score_cls": np.array([1.0, 3, 2]), "score_reg": np.array([1.0, 2, 2])})
    assert value.tolist() == pytest.approx([0.0, 1.0, 0.5])


def _det(image_id, boxes, labels, scores, probs):
    return Detections(image_id, T(boxes), T(scores), T(labels), probs=T(probs))


def _pool():
    """Two images; the teacher's plain-view boxes and one view pass each."""
    a = _det(
        "a",
        [[0.0, 0, 10, 10], [0, 0, 10, 10], [30, 30, 40, 40], [60, 60, 70, 70]],
        [0, 1, 1, 0],
        [0.9, 0.6, 0.8, 0.2],  # box 1 duplicates box 0's region; box 3 below the threshold
        [[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4]],
    )
    a_view = _det("a", [[0.0, 0, 10, 12], [31, 30, 41, 40]], [0, 1], [0.8, 0.7],
                  [[0.3, 0.6, 0.1], [0.1, 0.85, 0.05]])  # fmt: skip
    b = _det("b", [[5.0, 5, 25, 25]], [1], [0.95], [[0.1, 0.8, 0.1]])
    b_view = _det("b", [[5.0, 6, 25, 24]], [0], [0.6], [[0.6, 0.3, 0.1]])
    found = [
        Detections(**{**a.__dict__, "passes": (a_view,)}),
        Detections(**{**b.__dict__, "passes": (b_view,)}),
    ]
    return PredictionBatch.from_detections(found)


def test_candidates_from_a_prediction_batch_one_query_per_region():
    scorer = ComPASScorer(views=("hflip",), score_threshold=0.5, max_reg_uncertainty=0.5)
    c = scorer.candidates(_pool())
    assert c.image.tolist() == [0, 0, 1]  # a's duplicate (IoU 1 with a higher score) is gone
    assert c.boxes.tolist() == [[0, 0, 10, 10], [30, 30, 40, 40], [5, 5, 25, 25]]
    # score_cls: -log p(teacher class) in the view: a0 -log 0.3, a1 -log 0.85, b -log 0.3;
    # score_reg: |difference| / sqrt(2) over (w, h, w, h) of the mean box, mean of 4 coordinates
    r = 1 / math.sqrt(2)
    reg = np.array([(2 * r / 11) / 4, (2 * r / 10) / 4, (2 * r / 19) / 4])  # b: h 24.5 - 5.5
    cls_n = np.array([1.0, 0.0, 1.0])  # min-max over the pool
    reg_n = (reg - reg.min()) / (reg.max() - reg.min())
    np.testing.assert_allclose(c.value, cls_n * reg_n, atol=1e-6)
    assert c.ranked().tolist() == [0, 1, 2]  # ties at 0 keep pool order


def test_candidates_respect_the_localisation_filter():
    scorer = ComPASScorer(views=("hflip",), score_threshold=0.5, max_reg_uncertainty=1e-6)
    c = scorer.candidates(_pool())
    assert np.isinf(c.value).all()  # every box has some spread: none is asked (BLAD's filter)
    assert c.ranked().tolist() == []


def _candidates(values, images=(0, 0, 1, 1)):
    n = len(values)
    boxes = np.array([[i * 10.0, 0, i * 10 + 8, 8] for i in range(n)], np.float32)
    return BoxCandidates(("a", "b"), np.array(images), boxes, np.zeros(n, np.int64),
                         np.array(values, np.float64))  # fmt: skip


def test_plan_takes_boxes_by_value_until_the_next_does_not_fit():
    calls = []

    def charges(image_id, boxes, labels):
        calls.append((image_id, len(boxes)))
        return np.array([10.0, 30.0]) if image_id == "a" else np.array([5.0, 1.0])

    c = _candidates([0.9, 0.1, 0.5, np.inf])  # order: a0, b0 (a1 after; b1 never asked)
    planned = plan_queries(c, charges, budget=15)
    assert {k: len(v[0]) for k, v in planned.items()} == {"a": 1, "b": 1}
    assert sorted(calls) == [("a", 2), ("b", 1)]  # each image priced once, its askable boxes
    planned = plan_queries(c, charges, budget=14)
    assert list(planned) == ["a"]  # b0 (5 s) does not fit in the 4 s left: stop
    assert plan_queries(c, charges, budget=100)["a"][0].shape == (2, 4)


def test_free_queries_stop_once_the_budget_is_spent():
    c = _candidates([0.9, 0.8, 0.7, 0.6])
    planned = plan_queries(c, lambda i, b, lab: np.array([1.0, 0.0]), budget=1)
    assert {k: len(v[0]) for k, v in planned.items()} == {"a": 1}


def test_strategy_asks_for_boxes_not_images():
    strategy = BoxQueryStrategy("compas", ComPASScorer(views=("hflip",), score_threshold=0.5,
                                                       max_reg_uncertainty=0.5))  # fmt: skip
    context = AcquisitionContext(("a", "b", "c"), 0, 1, budget=1, cost_of=lambda i: 1.0,
                                 preds=_pool())  # fmt: skip
    scores = strategy.score(context)
    assert scores["c"] == 0.0 and scores["b"] == 0.0  # c has no box; b's box has value 0
    assert scores["a"] == pytest.approx(0.808, abs=1e-3)  # a's best box
    with pytest.raises(AlrunError, match="asks for boxes, not images"):
        strategy.select(scores, context)
    planned = strategy.plan(context, lambda i, b, lab: np.ones(len(b)))
    assert list(planned) == ["a"] and strategy.describe()["queries"] == 1.0
    assert strategy.needs.augment == ("hflip",) and strategy.needs.probs


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"views": ()}, "strategy.scorer.views"),
        ({"score_threshold": 1.5}, "strategy.scorer.score_threshold"),
        ({"match_iou": 0.0}, "strategy.scorer.match_iou"),
        ({"max_reg_uncertainty": 0.0}, "strategy.scorer.max_reg_uncertainty"),
    ],
)
def test_bad_scorer_options_name_the_key(kwargs, key):
    with pytest.raises(AlrunError, match=f"^{key}: "):
        ComPASScorer(**kwargs)


def test_bad_charge_names_the_key():
    with pytest.raises(AlrunError, match=r"^strategy\.charge: expected one of answered\|asked"):
        BoxQueryStrategy("compas", ComPASScorer(), charge="drawn")


def test_boxes_near_a_region_asked_before_are_not_asked_again():
    """Issue 24: a's first box overlaps its earlier answer (IoU >= 0.25, BLAD's assigner
    threshold): it is skipped after the pool-wide normalisation; a's other box can be asked."""
    strategy = BoxQueryStrategy("compas", ComPASScorer(views=("hflip",), score_threshold=0.5,
                                                       max_reg_uncertainty=0.5))  # fmt: skip
    asked = {"a": np.array([[0, 0, 9, 9]], np.float32)}
    plain = AcquisitionContext(("a", "b"), 0, 1, budget=5, preds=_pool())
    context = AcquisitionContext(("a", "b"), 0, 1, budget=5, preds=_pool(), asked=asked)
    before = strategy.score(plain)
    scores = strategy.score(context)
    assert before["a"] == pytest.approx(0.808, abs=1e-3)  # the first box
    assert scores["a"] == pytest.approx(0.0)  # the second box's value, unchanged by the skip
    planned = strategy.plan(context, lambda i, b, lab: np.ones(len(b)))
    assert planned["a"][0].tolist() == [[30, 30, 40, 40]]
    assert strategy.describe()["reasked_images"] == 1.0 and strategy.describe()["reask"]
    with pytest.raises(AlrunError, match="^strategy.reask_iou: "):
        BoxQueryStrategy("compas", ComPASScorer(), reask_iou=0.0)
