"""Strategies: an image scorer + a selector, built from configs with ``_target_``.

A scorer declares the detector outputs it ``needs``; the loop computes only those (random needs
no prediction at all).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from alrun.acquisition.aggregate import AGGREGATORS, aggregate_segments
from alrun.acquisition.scores import foreground
from alrun.acquisition.select import TopK
from alrun.errors import AlrunError
from alrun.types import Detections, Needs

EMPTY_POLICIES = ("min", "max", "skip")


@dataclass(frozen=True)
class ScoringContext:
    """What a scorer may use besides predictions: ids to score and round-specific seeding."""

    image_ids: tuple[str, ...]
    seed: int
    round: int


class RandomScore:
    """Uniform random scores from ``(seed, round)``: the baseline every sweep should include."""

    needs = Needs(detections=False)
    aggregator = None
    score_threshold = 0.0

    def __call__(
        self, preds: Sequence[Detections] | None, context: ScoringContext
    ) -> dict[str, float]:
        # round -1 is the initial set, hence round + 1 (seed entropy must be non-negative)
        rng = np.random.default_rng([context.seed, context.round + 1, 0x5E1EC7])
        ordered = sorted(context.image_ids)
        return dict(zip(ordered, rng.random(len(ordered)).tolist()))


class BoxUncertainty:
    """Per-box uncertainty on the foreground class distribution, reduced per image.

    ``score_threshold`` drops boxes whose detector confidence is below it before scoring.
    ``empty`` decides images left with no box: ``min`` ranks them after every image with boxes,
    ``max`` before, ``skip`` never selects them, a number gives them that score.
    """

    def __init__(
        self,
        box_score: Callable[[Tensor], Tensor],
        aggregator: str = "mean",
        score_threshold: float = 0.1,
        empty: str | float = "min",
        use_background: bool = False,
    ):
        if aggregator not in AGGREGATORS:
            raise AlrunError(
                f"strategy.aggregator: expected one of {AGGREGATORS}, got '{aggregator}'"
            )
        if isinstance(empty, str) and empty not in EMPTY_POLICIES:
            raise AlrunError(
                f"strategy.empty: expected one of {EMPTY_POLICIES} or a number, got '{empty}'"
            )
        if not 0.0 <= score_threshold < 1.0:
            raise AlrunError(f"strategy.score_threshold: expected [0, 1), got {score_threshold}")
        self.box_score = box_score
        self.aggregator = aggregator
        self.score_threshold = float(score_threshold)
        self.empty = empty
        self.use_background = use_background
        self.needs = Needs(probs=True)

    def _empty_score(self) -> float | None:
        if self.empty == "min":
            return -math.inf
        if self.empty == "max":
            return math.inf
        if self.empty == "skip":
            return None
        return float(self.empty)

    def image_score(self, det: Detections) -> float | None:
        """One image's score; ``None`` means: do not select (``empty: skip``)."""
        return self.batch_scores([det])[0]

    def batch_scores(self, preds: Sequence[Detections]) -> list[float | None]:
        """Scores of many images in one vectorised pass over all their boxes."""
        if any(det.probs is None for det in preds):
            raise AlrunError("strategy: detector returned no class probabilities")
        if not preds:
            return []
        counts = torch.tensor([len(det) for det in preds])
        confidences = torch.cat([det.scores for det in preds])
        probs = torch.cat([det.probs for det in preds])
        segment = torch.repeat_interleave(torch.arange(len(preds)), counts)
        keep = confidences >= self.score_threshold
        probs = probs[keep] if self.use_background else foreground(probs[keep])
        per_image = aggregate_segments(
            self.box_score(probs), segment[keep], len(preds), self.aggregator, confidences[keep]
        ).tolist()
        empty = self._empty_score()
        return [empty if math.isnan(x) else x for x in per_image]

    def __call__(
        self, preds: Sequence[Detections] | None, context: ScoringContext
    ) -> dict[str, float]:
        if preds is None:
            raise AlrunError("strategy: this scorer needs predictions")
        scores = self.batch_scores(preds)
        return {det.image_id: s for det, s in zip(preds, scores) if s is not None}


class Strategy:
    """``scorer`` ranks the unlabelled pool, ``selector`` picks within the budget."""

    def __init__(self, name: str, scorer, selector=None):
        self.name = name
        self.scorer = scorer
        self.selector = selector if selector is not None else TopK()

    @property
    def needs(self) -> Needs:
        return self.scorer.needs

    @property
    def aggregator(self) -> str | None:
        return getattr(self.scorer, "aggregator", None)

    @property
    def score_threshold(self) -> float:
        return float(getattr(self.scorer, "score_threshold", 0.0))

    def score(
        self, preds: Sequence[Detections] | None, context: ScoringContext
    ) -> dict[str, float]:
        with torch.no_grad():
            return self.scorer(preds, context)

    def select(
        self, scores: Mapping[str, float], budget: float, cost_of: Callable[[str], float]
    ) -> list[str]:
        return self.selector(scores, budget, cost_of)
