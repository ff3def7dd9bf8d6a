"""Streaming acquisition: what of each shard of pool predictions a strategy keeps.

The pool is predicted in shards (``acquisition.shard_size`` images, :mod:`alrun.streaming`);
each shard is scored as it arrives and reduced to what selection needs, so peak memory is the
model + one shard + O(pool) scalars instead of every pool image's boxes and probabilities:

* a scorer whose image score reads only that image's predictions (:data:`PER_IMAGE_SCORERS`)
  is called on each shard; a weighted sum streams its parts and normalises once at the end
  (normalisation is over the pool); a scorer that needs no predictions (random, MI-AOD, which
  loads pixels itself) runs once at the end;
* a selector keeps only the fields it reads (:func:`selector_keep`): nothing (top-k), image
  embeddings (k-center, k-means++), per-image gradient embeddings computed on the shard
  (BADGE), or per-box rows (CCMS: features of boxes above its threshold; box-in-box);
* a two-phase selector keeps nothing in the first pass; its diversity stage gets the
  candidates' predictions from a second pass over them (:mod:`alrun.streaming`).

A scorer or selector not listed here is not streamed: the shards are kept whole and it sees
the pool at once, as before (``fallback`` in the plan; docs/benchmarks.md lists them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from alrun.acquisition.badge import Badge
from alrun.acquisition.bib import BoxInBoxKMeansPP
from alrun.acquisition.cald import CaldConsistency
from alrun.acquisition.ccms import CCMSKCentroid
from alrun.acquisition.combine import WeightedSum
from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.diversity import DistanceToLabelled, KCenterGreedy, KMeansPlusPlus, TwoPhase
from alrun.acquisition.heuristics import BoxInBox, DetectionCount, HasDetection
from alrun.acquisition.learned import _HeadScorer
from alrun.acquisition.mixture import MixtureUncertainty
from alrun.acquisition.multipass import PassUncertainty
from alrun.acquisition.pool_values import PoolValues
from alrun.acquisition.ppal import DifficultyCalibratedUncertainty
from alrun.acquisition.qbc import CommitteeDisagreement
from alrun.acquisition.reduction import box_confidence, kept_rows
from alrun.acquisition.select import TopK
from alrun.acquisition.strategies import BoxUncertainty
from alrun.errors import AlrunError

#: scorers whose score of an image reads only that image's predictions (and round-level state
#: such as class weights), so scoring shard by shard equals scoring the pool at once
#: (AL-MDN's is not: it z-scores over the pool's boxes, see :func:`_mixture_keep`)
PER_IMAGE_SCORERS = (
    BoxUncertainty,
    PassUncertainty,
    DifficultyCalibratedUncertainty,
    CaldConsistency,
    CommitteeDisagreement,
    HasDetection,
    DetectionCount,
    BoxInBox,
)
#: scorers that read image embeddings of the whole pool at once (a subset drawn over the pool,
#: distances to the labelled set): the shards keep embeddings only
EMBEDDING_SCORERS = (_HeadScorer, DistanceToLabelled)

#: per-box fields of a PredictionBatch beside boxes / scores / labels
BOX_FIELDS = ("probs", "class_probs", "feats", "proposals", "sources", "mdn")


def check_shard_size(value: Any) -> int | None:
    """``acquisition.shard_size``: a positive number of images, or null (the whole pool)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AlrunError(
            "acquisition.shard_size: expected a positive number of images per shard, or null "
            f"(the whole pool at once), got {value!r}"
        )
    return int(value)


