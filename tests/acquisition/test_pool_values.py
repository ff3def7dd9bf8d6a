"""PoolValues (a streamed step's scores and miss counts held by pool position) reads like the
dict it replaces, and TopK / two-phase rank it exactly as they rank that dict."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from alrun.acquisition.context import AcquisitionContext
from alrun.acquisition.pool_values import PoolValues
from alrun.acquisition.select import TopK, pool_ranking, ranked

POOL = [f"img{k:04d}" for k in range(300)]
INDEX = {image_id: n for n, image_id in enumerate(POOL)}


def held(scores: dict) -> PoolValues:
    values = PoolValues(POOL, INDEX)
    items = list(scores.items())
    for start in range(0, len(items), 64):  # as shards arrive
        values.update(dict(items[start : start + 64]))
    return values


def coarse_scores(seed: int, ids) -> dict[str, float]:
    """Few distinct values (many ties), -inf and signed zeros among them."""
    rng = random.Random(seed)
    return {i: rng.choice([0.25, 0.5, 0.5, -math.inf, 0.0, -0.0, 1.0]) for i in ids}


def test_pool_values_read_like_the_dict_they_hold():
    scores = coarse_scores(0, POOL[10:200])
    values = held(scores)
    assert dict(values) == scores and values == scores and len(values) == len(scores)
    assert list(values) == list(scores)  # pool order, as the shards came
    assert "img0000" not in values and "nope" not in values and "img0010" in values
    with pytest.raises(KeyError):
        values["img0000"]
    assert values.get("img0000", -1.0) == -1.0


def test_pairs_of_counts_read_as_tuples():
    misses = PoolValues(POOL, INDEX, width=2, dtype=np.int64)
    misses.update({"img0003": (4, 1), "img0001": (0, 0)})
    assert dict(misses) == {"img0001": (0, 0), "img0003": (4, 1)}
    assert misses["img0003"] == (4, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_array_ranking_equals_the_dict_ranking(seed: int):
    candidates = POOL[5:290]
    scores = coarse_scores(seed, random.Random(seed).sample(candidates, 200))  # some unscored
    context = AcquisitionContext(tuple(candidates), seed, 3, budget=40)
    expected = ranked(scores, context.tie_rank())
    assert pool_ranking(held(scores), context) == expected
    assert pool_ranking(scores, context) == expected
    assert TopK()(held(scores), context) == TopK()(scores, context) == expected[:40]
