"""Selectors: turn per-image scores into an ordered pick within a budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from alrun.acquisition.context import AcquisitionContext
from alrun.acquisition.pool_values import PoolValues
from alrun.budget import FILL_POLICIES
from alrun.errors import AlrunError


def ranked(scores: Mapping[str, float], tie_rank: Mapping[str, int]) -> list[str]:
    """Image ids by descending score; equal scores in ``tie_rank`` order (a seeded permutation,
    see :meth:`AcquisitionContext.tie_rank`), so the order never depends on dict order or ids."""
    return sorted(scores, key=lambda i: (-scores[i], tie_rank[i]))


def pool_ranking(scores: Mapping[str, float], context: AcquisitionContext) -> list[str]:
    """:func:`ranked` with the context's seeded tie-break. Scores held in a
    :class:`PoolValues` (a streamed step) are ranked as arrays, in the same order, without a
    per-image tie-rank dict or sort key."""
    if not isinstance(scores, PoolValues):
        return ranked(scores, context.tie_rank())
    ordered, perm = context.tie_order()
    by_rank = scores.positions(ordered)[perm]  # the pool position of tie rank 0, 1, ...
    del ordered, perm  # (each temporary here is 8 bytes an image: freed as soon as read)
    rank = np.full(len(scores.values), len(by_rank), dtype=np.int64)
    rank[by_rank] = np.arange(len(by_rank))
    del by_rank
    # every pool position sorted, then the unscored dropped (the stable sort keeps the order
    # of the rest): no per-candidate copies of the keys
    order = np.lexsort((rank, -scores.values))
    return [scores.ids[p] for p in order[scores.present[order]]]


def fill_budget(
    ordered: Iterable[str], budget: float, cost_of: Callable[[str], float], fill: str
) -> list[str]:
    """Take images in ``ordered`` while the budget lasts; never exceeds it.

    ``fill="stop"``: stop at the first image that does not fit - the pick is a prefix of the
    ranking, so a cost budget does not drift toward cheap images from the tail (the honest
    default). ``fill="skip"``: skip an image that does not fit and keep scanning for cheaper
    ones further down, spending the budget more completely.
    """
    if fill not in FILL_POLICIES:
        raise AlrunError(f"budget.fill: expected one of {'|'.join(FILL_POLICIES)}, got '{fill}'")
    picked: list[str] = []
    spent = 0.0
    for image_id in ordered:
        cost = cost_of(image_id)
        if spent + cost <= budget + 1e-9:
            picked.append(image_id)
            spent += cost
        elif fill == "stop":
            break
    return picked


class TopK:
    """Highest scores first, filled within the budget by the context's ``fill`` policy.

    Images scored ``-inf`` are eligible last; images absent from ``scores`` are never selected.
    """

    def __call__(self, scores: Mapping[str, float], context: AcquisitionContext) -> list[str]:
        for image_id, score in scores.items():
            if math.isnan(score):
                raise ValueError(f"score of image '{image_id}' is NaN")
        order = pool_ranking(scores, context)
        return fill_budget(order, context.budget, context.cost_of, context.fill)

    def describe(self) -> dict[str, Any]:
        return {"selector": "topk"}