@dataclass(frozen=True)
class Keep:
    """What of a shard's predictions is kept for the end of the step.

    ``everything``: the shard as predicted (a scorer or selector that is not streamed).
    ``box_fields``: per-box fields kept beside boxes / scores / labels, for the rows any of
    ``rows`` selects (each ``rows(batch) -> (B,) bool``; none: every row). ``confidence``:
    ``class_probs`` cut to one column, each box's confidence (its largest class probability,
    :func:`~alrun.acquisition.reduction.box_confidence`), for a scorer that reads only that.
    ``embeddings``: image embeddings. ``features``: per-image features computed on the shard,
    ``features(context) -> (len(context.preds), D)`` (BADGE).
    """

    everything: bool = False
    box_fields: tuple[str, ...] | None = None
    rows: tuple[Callable[[PredictionBatch], Tensor], ...] = ()
    confidence: bool = False
    embeddings: bool = False
    features: Callable[[AcquisitionContext], Tensor] | None = None

    def merge(self, other: Keep) -> Keep:
        if self.features is not None and other.features is not None:
            return Keep(everything=True)  # two per-image reductions: not streamed
        fields, rows = None, ()
        if self.box_fields is not None or other.box_fields is not None:
            fields = tuple(dict.fromkeys((*(self.box_fields or ()), *(other.box_fields or ()))))
            every = [k for k in (self, other) if k.box_fields is not None and not k.rows]
            rows = () if every else (*self.rows, *other.rows)
        confidence = (self.confidence or other.confidence) and not (
            {"probs", "class_probs"} & set(fields or ())
        )
        return Keep(
            everything=self.everything or other.everything,
            box_fields=fields,
            rows=rows,
            confidence=confidence,
            embeddings=self.embeddings or other.embeddings,
            features=self.features or other.features,
        )


def selector_keep(selector: Any) -> Keep:
    """What ``selector`` reads of the pool predictions (see the module docstring)."""
    if isinstance(selector, TopK):
        return Keep()
    if isinstance(selector, Badge):
        return Keep(features=_badge_features(selector))
    if isinstance(selector, KCenterGreedy):
        return Keep(embeddings=True)
    if isinstance(selector, KMeansPlusPlus) and selector.features is None:
        return Keep(embeddings=True)
    if isinstance(selector, CCMSKCentroid):  # CCMS reads only boxes >= its threshold
        threshold = selector.score_threshold
        return Keep(box_fields=("feats",), rows=(lambda b: b.scores >= threshold,))
    if isinstance(selector, BoxInBoxKMeansPP):
        return Keep(box_fields=("feats", "sources"))
    return Keep(everything=True)


def _badge_features(selector: Badge) -> Callable[[AcquisitionContext], Tensor]:
    def features(context: AcquisitionContext) -> Tensor:
        return selector.features(context, context.preds.image_ids)

    return features


#: where a streamed scorer's per-shard scores gather: a :class:`PoolValues` over the pool in a
#: streamed step (:mod:`alrun.streaming`), so no per-image dict grows with the pool
ScoreStore = Callable[[], dict[str, float] | PoolValues]


class ShardScores:
    """A scorer fed shard by shard: :meth:`add` each shard's context, :meth:`finish` with the
    whole step's context (its ``preds`` the kept reductions) for the image scores, gathered
    in a new ``store()``."""

    def __init__(self, scorer: Any, store: ScoreStore = dict):
        self.scorer = scorer
        self.parts: dict[str, ShardScores] = {}
        self.scores = store()
        if isinstance(scorer, WeightedSum):
            self.mode = "sum"
            self.parts = {k: ShardScores(s, store) for k, s in scorer.scorers.items()}
        elif isinstance(scorer, PER_IMAGE_SCORERS):
            self.mode = "shard"
        elif isinstance(scorer, MixtureUncertainty):
            self.mode = "boxes"  # z-scores over the pool's boxes: keeps its rows' 4 values
        elif not (scorer.needs.detections or scorer.needs.embedding):
            self.mode = "end"  # needs no pool predictions (random, MI-AOD)
        elif isinstance(scorer, EMBEDDING_SCORERS):
            self.mode = "embeddings"
        else:
            self.mode = "fallback"

    @property
    def keep(self) -> Keep:
        """What the shards must keep for :meth:`finish`."""
        keep = Keep()
        for part in self.parts.values():
            keep = keep.merge(part.keep)
        if self.mode == "embeddings":
            keep = keep.merge(Keep(embeddings=True))
        if self.mode == "boxes":
            keep = keep.merge(_mixture_keep(self.scorer))
        if self.mode == "fallback":
            keep = keep.merge(Keep(everything=True))
        return keep

    @property
    def streamed(self) -> bool:
        """Whether no part of the scorer needs the whole pool's predictions at once."""
        return self.mode in ("shard", "end") or (
            self.mode == "sum" and all(p.streamed for p in self.parts.values())
        )

    def add(self, context: AcquisitionContext) -> None:
        if self.mode == "shard":
            self.scores.update(self.scorer(context))
        for part in self.parts.values():
            part.add(context)

    def finish(self, context: AcquisitionContext) -> Mapping[str, float]:
        if self.mode == "shard":
            return self.scores
        if self.mode == "sum":
            weights = self.scorer.round_weights(context)
            self.scorer.last_weights = weights
            parts = {k: p.finish(context) for k, p in self.parts.items()}
            return self.scorer.combine(parts, weights)
        return self.scorer(context)


