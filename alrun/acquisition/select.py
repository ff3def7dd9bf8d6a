"""Selectors: turn per-image scores into an ordered pick within a budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping


def ranked(scores: Mapping[str, float]) -> list[str]:
    """Image ids by descending score; ties (and NaN-free equal scores) broken by ascending id,
    so the order never depends on dict or filesystem order."""
    return sorted(scores, key=lambda i: (-scores[i], i))


class TopK:
    """Highest scores first, filled greedily within the budget.

    In score order each image is taken if its cost still fits; an image that does not fit is
    skipped and smaller ones further down may still be taken, so the budget is never exceeded.
    Images scored ``-inf`` are eligible last; images absent from ``scores`` are never selected.
    """

    def __call__(
        self, scores: Mapping[str, float], budget: float, cost_of: Callable[[str], float]
    ) -> list[str]:
        picked: list[str] = []
        spent = 0.0
        for image_id in ranked(scores):
            if math.isnan(scores[image_id]):
                raise ValueError(f"score of image '{image_id}' is NaN")
            cost = cost_of(image_id)
            if spent + cost <= budget + 1e-9:
                picked.append(image_id)
                spent += cost
        return picked
