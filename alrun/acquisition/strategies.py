"""Strategies: an image scorer + a selector, built from configs with ``_target_``.

A scorer and a selector each declare the detector outputs they ``needs``; the loop computes
only those (random needs no prediction at all). Both receive one
:class:`~alrun.acquisition.context.AcquisitionContext`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from alrun.acquisition.aggregate import (
    AGGREGATORS,
    aggregate_segments,
    check_class_weights,
    class_weighted,
)
from alrun.acquisition.context import AcquisitionContext, PredictionBatch, Scorer, Selector
from alrun.acquisition.scores import DISTRIBUTIONS, distribution
from alrun.acquisition.select import TopK
from alrun.data.dataset import DatasetSplits
from alrun.detectors.capabilities import needs_capabilities
from alrun.detectors.views import check_view_size
from alrun.errors import AlrunError
from alrun.params import NonNegativeFloat, ScoreThreshold
from alrun.types import Detections, Needs

EMPTY_POLICIES = ("min", "max", "skip")

#: a named aggregator (``AGGREGATORS``) or a callable with :func:`aggregate_segments`'s
#: signature after ``name``: ``fn(scores, segment, num_segments, confidences) -> (I,)``
Aggregator = Literal[AGGREGATORS] | Callable[[Tensor, Tensor, int, Tensor | None], Tensor]
#: images without a box: ``min`` | ``max`` | ``skip`` | a score (see :func:`empty_image_score`)
EmptyPolicy = Literal[EMPTY_POLICIES] | float
#: null, or one weight >= 0 per class
ClassWeights = Sequence[NonNegativeFloat] | None


def _name_of(fn: Any) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial from Hydra's _partial_
    return getattr(fn, "__name__", type(fn).__name__)


def check_reduction(aggregator: Aggregator, empty: str | float, score_threshold: float) -> None:
    """Start-up checks shared by every per-box scorer: aggregator, empty-image policy, threshold."""
    if isinstance(aggregator, str) and aggregator not in AGGREGATORS:
        raise AlrunError(
            f"strategy.scorer.aggregator: expected one of {'|'.join(AGGREGATORS)} or a "
            f"callable, got '{aggregator}'"
        )
    if isinstance(empty, str) and empty not in EMPTY_POLICIES:
        raise AlrunError(
            f"strategy.scorer.empty: expected one of {'|'.join(EMPTY_POLICIES)} or a number, "
            f"got '{empty}'"
        )
    if not 0.0 <= score_threshold < 1.0:
        raise AlrunError(
            f"strategy.scorer.score_threshold: expected a number in [0, 1), got {score_threshold}"
        )


def empty_image_score(empty: str | float) -> float | None:
    """The score of an image without boxes under the ``empty`` policy (None: leave it out)."""
    if empty == "min":
        return -math.inf
    if empty == "max":
        return math.inf
    if empty == "skip":
        return None
    return float(empty)


def check_distribution_head(distribution: str, head_type: str, instead: str) -> None:
    """Start-up check: ``with_background`` needs a head that predicts background (``instead``
    names the distributions the scorer offers in its place)."""
    if distribution == "with_background" and head_type != "softmax":
        raise AlrunError(
            "strategy.scorer.distribution: with_background needs a softmax head with a "
            f"background class, but this detector's head is {head_type} (no background); "
            f"use {instead}"
        )


def check_class_count(scorer: Any, num_classes: int, key: str = "strategy.scorer") -> None:
    """Start-up check against the dataset: ``class_weights`` (of ``scorer`` and of the scorers
    it combines) has one weight per class; otherwise it would only fail when a box of a class
    past its end is first predicted, after round 0 trained."""
    weights = getattr(scorer, "class_weights", None)
    if isinstance(weights, tuple) and len(weights) != num_classes:
        raise AlrunError(
            f"{key}.class_weights: {len(weights)} weights {list(weights)} for the dataset's "
            f"{num_classes} classes; expected one weight per class"
        )
    for name, part in getattr(scorer, "scorers", {}).items():  # WeightedSum and subclasses
        check_class_count(part, num_classes, f"{key}.scorers.{name}")


def reduce_per_image(
    aggregator: Aggregator, scores: Tensor, segment: Tensor, num_images: int, confidences: Tensor
) -> Tensor:
    """Per-image reduction of box scores by a named or a callable aggregator (NaN: no box)."""
    if callable(aggregator):
        return aggregator(scores, segment, num_images, confidences)
    return aggregate_segments(scores, segment, num_images, aggregator, confidences)


def reduction_record(scorer: Any) -> dict[str, Any]:
    """What ``selection.json`` records about a per-box scorer's reduction to one image score."""
    aggregator = scorer.aggregator
    return {
        "aggregator": aggregator if isinstance(aggregator, str) else _name_of(aggregator),
        "score_threshold": scorer.score_threshold,
        "empty": scorer.empty,
        "sources_counted_once": True,
        "class_weights": None if scorer.class_weights is None else list(scorer.class_weights),
    }


