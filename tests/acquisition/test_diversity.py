import math

import numpy as np
import pytest
import torch

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.diversity import (
    DistanceToLabelled,
    KCenterGreedy,
    KMeansPlusPlus,
    TwoPhase,
    k_center_greedy,
    kmeans_plusplus_order,
    naive_k_center_greedy,
)
from alrun.acquisition.select import TopK
from alrun.errors import AlrunError
from alrun.types import Detections


def embedded_context(points, labelled=None, budget=math.inf, seed=0, cost_of=None):
    """A context whose pool images img0..imgN-1 have ``points`` as embeddings."""
    points = torch.as_tensor(points, dtype=torch.float32)
    dets = [
        Detections(
            image_id=f"img{i}",
            boxes=torch.zeros((0, 4)),
            scores=torch.zeros(0),
            labels=torch.zeros(0, dtype=torch.int64),
            embedding=points[i],
        )
        for i in range(len(points))
    ]
    batch = PredictionBatch.from_detections(dets)
    extra = {} if cost_of is None else {"cost_of": cost_of}
    return AcquisitionContext(
        tuple(batch.image_ids),
        seed,
        1,
        budget=budget,
        preds=batch,
        labelled_embeddings=None
        if labelled is None
        else torch.as_tensor(labelled, dtype=torch.float32),
        **extra,
    )


def uniform(ids):
    return {i: 0.0 for i in ids}


# --- k-center greedy: hand-made points -------------------------------------------------------


def test_k_center_picks_the_farthest_points_from_the_labelled_set():
    # labelled at the origin; pool on a line: the farthest (10) first, then the point farthest
    # from {0, 10}: 5 (distance 5 from both), then 2.5 / 7.5 are no longer there: 3 (dist 2/3)
    pool = [[1.0, 0.0], [3.0, 0.0], [5.0, 0.0], [10.0, 0.0], [9.0, 0.0]]
    ctx = embedded_context(pool, labelled=[[0.0, 0.0]], budget=3)
    picked = KCenterGreedy()(uniform(ctx.pool_ids), ctx)
    assert picked == ["img3", "img2", "img1"]


def test_k_center_corners_of_a_square_before_inner_points():
    corners = [[0, 0], [0, 10], [10, 0], [10, 10]]
    inner = [[5, 5], [4, 6], [6, 4], [5, 4]]
    ctx = embedded_context(inner + corners, labelled=[[5.0, 5.0]], budget=4)
    picked = KCenterGreedy()(uniform(ctx.pool_ids), ctx)
    assert sorted(picked) == ["img4", "img5", "img6", "img7"]


def test_k_center_only_picks_images_that_have_a_score():
    pool = [[0.0], [100.0], [50.0]]
    ctx = embedded_context(pool, labelled=[[0.0]], budget=2)
    assert KCenterGreedy()({"img0": 0.0, "img2": 0.0}, ctx) == ["img2", "img0"]


def test_k_center_without_labelled_set_starts_from_a_seeded_image():
    pool = np.random.default_rng(0).normal(size=(50, 3))
    ctx = embedded_context(pool, budget=5, seed=3)
    sel = KCenterGreedy(from_labelled=False)
    first = sel(uniform(ctx.pool_ids), ctx)
    assert first == sel(uniform(ctx.pool_ids), ctx)  # deterministic per seed
    assert len(set(first)) == 5
    contexts = [embedded_context(pool, budget=1, seed=s) for s in range(6)]
    firsts = {sel(uniform(c.pool_ids), c)[0] for c in contexts}
    assert len(firsts) > 1  # the first pick follows the seed
    idx = [int(i[3:]) for i in first]
    assert idx[1:] == naive_k_center_greedy(torch.tensor(pool), 5, first=idx[0])[1:]


@pytest.mark.parametrize("clustered", [False, True])
def test_batched_k_center_equals_the_naive_greedy(clustered):
    rng = np.random.default_rng(1)
    if clustered:
        centres = rng.normal(scale=10.0, size=(20, 8))
        x = centres[rng.integers(20, size=3000)] + rng.normal(size=(3000, 8))
    else:
        x = rng.normal(size=(3000, 8))
    x = torch.tensor(x, dtype=torch.float64)
    start = x[:5] + 0.1
    naive = naive_k_center_greedy(x, 300, start)
    # small candidate sets / batches / chunks exercise every refresh path
    fast = k_center_greedy(x, 300, start, candidates=64, max_batch=16, chunk_rows=257)
    assert fast == naive
    assert k_center_greedy(x, 300, None, first=7, candidates=50, max_batch=8) == (
        naive_k_center_greedy(x, 300, None, first=7)
    )


