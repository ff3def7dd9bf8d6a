"""BiB's selection (Vo et al., ECCV 2022; huyvvo/BiB ``BoxInBoxSampler``): k-means++ over
box-in-box *pair* features, an image entering with all its pairs.

Each same-class pair (small, large) of an image (:func:`~alrun.acquisition.heuristics.bib_pairs`)
is described by the concatenated features of its two boxes. Seeding follows the reference's
``kmeans_2plus_init_BiB._kmeans_plusplus``: the first round starts from the image with the most
pairs (ties: a seeded draw); later rounds start from the pairs of the images this strategy picked
before (the reference's previous centroids), read from predictions on the labelled set. Each
next image is found by ``2 + int(log(k))`` D^2-sampled candidate pairs, of which the one whose
image (all its pairs as centres) lowers the potential most is taken (greedy local trials).

Deviations, named: BiB's features come from a separate RoI feature extractor, alrun uses the
detector's own box features; BiB keeps only classes the image-level labels name (its setting is
weakly supervised), alrun every class; BiB stops with an error when fewer images than the budget
have pairs, alrun fills the rest in a seeded random order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.diversity import affordable_count, candidate_ids, check_scores
from alrun.acquisition.heuristics import PAIR_RULES, BoxInBox
from alrun.acquisition.select import fill_budget
from alrun.errors import AlrunError
from alrun.params import OpenFraction, Range, ScoreThreshold
from alrun.seeding import Purpose
from alrun.types import Needs


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def bib_kmeanspp(
    x: np.ndarray,
    groups: np.ndarray,
    k: int,
    rng: np.random.Generator,
    seeds: np.ndarray | None = None,
    n_groups_total: int | None = None,
) -> list[int]:
    """Up to ``k`` group ids in BiB's seeding order over points ``x`` (P, D) of ``groups``
    (P,). ``seeds`` (S, D): centres already chosen (earlier rounds); without them the first
    group is the one with the most points. ``n_groups_total`` sets the local trials
    ``2 + int(log(n))`` (the reference's ``n_groups``, seeds included; default ``k``)."""
    if k <= 0 or len(x) == 0:
        return []
    chosen: list[int] = []
    if seeds is not None and len(seeds):
        closest = _sq_dist(seeds, x).min(axis=0)
    else:
        values, counts = np.unique(groups, return_counts=True)
        first = int(rng.choice(values[counts == counts.max()]))
        chosen.append(first)
        closest = _sq_dist(x[groups == first], x).min(axis=0)
    trials = 2 + int(math.log(max(n_groups_total or k, 1)))
    while len(chosen) < k:
        potential = closest.sum()
        if not potential > 0:
            break
        draws = np.searchsorted(np.cumsum(closest), rng.random(trials) * potential)
        draws = np.clip(draws, None, len(closest) - 1)
        best, best_closest, best_potential = None, None, potential
        for c in draws.tolist():
            group = int(groups[c])
            updated = np.minimum(closest, _sq_dist(x[groups == group], x).min(axis=0))
            if updated.sum() < best_potential:
                best, best_closest, best_potential = group, updated, updated.sum()
        if best is None or best in chosen:
            break
        chosen.append(best)
        closest = best_closest
    return chosen


def _pair_features(batch: PredictionBatch, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    feats = batch.feats
    small = feats[[s for s, _ in pairs]].double()
    large = feats[[t for _, t in pairs]].double()
    return torch.cat([small, large], dim=1).numpy()


class BoxInBoxKMeansPP:
    """Selector: BiB's k-means++ over box-in-box pair features (see the module docstring).
    The pair rule's parameters are the scorer's (:class:`~alrun.acquisition.heuristics.BoxInBox`);
    ``from_selected`` starts a later round from the pairs of earlier picks."""

    def __init__(
        self,
        threshold: ScoreThreshold = 0.5,
        containment: OpenFraction = 0.8,
        min_area_ratio: Annotated[float, Range(1)] = 3.0,
        pairs: Literal[PAIR_RULES] = "first",
        from_selected: bool = True,
    ):
        self.finder = BoxInBox(threshold, containment, min_area_ratio, pairs)
        self.from_selected = bool(from_selected)
        self.needs = Needs(feats=True, labelled_detections=self.from_selected)
        self.last: dict[str, int] = {}

    def _seeds(self, context: AcquisitionContext) -> tuple[np.ndarray | None, int]:
        earlier = {i for picked in context.selections for i in picked}
        batch = context.labelled_preds
        if not self.from_selected or not earlier or batch is None or batch.feats is None:
            return None, 0
        found = [
            (image_id, p)
            for image_id, p in zip(batch.image_ids, self.finder.image_pairs(batch))
            if image_id in earlier and p
        ]
        if not found:
            return None, 0
        rows = [pair for _, p in found for pair in p]
        return _pair_features(batch, rows), len(found)

    def __call__(self, scores: Mapping[str, float], context: AcquisitionContext) -> list[str]:
        check_scores(scores)
        ids = candidate_ids(scores, context)
        if not ids:
            return []
        batch = context.preds
        if batch.feats is None:
            raise AlrunError(
                "strategy.selector: box-in-box k-means++ needs box features (needs.feats) but "
                "the detector returned none; choose a detector with box features"
            )
        row = {i: n for n, i in enumerate(batch.image_ids)}
        per_image = self.finder.image_pairs(batch)
        rows, groups = [], []
        for g, image_id in enumerate(ids):
            for pair in per_image[row[image_id]]:
                rows.append(pair)
                groups.append(g)
        seeds, seeded = self._seeds(context)
        k = affordable_count(ids, context)
        rng = context.rng(Purpose.BOX_IN_BOX)
        order: list[int] = []
        if rows:
            x = _pair_features(batch, rows)
            order = bib_kmeanspp(x, np.asarray(groups), k, rng, seeds, k + seeded)
        tie, taken = context.tie_rank(), set(order)
        rest = sorted((i for n, i in enumerate(ids) if n not in taken), key=tie.__getitem__)
        self.last = {"pairs": len(rows), "images_with_pairs": len(set(groups)), "seeded": seeded}
        picked = [ids[g] for g in order] + rest
        return fill_budget(picked, context.budget, context.cost_of, context.fill)

    def describe(self) -> dict[str, Any]:
        return {
            "selector": "bib_kmeans_pp",
            "from_selected": self.from_selected,
            **{f"bib_{k}": v for k, v in self.last.items()},
        }