def score_pool(scorer: Any, context: AcquisitionContext) -> dict[str, float]:
    """``scorer.batch_scores`` on the pool predictions as {image id: score} (None: left out)."""
    if context.preds is None:
        raise AlrunError("strategy: this scorer needs predictions")
    scores = scorer.batch_scores(context.preds)
    return {i: s for i, s in zip(context.preds.image_ids, scores) if s is not None}


class RandomScore:
    """Uniform random scores from ``(seed, round)``: the baseline every sweep should include."""

    needs = Needs(detections=False)

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        # round -1 is the initial set (context.rng offsets the round by one)
        rng = context.rng(0x5E1EC7)
        ordered = sorted(context.pool_ids)
        return dict(zip(ordered, rng.random(len(ordered)).tolist()))

    def describe(self) -> dict[str, Any]:
        return {"scorer": "random"}


def unique_sources(batch: PredictionBatch, keep: Tensor) -> Tensor:
    """Restrict ``keep`` (bool mask over boxes) to one row per (image, source).

    Per-class NMS may keep one box per class from the same anchor/proposal; those rows share
    probabilities and features, so counting each would weight exactly the ambiguous sources
    k times. Of such rows the one with the highest detector score is kept.
    """
    if batch.sources is None or not bool(keep.any()):
        return keep
    idx = torch.nonzero(keep).flatten()
    seg = batch.segment[idx]
    key = seg * (int(batch.sources.max()) + 1) + batch.sources[idx]
    by_score = torch.argsort(batch.scores[idx], descending=True, stable=True)
    by_key = by_score[torch.argsort(key[by_score], stable=True)]
    first = torch.ones(len(by_key), dtype=torch.bool)
    first[1:] = key[by_key][1:] != key[by_key][:-1]
    out = torch.zeros_like(keep)
    out[idx[by_key[first]]] = True
    return out


class BoxUncertainty:
    """Per-box uncertainty on a class distribution, reduced per image.

    ``distribution`` picks what a box is scored on (``binary`` | ``with_background`` |
    ``foreground``, see :func:`alrun.acquisition.scores.distribution`); the default ``binary``
    never yields constant scores, one-class datasets included.
    ``score_threshold`` drops boxes whose detector confidence is below it before scoring; each
    anchor/proposal is counted once (:func:`unique_sources`). ``empty`` decides images left
    with no box: ``min`` ranks them after every image with boxes, ``max`` before, ``skip``
    never selects them, a number gives them that score.
    """

    def __init__(
        self,
        box_score: Callable[[Tensor], Tensor],
        aggregator: Aggregator = "mean",
        score_threshold: ScoreThreshold = 0.1,
        empty: EmptyPolicy = "min",
        distribution: Literal[DISTRIBUTIONS] = "binary",
        class_weights: ClassWeights = None,
    ):
        check_reduction(aggregator, empty, score_threshold)
        if distribution not in DISTRIBUTIONS:
            raise AlrunError(
                f"strategy.scorer.distribution: expected one of {'|'.join(DISTRIBUTIONS)}, "
                f"got '{distribution}'"
            )
        self.box_score = box_score
        self.aggregator = aggregator
        self.score_threshold = float(score_threshold)
        self.empty = empty
        self.distribution = distribution
        self.class_weights = check_class_weights(class_weights)
        self.needs = Needs(probs=True)

    def check_detector(self, head_type: str) -> None:
        check_distribution_head(self.distribution, head_type, "binary or foreground")

    def image_score(self, det: Detections) -> float | None:
        """One image's score; ``None`` means: do not select (``empty: skip``)."""
        return self.batch_scores(PredictionBatch.from_detections([det]))[0]

    def batch_scores(self, batch: PredictionBatch) -> list[float | None]:
        """Scores of every image of ``batch`` in one vectorised pass over all its boxes."""
        if batch.probs is None:
            raise AlrunError("strategy: detector returned no class probabilities")
        if len(batch) == 0:
            return []
        keep = unique_sources(batch, batch.scores >= self.score_threshold)
        dist = distribution(
            self.distribution,
            batch.probs[keep],
            None if batch.class_probs is None else batch.class_probs[keep],
            batch.labels[keep],
        )
        box_scores = class_weighted(self.box_score(dist), batch.labels[keep], self.class_weights)
        segment, confidences = batch.segment[keep], batch.scores[keep]
        per_image = reduce_per_image(self.aggregator, box_scores, segment, len(batch), confidences)
        empty = empty_image_score(self.empty)
        return [empty if math.isnan(x) else x for x in per_image.tolist()]

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        return score_pool(self, context)

    def describe(self) -> dict[str, Any]:
        return {
            "scorer": "box_uncertainty",
            "box_score": _name_of(self.box_score),
            "distribution": self.distribution,
            **reduction_record(self),
        }


