"""Category-conditioned matching similarity (CCMS) and k-centroid selection (PPAL, Yang et al.
2024, "Plug and Play Active Learning for Object Detection").

Two images are similar when every detected object of one has a look-alike *of the same class*
in the other. For images A and B with kept boxes (detector score >= ``score_threshold``)::

    sim(A -> B) = sum_i s_i * m_i / sum_i s_i,   m_i = max_{j in B, c_j = c_i} cos(f_i, f_j)

with ``m_i = -1`` when B has no box of class ``c_i``, ``s_i`` the box's detector score and ``f``
the box features (``features: cls_tower``, PPAL's ``RetinaHeadFeat``: the classification
tower's output sampled bilinearly at the box centre, on the box's FPN level; ``fpn``: alrun's
earlier FPN feature at the box's anchor); ``CCMS(A, B) = (sim(A -> B) + sim(B -> A)) / 2`` in
[-1, 1]. Two images without kept boxes are identical (1); one without and one with are opposite
(-1).

Selection is PPAL's k-centroid: greedy farthest-first initialisation on the distance
``1 - CCMS`` (first centre a seeded random image), then k-medoids iterations (assign each image
to its nearest centre, move each centre to the member with the least total distance; 100
iterations as PPAL's ``DiversitySampler.kmeans``, stopping early once no centre moves). The
distance matrix is over the candidates only, so use it inside the two-phase scheme
(``max_candidates`` guards against an N x N matrix over a large pool).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from alrun.acquisition.context import AcquisitionContext, PredictionBatch
from alrun.acquisition.diversity import affordable_count, candidate_ids, check_scores
from alrun.acquisition.select import fill_budget
from alrun.errors import AlrunError
from alrun.params import NonNegativeInt, Range, ScoreThreshold
from alrun.seeding import Purpose
from alrun.types import Needs

#: CCMS holds a few n x n float64 matrices: 50,000 candidates take ~60 GB
MAX_CANDIDATES = 50_000


def ccms_matrix(
    feats: Tensor,
    labels: Tensor,
    weights: Tensor,
    segment: Tensor,
    num_images: int,
    block_boxes: int = 4096,
) -> Tensor:
    """(I, I) CCMS between every pair of images; boxes given flat with ``segment`` = image index.

    Memory: ``block_boxes x B`` similarities at a time (B = number of boxes), plus I x I.
    """
    directed = torch.full((num_images, num_images), -1.0, dtype=torch.float64)
    counts = torch.bincount(segment, minlength=num_images)
    empty = counts == 0
    if len(feats):
        f = torch.nn.functional.normalize(feats.double(), dim=1)
        w = weights.double().clamp_min(1e-12)
        w_sum = torch.zeros(num_images, dtype=torch.float64).index_add_(0, segment, w)
        num = torch.zeros((num_images, num_images), dtype=torch.float64)
        for start in range(0, len(f), block_boxes):
            rows = slice(start, min(start + block_boxes, len(f)))
            cos = f[rows] @ f.t()
            cos.masked_fill_(labels[rows, None] != labels[None, :], -math.inf)
            best = torch.full((cos.shape[0], num_images), -math.inf, dtype=torch.float64)
            best.scatter_reduce_(1, segment[None, :].expand_as(cos), cos, reduce="amax")
            best[torch.isinf(best)] = -1.0  # no box of that class in the other image
            num.index_add_(0, segment[rows], best * w[rows, None])
        directed = num / w_sum.clamp_min(1e-12)[:, None]
    directed[empty] = -1.0
    directed[:, empty] = -1.0
    directed[empty[:, None] & empty[None, :]] = 1.0
    return (directed + directed.t()) / 2.0


def batch_ccms(batch: PredictionBatch, rows: Sequence[int], score_threshold: float) -> Tensor:
    """CCMS between the images at positions ``rows`` of ``batch`` (boxes >= threshold)."""
    if batch.feats is None:
        raise AlrunError(
            "strategy.selector: CCMS needs box features (needs.feats) but the detector returned "
            "none; choose a detector with box features or another strategy"
        )
    if not bool(torch.isfinite(batch.feats).all()):
        raise AlrunError("strategy.selector: box features contain NaN or inf")
    position = torch.full((len(batch),), -1, dtype=torch.int64)
    position[torch.as_tensor(list(rows), dtype=torch.int64)] = torch.arange(len(rows))
    box_pos = position[batch.segment]
    keep = (box_pos >= 0) & (batch.scores >= score_threshold)
    return ccms_matrix(
        batch.feats[keep], batch.labels[keep], batch.scores[keep], box_pos[keep], len(rows)
    )


def k_centroid(distance: Tensor, k: int, first: int, iterations: int = 100) -> list[int]:
    """PPAL's k-centroid on a precomputed (n, n) distance: farthest-first init from ``first``,
    then k-medoids updates; returns ``k`` distinct indices (init order kept per cluster)."""
    n = len(distance)
    k = min(int(k), n)
    if k <= 0:
        return []
    centres = [int(first)]
    nearest = distance[:, first].clone()
    nearest[first] = -math.inf
    while len(centres) < k:
        c = int(torch.argmax(nearest))
        centres.append(c)
        nearest = torch.minimum(nearest, distance[:, c])
        nearest[centres] = -math.inf
    for _ in range(iterations):
        assign = distance[:, centres].argmin(dim=1)
        moved: list[int] = []
        for cluster, centre in enumerate(centres):
            members = torch.nonzero(assign == cluster).flatten()
            if len(members) == 0:
                moved.append(centre)
                continue
            cost = distance[members][:, members].sum(dim=1)
            chosen = centre
            for m in members[torch.argsort(cost, stable=True)].tolist():
                if m not in moved:
                    chosen = m
                    break
            moved.append(chosen)
        if len(set(moved)) < len(moved):  # keep distinct centres (never happens by assignment)
            break
        if moved == centres:
            break
        centres = moved
    return centres


class CCMSKCentroid:
    """Diversity selector with CCMS: k-centroid over the candidates' pairwise ``1 - CCMS``."""

    def __init__(
        self,
        score_threshold: ScoreThreshold = 0.05,
        iterations: NonNegativeInt = 100,
        max_candidates: Annotated[int, Range(1, MAX_CANDIDATES)] = 20000,
        features: Literal["cls_tower", "fpn"] = "cls_tower",
    ):
        if features not in ("cls_tower", "fpn"):
            raise AlrunError(
                "strategy.selector.features: expected 'cls_tower' (PPAL: the classification "
                f"tower at the box centre) or 'fpn' (the FPN feature at the anchor), got "
                f"'{features}'"
            )
        self.features = features
        self.needs = Needs(feats=True, head_feats=features == "cls_tower")
        if not 0.0 <= score_threshold < 1.0:
            raise AlrunError(
                f"strategy.selector.score_threshold: expected a number in [0, 1), got "
                f"{score_threshold}"
            )
        self.score_threshold = float(score_threshold)
        self.iterations = int(iterations)
        self.max_candidates = int(max_candidates)

    def __call__(self, scores: Mapping[str, float], context: AcquisitionContext) -> list[str]:
        check_scores(scores)
        ids = candidate_ids(scores, context)
        if not ids:
            return []
        if len(ids) > self.max_candidates:
            raise AlrunError(
                f"strategy.selector: CCMS over {len(ids)} candidates needs a {len(ids)}^2 "
                f"matrix (max_candidates={self.max_candidates}); use it inside the two-phase "
                "selector (strategy=ppal) or raise max_candidates"
            )
        row = {i: n for n, i in enumerate(context.preds.image_ids)}
        sim = batch_ccms(context.preds, [row[i] for i in ids], self.score_threshold)
        first = int(context.rng(Purpose.CCMS).integers(len(ids)))
        order = k_centroid(1.0 - sim, affordable_count(ids, context), first, self.iterations)
        return fill_budget([ids[i] for i in order], context.budget, context.cost_of, context.fill)

    def describe(self) -> dict[str, Any]:
        return {
            "selector": "ccms_k_centroid",
            "ccms_score_threshold": self.score_threshold,
            "k_centroid_iterations": self.iterations,
            "ccms_features": self.features,
        }
