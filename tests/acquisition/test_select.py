import math
import random

import pytest

from alrun.acquisition.select import TopK, ranked


def unit_cost(_: str) -> float:
    return 1.0


def test_ranked_descending_with_ties_by_ascending_id():
    scores = {"c": 0.5, "a": 0.5, "d": 0.9, "b": 0.5, "e": 0.1}
    assert ranked(scores) == ["d", "a", "b", "c", "e"]


def test_ranked_independent_of_insertion_order():
    items = [("img3", 0.2), ("img1", 0.2), ("img2", 0.7), ("img0", 0.2)]
    forward = ranked(dict(items))
    backward = ranked(dict(reversed(items)))
    assert forward == backward == ["img2", "img0", "img1", "img3"]


def test_topk_unit_costs_takes_best_k():
    scores = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7}
    assert TopK()(scores, 2, unit_cost) == ["b", "d"]
    assert TopK()(scores, 10, unit_cost) == ["b", "d", "c", "a"]
    assert TopK()(scores, 0, unit_cost) == []


def test_topk_tie_break_is_deterministic():
    scores = {"z": 1.0, "m": 1.0, "a": 1.0}
    assert TopK()(scores, 2, unit_cost) == ["a", "m"]
    assert TopK()(dict(reversed(list(scores.items()))), 2, unit_cost) == ["a", "m"]


def test_topk_greedy_fill_skips_expensive_image():
    scores = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.1}
    costs = {"a": 5.0, "b": 10.0, "c": 3.0, "d": 2.0}
    # a (5) -> b would make 15 > 10, skipped -> c (8) -> d (10 <= 10)
    picked = TopK()(scores, 10.0, costs.__getitem__)
    assert picked == ["a", "c", "d"]
    assert sum(costs[i] for i in picked) == pytest.approx(10.0)


def test_topk_never_exceeds_budget_random():
    rng = random.Random(0)
    for _ in range(50):
        ids = [f"i{k}" for k in range(rng.randint(1, 12))]
        scores = {i: rng.random() for i in ids}
        costs = {i: rng.uniform(0.5, 30.0) for i in ids}
        budget = rng.uniform(0.0, 80.0)
        picked = TopK()(scores, budget, costs.__getitem__)
        assert len(set(picked)) == len(picked)
        assert sum(costs[i] for i in picked) <= budget + 1e-9
        # greedy: every image passed over did not fit at the moment it was considered
        spent = 0.0
        for image_id in ranked(scores):
            if image_id in picked:
                spent += costs[image_id]
            else:
                assert spent + costs[image_id] > budget


def test_topk_neg_inf_selected_last_and_inf_first():
    scores = {"a": -math.inf, "b": 0.1, "c": math.inf, "d": -5.0}
    assert TopK()(scores, 10, unit_cost) == ["c", "b", "d", "a"]
    assert TopK()(scores, 3, unit_cost) == ["c", "b", "d"]


def test_topk_absent_images_never_selected():
    scores = {"a": 0.2}
    assert TopK()(scores, 10, unit_cost) == ["a"]


def test_topk_nan_raises():
    scores = {"a": 0.3, "b": math.nan, "c": 0.1}
    with pytest.raises(ValueError, match="NaN"):
        TopK()(scores, 10, unit_cost)
    # even when the budget would be spent before reaching the NaN image
    with pytest.raises(ValueError, match="'b'"):
        TopK()(scores, 1, unit_cost)
