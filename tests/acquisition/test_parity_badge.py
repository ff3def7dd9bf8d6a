"""Parity with BADGE's reference seeding (github.com/JordanAsh/badge,
``query_strategies/badge_sampling.py`` ``init_centers``): the first centre is the embedding of
largest L2 norm; each next one is drawn with probability ``D^2 / sum(D^2)``, D the Euclidean
distance to the nearest centre so far. Expected probabilities below are worked out by hand from
that rule."""

from __future__ import annotations

import numpy as np
import pytest

from alrun.acquisition.badge import Badge, badge_seeding_order
from alrun.acquisition.diversity import kmeans_plusplus_order
from alrun.errors import AlrunError

# norms 3, 1, 2: the first centre is row 0 whatever the seed
X = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, -2.0]])


def test_first_centre_is_the_largest_gradient_norm():
    assert {badge_seeding_order(X, 1, seed)[0] for seed in range(50)} == {0}
    # scikit-learn's k-means++ (the kmeans_plusplus option) starts at random
    assert len({kmeans_plusplus_order(X, 1, seed)[0] for seed in range(50)}) > 1


def test_second_centre_is_plain_d2_sampling():
    # D^2 from row 0: |(-3, 1)|^2 = 10, |(-3, -2)|^2 = 13 -> P(row 1) = 10 / 23 = 0.4348
    # (greedy local trials would favour row 2, the one lowering the potential most)
    seeds = range(2000)
    share = np.mean([badge_seeding_order(X, 2, s)[1] == 1 for s in seeds])
    # binomial sd sqrt(0.4348 * 0.5652 / 2000) = 0.011; the seeds are fixed, so this is exact
    assert share == pytest.approx(10 / 23, abs=0.035)


def test_third_centre_uses_the_distance_to_the_nearest_centre():
    # points 0, 1, 10, 11 on a line: the first centre is 11 (largest norm); D^2 to {11} is
    # 121, 100, 1 for rows 0, 1, 2 -> P(row 0 second) = 121 / 222
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    orders = [badge_seeding_order(x, 3, s) for s in range(2000)]
    assert all(o[0] == 3 for o in orders)
    after_zero = [o[2] for o in orders if o[1] == 0]
    # after centres {11, 0}: D^2 = 1 (row 1), 1 (row 2) -> 1/2 each
    assert np.mean(np.array(after_zero) == 1) == pytest.approx(0.5, abs=0.06)
    assert np.mean([o[1] == 0 for o in orders]) == pytest.approx(121 / 222, abs=0.035)


def test_duplicates_only_left_fill_the_order_without_repeats():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    order = badge_seeding_order(x, 4, 0)
    assert sorted(order) == [0, 1, 2, 3]
    assert order[:2] == [0, 3]


def test_bad_seeding_names_the_key():
    with pytest.raises(AlrunError, match=r"strategy\.selector\.seeding: expected one of"):
        Badge(seeding="greedy")