class Strategy:
    """``scorer`` ranks the unlabelled pool, ``selector`` picks within the budget."""

    def __init__(self, name: str, scorer: Scorer, selector: Selector | None = None):
        self.name = name
        self.scorer = scorer
        self.selector = selector if selector is not None else TopK()
        self._as_built = copy.deepcopy(self.describe())  # before any scoring: see describe_unscored

    @property
    def needs(self) -> Needs:
        return self.scorer.needs.merge(getattr(self.selector, "needs", Needs(detections=False)))

    @property
    def training_hooks(self) -> tuple:
        """Engine hooks of learned scorers/selectors (auxiliary heads trained with the detector)."""
        return (
            *getattr(self.scorer, "training_hooks", ()),
            *getattr(self.selector, "training_hooks", ()),
        )

    @property
    def requires(self) -> frozenset[str]:
        """Capability names (``alrun.detectors.base``) the detector must have: what ``needs``
        asks it to output and what the training hooks read (``alrun.detectors.capabilities``)."""
        hooked = {name for hook in self.training_hooks for name in hook.requires}
        return needs_capabilities(self.needs) | hooked

    @property
    def aggregator(self) -> str | None:
        agg = getattr(self.scorer, "aggregator", None)
        return agg if agg is None or isinstance(agg, str) else _name_of(agg)

    @property
    def score_threshold(self) -> float:
        return float(getattr(self.scorer, "score_threshold", 0.0))

    def check_detector(self, head_type: str) -> None:
        """Start-up check against the built detector's head (e.g. ``with_background`` needs a
        softmax head); capabilities are checked before, by ``alrun.detectors.capabilities``."""
        check = getattr(self.scorer, "check_detector", None)
        if check is not None:
            check(head_type)

    def check_data(self, splits: DatasetSplits) -> None:
        """Start-up checks against the dataset, before any training: ``class_weights`` against
        its class count, test-time scale views against its largest pool image."""
        check_class_count(self.scorer, len(splits.classes))
        if self.needs.augment:
            largest = max(splits.pool.images, key=lambda r: r.width * r.height)
            check_view_size(self.needs.augment, largest.width, largest.height)

    def describe(self) -> dict[str, Any]:
        """What selection.json records about how this round's pick was made, after ``score`` and
        ``select`` ran (e.g. the weights, normalisation or candidate count of this round)."""
        return {"strategy": self.name, **self.scorer.describe(), **self.selector.describe()}

    def describe_unscored(self) -> dict[str, Any]:
        """What selection.json records for a round that scored nothing (the last round, an
        exhausted pool): the strategy as configured. ``describe()`` would repeat the previous
        round's scoring in an uninterrupted run but not in a resumed one (a new process)."""
        return copy.deepcopy(self._as_built)

    def score(self, context: AcquisitionContext) -> dict[str, float]:
        with torch.no_grad():
            return self.scorer(context)

    def select(self, scores: Mapping[str, float], context: AcquisitionContext) -> list[str]:
        return self.selector(scores, context)
