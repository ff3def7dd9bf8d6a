"""What a shard keeps (alrun.acquisition.streaming) on real tensors: scores, CCMS similarities,
AL-MDN's pool normalisation and BADGE features from the kept reductions equal the whole batch's."""

from __future__ import annotations

import torch

from alrun.acquisition.badge import Badge
from alrun.acquisition.ccms import CCMSKCentroid, batch_ccms
from alrun.acquisition.combine import WeightedSum
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.diversity import KCenterGreedy, TwoPhase
from alrun.acquisition.mixture import MixtureUncertainty
from alrun.acquisition.scores import entropy
from alrun.acquisition.select import TopK
from alrun.acquisition.strategies import BoxUncertainty, RandomScore, Strategy
from alrun.acquisition.streaming import (
    Keep,
    ShardScores,
    concat,
    ids_only,
    plan_for,
    precomputed_features,
    reduce_shard,
    select_rows,
    selector_keep,
)
from alrun.types import Detections

CLASSES = 3


def _images(n: int, seed: int = 0) -> list[Detections]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(0, 6, (1,), generator=g))  # some images without boxes
        xy = torch.rand(k, 2, generator=g) * 50
        wh = torch.rand(k, 2, generator=g) * 30 + 2
        logits = torch.randn(k, CLASSES + 1, generator=g)
        probs = logits.softmax(dim=1)
        out.append(
            Detections(
                image_id=f"im{i:03d}",
                boxes=torch.cat([xy, xy + wh], dim=1),
                scores=torch.rand(k, generator=g),
                labels=torch.randint(0, CLASSES, (k,), generator=g),
                probs=probs,
                class_probs=probs[:, :-1],
                feats=torch.randn(k, 8, generator=g),
                sources=torch.arange(k),
                mdn=torch.rand(k, 4, generator=g),
                embedding=torch.randn(16, generator=g),
                head="softmax",
            )
        )
    return out


def _context(batch: PredictionBatch | None) -> AcquisitionContext:
    ids = tuple(f"im{i:03d}" for i in range(23))
    return AcquisitionContext(ids, seed=0, round=0, budget=5, preds=batch)


def _shards(dets: list[Detections], size: int) -> list[PredictionBatch]:
    return [PredictionBatch.from_detections(dets[s : s + size]) for s in range(0, len(dets), size)]


def test_per_image_scores_by_shard_equal_the_whole_batch():
    dets = _images(23)
    scorer = BoxUncertainty(entropy, aggregator="max", score_threshold=0.2)
    whole = scorer(_context(PredictionBatch.from_detections(dets)))
    fed = ShardScores(scorer)
    for shard in _shards(dets, 5):
        fed.add(_context(shard))
    assert fed.mode == "shard" and fed.finish(_context(None)) == whole


def test_weighted_sum_streams_its_parts_and_normalises_over_the_pool():
    dets = _images(23)
    scorer = WeightedSum(
        {"a": BoxUncertainty(entropy), "r": RandomScore()}, {"a": 1.0, "r": 0.5}, "zscore"
    )
    whole = scorer(_context(PredictionBatch.from_detections(dets)))
    fed = ShardScores(scorer)
    for shard in _shards(dets, 4):
        fed.add(_context(shard))
    assert fed.parts["r"].mode == "end" and fed.streamed
    assert fed.finish(_context(concat([]))) == whole


def test_al_mdn_keeps_its_rows_and_normalises_over_the_pool():
    """AL-MDN z-scores over every kept box of the pool: per shard it would differ."""
    dets = _images(23)
    scorer = MixtureUncertainty(aggregator="mean", score_threshold=0.3)
    whole = scorer(_context(PredictionBatch.from_detections(dets)))
    fed = ShardScores(scorer)
    shards = _shards(dets, 5)
    per_shard = {}
    for shard in shards:
        per_shard.update(scorer(_context(shard)))
    assert per_shard != whole  # the reason it is not a per-image scorer
    kept = concat([reduce_shard(s, fed.keep, _context(s)) for s in shards])
    assert kept.probs is None and kept.class_probs.shape[1] == 1  # confidence only
    assert kept.num_boxes < sum(len(d) for d in dets)
    assert fed.finish(_context(kept)) == whole