def _mixture_keep(scorer: MixtureUncertainty) -> Keep:
    """AL-MDN normalises each uncertainty over every kept box of the pool, so its kept rows'
    uncertainties (and confidences, for confidence-weighted aggregators) stay to the end."""

    def rows(batch: PredictionBatch) -> Tensor:
        mask = torch.zeros(batch.num_boxes, dtype=torch.bool)
        mask[kept_rows(batch, scorer.score_threshold, scorer.count_sources)] = True
        return mask

    return Keep(box_fields=("mdn", "sources"), rows=(rows,), confidence=True)


@dataclass
class StreamPlan:
    """How one strategy streams: its scorer fed by shard, what the shards keep, and whether
    a two-phase selector's diversity stage needs a second pass over its candidates."""

    scoring: ShardScores
    keep: Keep
    second_pass: Keep | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        """False when some part holds the whole pool's predictions (the fallback)."""
        return self.scoring.streamed and not self.keep.everything


def plan_for(strategy: Any, store: ScoreStore = dict) -> StreamPlan:
    """``store``: where the per-shard scores gather (see :class:`ShardScores`)."""
    scoring = ShardScores(strategy.scorer, store)
    selector = strategy.selector
    if isinstance(selector, TwoPhase):
        return StreamPlan(scoring, scoring.keep, second_pass=selector_keep(selector.diversity))
    return StreamPlan(scoring, scoring.keep.merge(selector_keep(selector)))


def reduce_shard(
    batch: PredictionBatch, keep: Keep, context: AcquisitionContext
) -> PredictionBatch:
    """``batch`` cut down to what ``keep`` says (``context``: the shard's, for features)."""
    if keep.everything:
        return batch
    n = len(batch)
    fields: dict[str, Any] = {}
    if keep.box_fields is not None:
        rows = torch.ones(batch.num_boxes, dtype=torch.bool)
        if keep.rows:
            rows = torch.zeros(batch.num_boxes, dtype=torch.bool)
            for select in keep.rows:
                rows |= select(batch)
        counts = torch.zeros(n, dtype=torch.int64).index_add_(0, batch.segment, rows.long())
        offsets = torch.zeros(n + 1, dtype=torch.int64)
        offsets[1:] = counts.cumsum(0)
        for name in ("boxes", "scores", "labels", *keep.box_fields):
            value = getattr(batch, name)
            if value is not None:
                fields[name] = value[rows]
        if keep.confidence:
            fields["class_probs"] = box_confidence(batch, torch.nonzero(rows).flatten())[:, None]
    else:
        offsets = torch.zeros(n + 1, dtype=torch.int64)
        fields.update(no_boxes())
    embeddings = None
    if keep.features is not None:
        embeddings = keep.features(context)
    elif keep.embeddings and batch.embeddings is not None:
        embeddings = batch.embeddings.clone()
    return PredictionBatch(
        batch.image_ids, offsets, head=batch.head, embeddings=embeddings, **fields
    )


