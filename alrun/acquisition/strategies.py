"""Strategies: an image scorer + a selector, built from configs with ``_target_``.

A scorer and a selector each declare the detector outputs they ``needs``; the loop computes
only those (random needs no prediction at all). Both receive one
:class:`~alrun.acquisition.context.AcquisitionContext`.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from alrun.acquisition.aggregate import check_class_weights
from alrun.acquisition.context import AcquisitionContext, PredictionBatch, Scorer, Selector
from alrun.acquisition.reduction import (  # noqa: F401 - re-exported for older imports
    EMPTY_POLICIES,
    Aggregator,
    ClassWeights,
    CountSources,
    EmptyPolicy,
    _name_of,
    check_reduction,
    empty_image_score,
    image_scores,
    kept_rows,
    reduce_per_image,
    reduction_record,
    unique_sources,
)
from alrun.acquisition.scores import DISTRIBUTIONS, distribution
from alrun.acquisition.select import TopK
from alrun.data.dataset import VisibleSplits
from alrun.detectors.base import IMAGE_VIEWS, MC_DROPOUT
from alrun.detectors.capabilities import needs_capabilities
from alrun.detectors.views import check_view_size
from alrun.errors import AlrunError
from alrun.params import ScoreThreshold
from alrun.seeding import Purpose
from alrun.types import Detections, Needs

#: argument names of the multi-pass scores (alrun.acquisition.multipass.PASS_INPUTS)
_PASS_ARGUMENTS = ("pass_probs", "ref_probs", "iou", "pass_boxes", "matched")
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


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


def check_single_pass(box_score: Callable[..., Tensor]) -> None:
    """Start-up check: a box score of :class:`BoxUncertainty` takes one class distribution; a
    score over prediction passes (``pass_probs``, ``iou``, ...) would silently read the classes
    as passes, so it is refused with the scorer options that feed it."""
    params = inspect.signature(box_score).parameters.values()
    required = [p.name for p in params if p.default is p.empty and p.kind in _NAMED]
    if len(required) != 1 or required[0] in _PASS_ARGUMENTS:
        raise AlrunError(
            f"strategy.scorer.box_score: '{_name_of(box_score)}' asks for {', '.join(required)}, "
            "not one class distribution; scores over prediction passes need a multi-pass "
            "strategy/scorer (bald, entropy_of_mean, ...; strategy/passes picks their source)"
        )


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
        rng = context.rng(Purpose.RANDOM_SCORE)
        ordered = sorted(context.pool_ids)
        return dict(zip(ordered, rng.random(len(ordered)).tolist()))

    def describe(self) -> dict[str, Any]:
        return {"scorer": "random"}


class BoxUncertainty:
    """Per-box uncertainty on a class distribution, reduced per image.

    ``distribution`` picks what a box is scored on (``binary`` | ``with_background`` |
    ``foreground``, see :func:`alrun.acquisition.scores.distribution`); the default ``binary``
    never yields constant scores, one-class datasets included.
    ``score_threshold`` drops boxes whose detector confidence is below it before scoring; each
    anchor/proposal is counted once (``count_sources: once``, :func:`unique_sources`) or every
    row NMS keeps (``per_class``). ``empty`` decides images left with no box: ``min`` ranks
    them after every image with boxes, ``max`` before, ``skip`` never selects them, a number
    gives them that score. The reduction is :mod:`alrun.acquisition.reduction`'s.
    """

    def __init__(
        self,
        box_score: Callable[[Tensor], Tensor],
        aggregator: Aggregator = "mean",
        score_threshold: ScoreThreshold = 0.1,
        empty: EmptyPolicy = "min",
        distribution: Literal[DISTRIBUTIONS] = "binary",
        class_weights: ClassWeights = None,
        count_sources: CountSources = "once",
    ):
        check_reduction(aggregator, empty, score_threshold, count_sources)
        check_single_pass(box_score)
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
        self.count_sources = count_sources
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
        rows = kept_rows(batch, self.score_threshold, self.count_sources)
        dist = distribution(
            self.distribution,
            batch.probs[rows],
            None if batch.class_probs is None else batch.class_probs[rows],
            batch.labels[rows],
        )
        return image_scores(self, batch, rows, self.box_score(dist))

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        return score_pool(self, context)

    def describe(self) -> dict[str, Any]:
        return {
            "scorer": "box_uncertainty",
            "box_score": _name_of(self.box_score),
            "distribution": self.distribution,
            **reduction_record(self),
        }


#: what a scorer's extra passes (``strategy/passes``) ask of the detector; ensembles nothing
PASS_CAPABILITIES = frozenset({MC_DROPOUT, IMAGE_VIEWS})


def _passes_part(scorer: Scorer) -> str:
    """``strategy/passes=<source>``; a combined scorer's parts: their passes, by the scorer."""
    source = getattr(scorer, "source", None)
    return f"strategy/passes={source}" if isinstance(source, str) else "strategy.scorer's passes"


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

    def requirement_parts(self) -> list[tuple[str, frozenset[str]]]:
        """``(part, capability names)`` of the parts of ``requires``: the scorer
        (``strategy.scorer``: its outputs and training hooks), its extra passes
        (``strategy/passes=<source>``: MC dropout, test-time views) and the selector
        (``strategy.selector``), so a refusal names the part to change."""
        asked = needs_capabilities(self.scorer.needs)
        passes = asked & PASS_CAPABILITIES
        hooks = {n for h in getattr(self.scorer, "training_hooks", ()) for n in h.requires}
        chosen = getattr(self.selector, "needs", Needs(detections=False))
        selected = needs_capabilities(chosen)
        selected |= {n for h in getattr(self.selector, "training_hooks", ()) for n in h.requires}
        parts = [
            ("strategy.scorer", frozenset((asked - passes) | hooks)),
            (_passes_part(self.scorer), passes),
            ("strategy.selector", frozenset(selected)),
        ]
        return [(part, caps) for part, caps in parts if caps]

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

    def check_data(self, splits: VisibleSplits) -> None:
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