def test_ccms_keeps_only_the_boxes_above_its_threshold_and_gives_the_same_matrix():
    dets = _images(23)
    batch = PredictionBatch.from_detections(dets)
    keep = selector_keep(CCMSKCentroid(score_threshold=0.4))
    kept = concat([reduce_shard(s, keep, _context(s)) for s in _shards(dets, 6)])
    assert kept.probs is None and kept.num_boxes == int((batch.scores >= 0.4).sum())
    rows = list(range(0, 23, 2))
    assert torch.equal(batch_ccms(batch, rows, 0.4), batch_ccms(kept, rows, 0.4))


def test_badge_reads_the_features_computed_shard_by_shard():
    dets = _images(23)
    badge = Badge(score_threshold=0.1)
    batch = PredictionBatch.from_detections(dets)
    ids = list(batch.image_ids)
    whole = badge.features(_context(batch), ids)
    keep = selector_keep(badge)
    kept = concat([reduce_shard(s, keep, _context(s)) for s in _shards(dets, 7)])
    with precomputed_features(badge, keep, kept):
        assert torch.equal(badge.features(_context(kept), ids), whole)
    assert badge.features.__name__ == "_features"  # restored
    context = _context(batch)
    picked = badge({i: 0.0 for i in ids}, context)
    with precomputed_features(badge, keep, kept):
        assert badge({i: 0.0 for i in ids}, _context(kept)) == picked


def test_plans_keep_what_each_selector_reads():
    scorer = BoxUncertainty(entropy)
    assert plan_for(Strategy("e", scorer, TopK())).keep == Keep()
    coreset = plan_for(Strategy("c", RandomScore(), KCenterGreedy(from_labelled=False)))
    assert coreset.keep.embeddings and coreset.keep.box_fields is None
    two = plan_for(Strategy("p", scorer, TwoPhase(CCMSKCentroid())))
    assert two.keep == Keep() and two.second_pass.box_fields == ("feats",)


def test_keeping_nothing_is_the_pool_ids_with_no_boxes():
    """A top-k step keeps no per-shard batch: what it hands on equals the shards' reductions
    joined, and its ids are the tuple it was given, not a copy."""
    dets = _images(23)
    shards = _shards(dets, 5)
    joined = concat([reduce_shard(s, Keep(), _context(s)) for s in shards])
    ids = tuple(d.image_id for d in dets)
    alone = ids_only(ids, "softmax")
    assert alone.image_ids is ids and alone.image_ids == joined.image_ids
    assert alone.head == joined.head and alone.embeddings is None and joined.embeddings is None
    for name in ("offsets", "boxes", "scores", "labels"):
        a, b = getattr(alone, name), getattr(joined, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert alone.probs is None and joined.probs is None and not alone.passes


def test_merged_keeps_take_every_row_when_one_asks_for_all():
    some = Keep(box_fields=("feats",), rows=(lambda b: b.scores > 0.5,))
    every = Keep(box_fields=("sources",))
    merged = some.merge(every)
    assert merged.box_fields == ("feats", "sources") and merged.rows == ()
    assert Keep(features=len).merge(Keep(features=len)).everything  # two reductions: whole


def test_select_rows_and_concat_round_trip():
    dets = _images(23)
    batch = PredictionBatch.from_detections(dets)
    ids = [d.image_id for d in dets if int(d.image_id[2:]) % 3 == 0]
    part = select_rows(batch, ids)
    expected = PredictionBatch.from_detections([d for d in dets if d.image_id in ids])
    for name in ("offsets", "boxes", "scores", "labels", "probs", "feats", "mdn", "embeddings"):
        assert torch.equal(getattr(part, name), getattr(expected, name)), name
    again = concat(_shards(dets, 4))
    for name in ("offsets", "boxes", "probs", "sources", "embeddings"):
        assert torch.equal(getattr(again, name), getattr(batch, name)), name
