import math
import random

import pytest

from alrun.acquisition.context import AcquisitionContext
from alrun.acquisition.select import TopK, fill_budget, ranked
from alrun.errors import AlrunError


def unit_cost(_: str) -> float:
    return 1.0


def topk(scores, budget, cost_of=unit_cost, fill="skip", seed=0, round=0):
    context = AcquisitionContext(tuple(scores), seed, round, budget, cost_of, fill)
    return TopK()(scores, context)


def by_id(scores):
    """A tie order equal to id order, to test ranking arithmetic alone."""
    return {i: k for k, i in enumerate(sorted(scores))}


def test_ranked_descending_with_ties_by_ascending_id():
    scores = {"c": 0.5, "a": 0.5, "d": 0.9, "b": 0.5, "e": 0.1}
    assert ranked(scores, by_id(scores)) == ["d", "a", "b", "c", "e"]


def test_ranked_independent_of_insertion_order():
    items = [("img3", 0.2), ("img1", 0.2), ("img2", 0.7), ("img0", 0.2)]
    forward = ranked(dict(items), by_id(dict(items)))
    backward = ranked(dict(reversed(items)), by_id(dict(items)))
    assert forward == backward == ["img2", "img0", "img1", "img3"]


def test_topk_unit_costs_takes_best_k():
    scores = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7}
    assert topk(scores, 2, unit_cost) == ["b", "d"]
    assert topk(scores, 10, unit_cost) == ["b", "d", "c", "a"]
    assert topk(scores, 0, unit_cost) == []


def test_topk_ties_follow_a_seeded_order_not_ids():
    scores = {f"img{k:03d}": 1.0 for k in range(200)}
    picked = topk(scores, 20, seed=0, round=1)
    assert picked == topk(dict(reversed(list(scores.items()))), 20, seed=0, round=1)
    assert picked != sorted(scores)[:20]  # not capture/id order
    assert topk(scores, 20, seed=1, round=1) != picked
    assert topk(scores, 20, seed=0, round=2) != picked
    # a seeded order spreads over the whole id range instead of its start
    assert max(int(i[3:]) for i in picked) > 100


def test_fill_stop_takes_a_prefix_and_skip_keeps_scanning():
    costs = {"a": 5.0, "b": 10.0, "c": 3.0, "d": 2.0}
    order = ["a", "b", "c", "d"]
    assert fill_budget(order, 10.0, costs.__getitem__, "stop") == ["a"]
    assert fill_budget(order, 10.0, costs.__getitem__, "skip") == ["a", "c", "d"]
    with pytest.raises(AlrunError, match="budget.fill"):
        fill_budget(order, 10.0, costs.__getitem__, "greedy")


def test_topk_greedy_fill_skips_expensive_image():
    scores = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.1}
    costs = {"a": 5.0, "b": 10.0, "c": 3.0, "d": 2.0}
    # a (5) -> b would make 15 > 10, skipped -> c (8) -> d (10 <= 10)
    picked = topk(scores, 10.0, costs.__getitem__)
    assert picked == ["a", "c", "d"]
    assert sum(costs[i] for i in picked) == pytest.approx(10.0)


def test_topk_never_exceeds_budget_random():
    rng = random.Random(0)
    for _ in range(50):
        ids = [f"i{k}" for k in range(rng.randint(1, 12))]
        scores = {i: rng.random() for i in ids}
        costs = {i: rng.uniform(0.5, 30.0) for i in ids}
        budget = rng.uniform(0.0, 80.0)
        picked = topk(scores, budget, costs.__getitem__)
        assert len(set(picked)) == len(picked)
        assert sum(costs[i] for i in picked) <= budget + 1e-9
        # greedy: every image passed over did not fit at the moment it was considered
        spent = 0.0
        for image_id in ranked(scores, by_id(scores)):
            if image_id in picked:
                spent += costs[image_id]
            else:
                assert spent + costs[image_id] > budget


def test_topk_neg_inf_selected_last_and_inf_first():
    scores = {"a": -math.inf, "b": 0.1, "c": math.inf, "d": -5.0}
    assert topk(scores, 10, unit_cost) == ["c", "b", "d", "a"]
    assert topk(scores, 3, unit_cost) == ["c", "b", "d"]


def test_topk_absent_images_never_selected():
    scores = {"a": 0.2}
    assert topk(scores, 10, unit_cost) == ["a"]


def test_topk_nan_raises():
    scores = {"a": 0.3, "b": math.nan, "c": 0.1}
    with pytest.raises(ValueError, match="NaN"):
        topk(scores, 10, unit_cost)
    # even when the budget would be spent before reaching the NaN image
    with pytest.raises(ValueError, match="'b'"):
        topk(scores, 1, unit_cost)