def no_boxes() -> dict[str, Tensor]:
    """The box fields of a reduction that keeps no box."""
    return {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0)}


def ids_only(image_ids: tuple[str, ...], head: str) -> PredictionBatch:
    """What :func:`concat` makes of shards reduced by ``Keep()`` (nothing kept): the images
    ``image_ids`` (the tuple itself, not a copy) with no boxes."""
    offsets = torch.zeros(len(image_ids) + 1, dtype=torch.int64)
    return PredictionBatch(image_ids, offsets, head=head, **no_boxes())


def one_head(heads: set[str]) -> str:
    """The head of a batch joined from batches with ``heads`` (mixed: ``softmax``)."""
    return next(iter(heads)) if len(heads) == 1 else "softmax"


def concat(batches: Sequence[PredictionBatch]) -> PredictionBatch:
    """One batch of ``batches`` in order (optional fields kept only when every part has them)."""
    if len(batches) == 1:
        return batches[0]
    if not batches:
        return PredictionBatch((), torch.zeros(1, dtype=torch.int64), torch.zeros((0, 4)),
                               torch.zeros(0), torch.zeros(0))  # fmt: skip
    offsets = [torch.zeros(1, dtype=torch.int64)]
    shift = 0
    for b in batches:
        offsets.append(b.offsets[1:] + shift)
        shift += b.num_boxes
    fields: dict[str, Any] = {}
    for name in ("boxes", "scores", "labels", *BOX_FIELDS, "embeddings"):
        parts = [getattr(b, name) for b in batches]
        if all(p is not None for p in parts):
            fields[name] = torch.cat(parts)
    num_passes = {len(b.passes) for b in batches}
    if len(num_passes) == 1 and (t := num_passes.pop()) > 0:
        fields["passes"] = tuple(concat([b.passes[i] for b in batches]) for i in range(t))
    return PredictionBatch(
        tuple(i for b in batches for i in b.image_ids),
        torch.cat(offsets),
        head=one_head({b.head for b in batches}),
        **fields,
    )


def select_rows(batch: PredictionBatch, ids: Sequence[str]) -> PredictionBatch:
    """The images ``ids`` of ``batch`` (in ``batch``'s order), every field with them."""
    wanted = set(ids)
    keep = [n for n, i in enumerate(batch.image_ids) if i in wanted]
    if len(keep) == len(batch):
        return batch
    image = torch.zeros(len(batch), dtype=torch.bool)
    image[keep] = True
    rows = image[batch.segment]
    counts = batch.counts[keep]
    offsets = torch.zeros(len(keep) + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    fields: dict[str, Any] = {}
    for name in ("boxes", "scores", "labels", *BOX_FIELDS):
        value = getattr(batch, name)
        if value is not None:
            fields[name] = value[rows]
    if batch.embeddings is not None:
        fields["embeddings"] = batch.embeddings[keep]
    if batch.passes:
        fields["passes"] = tuple(select_rows(p, ids) for p in batch.passes)
    return PredictionBatch(
        tuple(batch.image_ids[n] for n in keep), offsets, head=batch.head, **fields
    )


@contextmanager
def precomputed_features(selector: Any, keep: Keep, batch: PredictionBatch):
    """Let a feature selector (BADGE) read the per-image features the shards kept in
    ``batch.embeddings`` instead of computing them from per-box predictions it no longer has."""
    if keep.features is None:
        yield
        return
    row = {i: n for n, i in enumerate(batch.image_ids)}

    def lookup(_context: AcquisitionContext, ids: Sequence[str]) -> Tensor:
        return batch.embeddings[[row[i] for i in ids]]

    original = selector.features
    selector.features = lookup
    try:
        yield
    finally:
        selector.features = original


def shard_context(context: AcquisitionContext, batch: PredictionBatch) -> AcquisitionContext:
    return replace(context, preds=batch)