def test_k_center_with_duplicates_never_picks_an_image_twice():
    x = torch.zeros((10, 4))
    x[5:] = 1.0
    picked = k_center_greedy(x, 10, x[:1], candidates=3, max_batch=2)
    assert sorted(picked) == list(range(10))


def test_k_center_respects_a_cost_budget():
    pool = [[0.0], [100.0], [50.0], [25.0]]
    costs = {"img0": 1.0, "img1": 3.0, "img2": 1.0, "img3": 1.0}
    ctx = embedded_context(pool, labelled=[[0.0]], budget=4.0, cost_of=costs.__getitem__)
    picked = KCenterGreedy()(uniform(ctx.pool_ids), ctx)
    # order img1 (100), img2 (50), img3 (25); fill=stop: 3 + 1 = 4 spent, img3 does not fit
    assert picked == ["img1", "img2"]


def test_k_center_errors_on_missing_embeddings_and_nan_scores():
    dets = [Detections.empty("a"), Detections.empty("b")]
    ctx = AcquisitionContext(("a", "b"), 0, 0, 1, preds=PredictionBatch.from_detections(dets))
    with pytest.raises(AlrunError, match="embeddings"):
        KCenterGreedy()(uniform(ctx.pool_ids), ctx)
    ctx = embedded_context([[0.0], [1.0]], labelled=[[0.0]], budget=1)
    with pytest.raises(AlrunError, match="NaN"):
        KCenterGreedy()({"img0": math.nan, "img1": 0.0}, ctx)
    ctx = embedded_context([[0.0], [math.nan]], labelled=[[0.0]], budget=1)
    with pytest.raises(AlrunError, match="NaN or inf"):
        KCenterGreedy()(uniform(ctx.pool_ids), ctx)


# --- k-means++ ----------------------------------------------------------------------------------


def test_kmeans_pp_covers_every_well_separated_cluster():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], dtype=float)
    labels = np.repeat(np.arange(4), 25)
    x = centres[labels] + rng.normal(scale=0.5, size=(100, 2))
    order = kmeans_plusplus_order(x, 4, seed=0)
    assert sorted(labels[order].tolist()) == [0, 1, 2, 3]
    ctx = embedded_context(x, budget=4, seed=2)
    picked = KMeansPlusPlus()(uniform(ctx.pool_ids), ctx)
    assert sorted(labels[[int(i[3:]) for i in picked]].tolist()) == [0, 1, 2, 3]
    assert picked == KMeansPlusPlus()(uniform(ctx.pool_ids), ctx)


def test_kmeans_pp_with_fewer_distinct_points_than_k_returns_distinct_indices():
    x = np.zeros((6, 2))
    x[3:] = 1.0
    order = kmeans_plusplus_order(x, 5, seed=0)
    assert len(order) == len(set(order)) == 5


# --- two-phase ----------------------------------------------------------------------------------


def test_two_phase_diversity_inside_the_top_candidates():
    # the 4 best scores are img0..img3; img0/img1 are near-duplicates, img2/img3 are far apart
    pool = [[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [0.0, 10.0], [50.0, 50.0], [60.0, 60.0]]
    scores = {"img0": 0.9, "img1": 0.8, "img2": 0.7, "img3": 0.6, "img4": 0.1, "img5": 0.0}
    ctx = embedded_context(pool, labelled=[[0.0, 0.0]], budget=2)
    selector = TwoPhase(KCenterGreedy(), expand_ratio=2)
    picked = selector(scores, ctx)
    assert sorted(picked) == ["img2", "img3"]  # diversity among the 4 best, never img4/img5
    assert TopK()(scores, ctx) == ["img0", "img1"]
    assert selector.describe()["candidates"] == 4


def test_two_phase_rejects_expand_ratio_below_one():
    with pytest.raises(AlrunError, match="expand_ratio"):
        TwoPhase(KCenterGreedy(), expand_ratio=0.5)


def test_two_phase_logs_when_the_budget_covers_the_whole_pool(caplog):
    ctx = embedded_context([[0.0], [1.0], [2.0]], labelled=[[0.0]], budget=2)
    with caplog.at_level("INFO", logger="alrun"):
        picked = TwoPhase(KCenterGreedy(), 4)({"img0": 1.0, "img1": 2.0, "img2": 3.0}, ctx)
    assert picked == ["img2", "img1"]
    assert "whole scored pool" in caplog.text


def test_distance_to_labelled_scores():
    ctx = embedded_context([[3.0, 4.0], [1.0, 0.0]], labelled=[[0.0, 0.0], [1.0, 1.0]])
    scores = DistanceToLabelled()(ctx)
    assert scores["img0"] == pytest.approx(13.0)  # nearest (1, 1): 2^2 + 3^2
    assert scores["img1"] == pytest.approx(1.0)
